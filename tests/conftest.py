"""Shared fixtures: seeded tiny random-weight Stable Diffusion pipelines, built offline (as Diffusers' tests do)."""

import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; other jobs may share them

# A closed vocabulary: single characters (so any word can be spelled) plus merges that make a few words one
# token. "circle" and "yellow" are left to split into several sub-tokens on purpose.
WHOLE_WORDS = ["a", "red", "blue", "green", "square", "on", "the", "left", "right", "and", "cat"]


def tiny_tokenizer(max_length: int = 16, pad_token: str = "<|endoftext|>", whole_words=WHOLE_WORDS):
    """A CLIP BPE tokenizer over the closed vocabulary; SDXL's second tokenizer pads with "!" (pad_token="!").
    `whole_words`: the words made one token each (another list gives another vocabulary)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in whole_words:  # left-to-right merges: "r e" -> "re", "re d</w>" -> "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad_token)


def tiny_sd_pipeline(seed: int = 0, max_length: int = 16):
    """A seeded random StableDiffusionPipeline: UNet with cross-attention at two resolutions, VAE factor 2."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, max_length: int = 16):
    """A seeded random StableDiffusionXLPipeline built like Diffusers' SDXL tests: two text encoders (the second
    with a projection, for the pooled embedding), a "text_time" UNet, VAE factor 2."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_tokenizer(max_length, pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=4,
        cross_attention_dim=32,  # the two encoders' hidden states (16 + 16), joined per token
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,  # six size/crop ids of 8 dims + the pooled text
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
    )
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5_tokenizer(max_length: int = 12):
    """A T5 (sentencepiece Unigram) tokenizer over a closed vocabulary, built offline: whole-word pieces with the
    "\u2581" word prefix, "circle" split into "\u2581cir" + "cle", and single letters as fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WHOLE_WORDS]
    pieces += [("\u2581cir", -1.0), ("cle", -1.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [(c, -5.0) for c in letters] + [("\u2581" + c, -5.0) for c in letters]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_sd3_pipeline(seed: int = 0, max_length: int = 16, num_layers: int = 3, dual_attention_layers=(0,)):
    """A seeded random StableDiffusion3Pipeline without T5 (its part of the text sequence is zeros): two CLIP
    encoders with projections, an SD3.5-style transformer (qk RMS norm, a dual-attention first block, the last
    block `context_pre_only`), flow matching, and a VAE with `shift_factor` 0.0 (SD3's pipeline adds it).
    Patch 2 on a VAE of factor 2: a 32 x 48 image is an 8 x 12 token grid."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_tokenizer(max_length, pad_token="!")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=tuple(dual_attention_layers),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0,
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16,
    )
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, max_length: int = 16, t5_length: int = 12):
    """A seeded random FluxPipeline: CLIP (pooled) and a tiny T5 over `tiny_t5_tokenizer`, a transformer with
    one double- and one single-stream block, 2x2-packed latents (in_channels 16 from the VAE's 4), flow
    matching. VAE factor 2, so a 32 x 48 image is an 8 x 12 token grid."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = tiny_tokenizer(max_length), tiny_t5_tokenizer(t5_length)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=32,
                                             num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def sd_pipe_dir(tmp_path_factory):
    """The tiny pipeline saved to a folder, for loading paths and the CLI (read only: shared by all tests)."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


class RaiseInsideForward:
    """Raise from inside the UNet's forward pass, after some cross-attention layers have run: a forward hook on
    the last cross-attention layer raises on its `on_call`-th call (1 = the first UNet call). Records the processor
    that layer ran with, so a test can check that ours were installed at that moment."""

    def __init__(self, unet, on_call: int = 1):
        from crossattn_sd.processors import cross_attention_layers

        self.module = unet.get_submodule(cross_attention_layers(unet)[-1])
        self.on_call, self.calls, self.processor_seen = on_call, 0, None

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.on_call:
            self.processor_seen = module.processor
            raise RuntimeError("boom inside the forward pass")

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- the web app, served for real (tests/test_ui.py, tests/test_browser.py) ------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's Chromium, driven by Playwright
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SKIP_BROWSER = "CROSSATTN_SD_SKIP_BROWSER"  # the README's opt-out for machines without Chromium


def require_chromium() -> None:
    """Fail (not skip: the README's test command must not pass without its browser tests) when Chromium is missing,
    unless CROSSATTN_SD_SKIP_BROWSER=1 opts out."""
    from pathlib import Path

    if Path(CHROMIUM).exists():
        return
    if os.environ.get(SKIP_BROWSER) == "1":
        pytest.skip(f"{SKIP_BROWSER}=1: the browser tests are skipped")
    pytest.fail(f"no Chromium at {CHROMIUM} for the browser tests: install it (apt-get install -y chromium), or "
                f"set {SKIP_BROWSER}=1 to skip them", pytrace=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def chromium():
    """Headless Chromium through Playwright (after `require_chromium`), closed on exit."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_app(browser, url: str, viewport: dict, timeout: int):
    """A new page on the app at `url`, once the app has drawn itself (it is drawn by script after the page loads)."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(timeout)
    page.goto(url)
    page.locator("#generate").wait_for()
    return page


def shown(page, selector: str):
    """The pixels (H, W, 3) of the image a component shows, fetched from the server as the page did."""
    import io

    import numpy as np
    from PIL import Image

    src = page.locator(f"{selector} img").first.get_attribute("src")
    with Image.open(io.BytesIO(page.request.get(src).body())) as im:
        return np.asarray(im.convert("RGB"))


def wait_changed(page, selector: str, old_src: str | None) -> None:
    """Wait until the component's image is another than `old_src`."""
    page.wait_for_function("([sel, old]) => { const i = document.querySelector(sel + ' img'); "
                           "return i && i.src !== old; }", arg=[selector, old_src])


@contextlib.contextmanager
def serve_app(service):
    """The app for `service`, served on a free loopback port; yields its URL."""
    from crossattn_sd.ui import build_demo, launch

    demo = build_demo(service)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer(max_length: int = 24):
    """A word-level tokenizer with a Qwen-style chat template (`<|im_start|>role ... <|im_end|>`), built offline:
    the closed vocabulary plus "circle", the template's role words, and `<|endoftext|>` padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    words = specials + WHOLE_WORDS + ["circle", "user", "assistant"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="[UNK]",
                                        additional_special_tokens=specials[1:3], model_max_length=max_length)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_flux2_pipeline(seed: int = 0, max_length: int = 24):
    """A seeded random Flux2KleinPipeline (guidance-distilled: one transformer call per step): a tiny Qwen3 text
    encoder (27 layers, so the pipeline's default layers 9, 18, 27 exist), a transformer with one double- and
    one single-stream block, the FLUX.2 VAE with 4 latent channels (patchified 2x2 into 16), flow matching.
    VAE factor 2, so a 32 x 48 image is an 8 x 12 token grid."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_chat_tokenizer(max_length)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
    )
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CONFIGS = Path(__file__).parent / "configs"  # published configs of full-size denoisers


def meta_model(class_name: str, config: str, include_buffers: bool = False):
    """A full-size Diffusers model (class `class_name`) from its published config in tests/configs/, weights on
    the meta device: no memory, no values, every shape. `include_buffers` puts buffers there too (SD3's
    positional table is made on the CPU otherwise)."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=include_buffers):
        return getattr(diffusers, class_name).from_config(json.loads((CONFIGS / config).read_text()))


def check_meta_capture(model, layers: list[str], processor_types, args: dict, grid: int, text: int,
                       untouched=(), **capture_kwargs):
    """One shapes-only forward of a meta-device `model` with `args` inside `capture(model, **capture_kwargs)`:
    inside the block each of `layers` has a processor of `processor_types` (one type for all, or a list, one per
    layer) and the keys in `untouched` keep theirs; the store records exactly `layers`, each on the (grid, grid)
    token grid, the first over `text` columns; afterwards every processor is the one from before. Processors are
    read with Diffusers' own `AttentionMixin.attn_processors` walk (also on a model without the mixin)."""
    from diffusers.models.attention import AttentionMixin

    from crossattn_sd import capture

    read = AttentionMixin.attn_processors.fget
    before = read(model)
    types = processor_types if isinstance(processor_types, list) else [processor_types] * len(layers)
    with capture(model, **capture_kwargs) as store:
        inside = read(model)
        assert all(isinstance(inside[f"{l}.processor"], t) for l, t in zip(layers, types, strict=True))
        assert all(inside[k] is before[k] for k in untouched)
        with torch.no_grad():
            model(**args)
    assert store.layers == layers
    assert {store.layer_shape(l) for l in layers} == {(grid, grid)}
    assert store.sums[layers[0]].shape == (1, grid, grid, text)
    after = read(model)
    assert list(after) == list(before) and all(p is before[k] for k, p in after.items())
    return store
