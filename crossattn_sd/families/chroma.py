"""Chroma family (`ChromaPipeline`): FLUX.1's architecture with a T5 attention mask and guidance as a second call.

- Layers, token grid and the [text; image] joint sequence are FLUX.1's (`flux.py`): double-stream blocks
  `transformer_blocks.N.attn` and single-stream blocks `single_transformer_blocks.N.attn`, 2x2-packed latents.
- The pipeline passes an attention mask over the T5 padding (every padding token but the first is masked), which
  each block turns into a (B, 1, N, N) mask of the joint sequence. The maps are computed with that mask exactly as
  the layer's output is: SDPA adds a float mask to the scores and drops the False keys of a boolean one. (Diffusers
  0.42.1's pipeline hands the blocks a float 0/1 mask, which SDPA adds: padding keys get no boost, the rest +1.)
- Classifier-free guidance runs the transformer a second time on the same latents, after the conditional call,
  with the negative prompt: that call is not recorded (`FluxFamily.recorded_call`: it runs on Diffusers' own
  processors).

FLUX.1's processors (`flux.py`) record and steer it: exact and explicit modes, reweight and edit.

Text positions: T5's (the pipeline's only tokenizer, `tokenizer`), `max_sequence_length` of them (512 by default).
"""

from __future__ import annotations

from .flux import FluxFamily


class ChromaFamily(FluxFamily):
    """`ChromaTransformer2DModel`: FLUX.1's blocks and grid, a mask over the T5 padding, guidance as its own call."""

    name = "chroma"
    description = "ChromaTransformer2DModel (Chroma)"
    model_classes = ("ChromaTransformer2DModel",)

    def step_input(self, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "attention_mask")
        given = dict(zip(names, args), **kwargs)
        return super().step_input((), {k: given.get(k) for k in ("encoder_hidden_states", "timestep", "img_ids")})

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        from ..tokens import align_prompt

        if part not in (None, "t5"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use t5")
        return align_prompt(pipe.tokenizer, prompt, self.max_sequence_length(pipe, max_sequence_length))
