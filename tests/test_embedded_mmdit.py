"""The shipped joint-attention model: `load_pipeline("tiny-mmdit")` loads it offline from package data, and a plain
Diffusers call with its preset's settings draws held-out captions the judge accepts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import torch

from crossattn_sd.config import PACKAGE_DIR, get_preset
from crossattn_sd.pipeline import _absent_components, load_pipeline
from crossattn_sd.tiny.build import folder_size
from crossattn_sd.tiny.evaluate import captions
from crossattn_sd.tiny.judge import judge

N_JUDGED = 16
MIN_RIGHT = 14  # the shipped weights draw 16 of these 16 right (guidance 1.5); room for platform rounding


def test_preset_names_the_packaged_sd3_folder():
    preset = get_preset("tiny-mmdit")
    assert preset.family == "sd3" and preset.max_sequence_length == 0
    folder = PACKAGE_DIR / preset.source.removeprefix("package:")
    assert (folder / "model_index.json").is_file()
    assert folder_size(folder) <= 30 * 2**20


def test_null_components_of_a_folder_are_passed_as_none(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": [None, None], "vae": ["diffusers", "X"]}))
    assert _absent_components(tmp_path) == {"text_encoder_3": None}
    assert _absent_components(tmp_path / "missing") == {}
    assert _absent_components("some/hub-id") == {}


def test_load_pipeline_tiny_mmdit_draws_held_out_captions_right():
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny-mmdit", device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert pipe.transformer.dtype == torch.float32  # fp16 files, float32 model
    preset = get_preset("tiny-mmdit")
    defaults = pipe.crossattn_defaults
    assert (defaults.steps, defaults.guidance, defaults.height, defaults.width) == (20, preset.guidance, 64, 64)
    items = captions(N_JUDGED, seed=0)
    images = pipe([text for text, _, _ in items], num_inference_steps=defaults.steps,
                  guidance_scale=defaults.guidance, height=defaults.height, width=defaults.width,
                  max_sequence_length=preset.max_sequence_length,
                  generator=[torch.Generator().manual_seed(seed) for _, _, seed in items]).images
    assert {im.size for im in images} == {(64, 64)}
    right = sum(judge(np.asarray(im), kinds).ok for im, (_, kinds, _) in zip(images, items))
    assert right >= MIN_RIGHT, f"{right}/{N_JUDGED} held-out captions drawn right"


def test_generate_on_tiny_mmdit_is_the_plain_call_with_maps_and_the_ui_keeps_its_timeline():
    """`generate` passes the preset's max_sequence_length (0): the image is the plain call's bit for bit, with per-word
    maps on the 8x8 token grid of its four joint layers; the web UI keeps per-step maps for it, as for `tiny`."""
    from crossattn_sd.pipeline import generate
    from crossattn_sd.service import AttentionService

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny-mmdit", device="cpu")
    prompt = "a red circle on the left and a blue square on the right"
    result = generate(pipe, prompt, seed=0, steps=4)
    plain = pipe(prompt, num_inference_steps=4, guidance_scale=pipe.crossattn_defaults.guidance, height=64,
                 width=64, max_sequence_length=0, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(plain))
    assert result.settings["max_sequence_length"] == 0 and result.store.resolutions() == [(8, 8)]
    assert len(result.store.layers) == 4 and result.heatmap("circle").shape == (64, 64)
    assert AttentionService(get_preset("tiny-mmdit"), pipe=pipe).defaults().per_step


def test_tiny_mmdit_default_view_is_head_2_of_its_last_joint_block_in_the_api_and_the_ui():
    """The preset's measured default view (README): `heatmap`, `word_maps` and the UI's first ticks show head 2 of
    transformer_blocks.3.attn; every block's mean of heads stays one filter away."""
    from crossattn_sd.pipeline import generate
    from crossattn_sd.service import AttentionService, GenerateRequest

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny-mmdit", device="cpu")
    result = generate(pipe, "a blue square on the left", seed=0, steps=2)
    assert result.default_layers() == ["transformer_blocks.3.attn"] and result.default_head() == 2
    np.testing.assert_array_equal(result.heatmap("blue"),
                                  result.heatmap("blue", layers="transformer_blocks.3.attn", head=2))
    assert np.abs(result.heatmap("blue") - result.heatmap("blue", layers="*")).max() > 1e-2
    service = AttentionService(get_preset("tiny-mmdit"), pipe=pipe)
    entry = service.generate(GenerateRequest("a blue square on the left", steps=2))
    c = service.choices(entry)
    assert c.default_layers == ["transformer_blocks.3.attn"] and c.default_head == 2 and c.default_resolutions == []
    summary = service.drawn_from(entry, service.filters())
    assert summary.startswith("1 of 4 layers (8x8)") and summary.endswith("head 2"), summary
