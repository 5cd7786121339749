"""ConceptAttention on SD3's joint blocks (Helbling et al., ICML 2025): concept maps in the attention output space.

Each concept's word tokens (encoded by the pipeline's own `encode_prompt`, then the transformer's
`context_embedder`, as the prompt is) run through every joint block in a residual stream of their own, with the
block's text-stream weights: `norm1_context` (its modulation from the block's `temb`), `add_q_proj` /
`add_k_proj` / `add_v_proj` with `norm_added_q` / `norm_added_k`, then `to_add_out`, `norm2_context` and
`ff_context` with the same gates as the prompt's text. The concept queries attend to [image tokens; concepts]
(the image's keys and values of the real call); the image tokens never attend to the concepts, and nothing of the
stream goes back into the model, so the image is the call's own. Per image token, a concept's map is

    softmax over the concepts of (o_x . o_c)          ("output", ConceptAttention's maps)

with o_x the image token's attention output of the real call (the input of `attn.to_out[0]`: attention over
[image; prompt]) and o_c the concept token's attention output, both before the output projection, over all
heads at once. "attention" is the image queries' softmax over the concepts' keys, head-averaged: the raw
image->concept attention to compare the output space with.

Everything is read with PyTorch's public hooks: forward hooks on each joint attention's `to_q`, `to_k`, `to_v`
(the image tokens' projections) and a pre-hook on `to_out[0]` (o_x), a pre-hook on each block (its `temb`) and a
forward hook that runs the block's concept step once the block is done. The installed attention processor is
not touched, so this works under any processor that projects the image tokens through those modules.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CONCEPT_KINDS = ("output", "attention")


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, L, heads * d) -> (n, heads, L, d)"""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class ConceptStream:
    """One call's concept tokens through the joint blocks, and the hooks that carry them."""

    def __init__(self, transformer, store, concepts, layers):
        self.transformer, self.store, self.concepts, self.layers = transformer, store, concepts, layers
        self.stream: torch.Tensor | None = None  # (n, Tc, dim): the concepts' residual stream in this model call
        self.seen: dict[str, torch.Tensor] = {}  # what the hooks kept of the block that is running
        self.start: torch.Tensor | None = None  # context_embedder(states), (1, Tc, dim): the same every call
        self.handles = []

    def install(self) -> None:
        self.handles.append(self.transformer.register_forward_pre_hook(self.new_call))
        for i, block in enumerate(self.transformer.transformer_blocks):
            attn, name = block.attn, f"transformer_blocks.{i}.attn"
            for part in ("to_q", "to_k", "to_v"):
                self.handles.append(getattr(attn, part).register_forward_hook(self.keep(part)))
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self.keep_input("out")))
            self.handles.append(block.register_forward_pre_hook(self.keep_temb, with_kwargs=True))
            self.handles.append(block.register_forward_hook(self.step(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- hooks -------------------------------------------------------------------------------------------------

    def new_call(self, module, args):
        self.stream, self.seen = None, {}

    def keep(self, part: str):
        def hook(module, args, output):
            self.seen[part] = output.detach()
        return hook

    def keep_input(self, part: str):
        def hook(module, args):
            self.seen[part] = args[0].detach()
        return hook

    def keep_temb(self, module, args, kwargs):
        self.seen["temb"] = (kwargs["temb"] if "temb" in kwargs else args[2]).detach()

    def step(self, name: str):
        def hook(block, args, output):
            seen, self.seen = self.seen, {}
            if not {"to_q", "to_k", "to_v", "out", "temb"} <= set(seen):
                return  # the block was skipped or attended otherwise (e.g. a fused processor): nothing to read
            with torch.no_grad():
                self.advance(block, name, seen)
        return hook

    # -- the concept step of one block ------------------------------------------------------------------------

    def advance(self, block, name: str, seen: dict) -> None:
        attn = block.attn
        rec = self.store.conditional(seen["to_q"].shape[0])
        temb = seen["temb"][rec]
        if self.stream is None:
            if self.start is None:
                states = self.concepts.states.to(device=temb.device, dtype=temb.dtype)
                self.start = self.transformer.context_embedder(states)
            self.stream = self.start.expand(temb.shape[0], -1, -1)
        c = self.stream
        if block.context_pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
        heads = attn.heads
        query_x = _heads(seen["to_q"][rec], heads)  # the image tokens' projections of the real call
        key_x = _heads(seen["to_k"][rec], heads)
        value_x = _heads(seen["to_v"][rec], heads)
        if attn.norm_q is not None:
            query_x = attn.norm_q(query_x)
        if attn.norm_k is not None:
            key_x = attn.norm_k(key_x)
        query_c = _heads(attn.add_q_proj(norm_c), heads)
        key_c = _heads(attn.add_k_proj(norm_c), heads)
        value_c = _heads(attn.add_v_proj(norm_c), heads)
        if attn.norm_added_q is not None:
            query_c = attn.norm_added_q(query_c)
        if attn.norm_added_k is not None:
            key_c = attn.norm_added_k(key_c)
        # the concepts attend to the image and to themselves
        out_c = F.scaled_dot_product_attention(query_c, torch.cat([key_x, key_c], dim=2),
                                               torch.cat([value_x, value_c], dim=2))
        out_c = out_c.transpose(1, 2).reshape(out_c.shape[0], -1, heads * out_c.shape[-1])  # (n, Tc, inner)
        if name in self.layers:
            out_x = seen["out"][rec].float()  # (n, N, inner): the image tokens' attention output, real call
            probs = torch.einsum("bnc,btc->bnt", out_x, out_c.float()).softmax(dim=-1)  # over the concepts
            self.concepts.stores["output"].record(name, probs, 1)
            self.concepts.stores["attention"].record_attention(name, query_x, key_c, None,
                                                               1 / math.sqrt(query_x.shape[-1]))
        if block.context_pre_only:
            self.stream = None  # the last block has no text output: the stream ends here
            return
        c = c + c_gate_msa.unsqueeze(1) * attn.to_add_out(out_c)
        norm_c = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        self.stream = c + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_c)


@contextmanager
def concept_recorder(family, pipe, store, names, kind=None, template=None):
    """SD3Family.concept_recorder: encode the concepts (the words of the text part the words index: T5's when the
    pipeline has T5, else CLIP's) and carry them through the joint blocks while the pipeline runs."""
    from ..concepts import DEFAULT_TEMPLATE, Concepts, attach, check_template, concept_text

    kind = CONCEPT_KINDS[0] if kind is None else kind
    if kind not in CONCEPT_KINDS:
        raise ValueError(f"concept map kind {kind!r} is not one of this model's: {', '.join(CONCEPT_KINDS)}")
    template = check_template(DEFAULT_TEMPLATE if template is None else template)
    defaults = getattr(pipe, "crossattn_defaults", None)
    length = getattr(defaults, "max_sequence_length", None)
    length = 77 if length is None else length  # T5's part: enough for a word (tiny-mmdit: 0, it has no T5)
    start = template.index("{}")
    positions = []
    for c in names:
        words = family.text_positions(pipe, concept_text(c, template), None, length).words
        word = next((w for w in words if w.start == start and w.end == start + len(c)), None)
        if word is None:
            raise ValueError(f"concept {c[:20]!r} is cut by the tokenizer's limit; give a shorter word")
        positions.append(word.token_indices)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt=[concept_text(c, template) for c in names], prompt_2=None, prompt_3=None,
                                    device=pipe._execution_device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False, max_sequence_length=length)[0]
    states = torch.cat([embeds[i, list(p)] for i, p in enumerate(positions)])[None]  # (1, Tc, joint dim)
    groups, first = [], 0
    for p in positions:
        groups.append(tuple(range(first, first + len(p))))
        first += len(p)
    concepts = Concepts.like(store, names, groups, CONCEPT_KINDS, states, default_kind=kind, template=template)
    attach(store, concepts)
    transformer = family.model
    # maps on the layers this call records (installed after this block opens: read when each block runs)
    recorded = _RecordedLayers(transformer)
    stream = ConceptStream(transformer, store, concepts, recorded)
    stream.install()
    try:
        yield concepts
    finally:
        stream.remove()


class _RecordedLayers:
    """`name in layers`: whether layer `name` has one of this package's processors right now."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __contains__(self, name: str) -> bool:
        from .base import Recorder

        return isinstance(self.transformer.get_submodule(name).processor, Recorder)
