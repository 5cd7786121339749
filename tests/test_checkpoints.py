"""Real checkpoints without downloading them.

Full-size SD 1.5, SD 2.1 base and SDXL UNets are built from their published configs (tests/configs/, each with a
note of its source) on the meta device: every processor must go on exactly the cross-attention layers, come off
again, and record maps of the right sizes in a shapes-only forward pass. One full-size SD 1.5 UNet also runs for
real on the CPU. The presets and `load_pipeline`'s choices (source, device, dtype, offline errors) are checked
with `DiffusionPipeline.from_pretrained` replaced, so nothing is downloaded.
"""

import gc
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RaiseInsideForward, tiny_tokenizer

from crossattn_sd.config import load_presets
from crossattn_sd.processors import CaptureProcessor, capture, cross_attention_layers, layer_sizes
from crossattn_sd.steering import ProcessorSpec, use_processor

CONFIGS = Path(__file__).parent / "configs"
UNET_CONFIGS = {"sd15": "sd15_unet.json", "sd21": "sd21_base_unet.json", "sdxl": "sdxl_base_unet.json"}
# Counted from the published configs: SD 1.x/2.x have 2 transformer blocks in each of 3 down blocks, 1 in the mid
# block and 3 in each of 3 up blocks (6 + 1 + 9); SDXL has transformer depths (1, 2, 10) with cross-attention only
# in the two lower levels: down 2x2 + 2x10, mid 10, up 3x10 + 3x2 = 70.
CROSS_ATTENTION_LAYERS = {"sd15": 16, "sd21": 16, "sdxl": 70}
SPECS = {
    "default": ProcessorSpec("default"),
    "capture-exact": ProcessorSpec("capture", mode="exact"),
    "capture-explicit": ProcessorSpec("capture", mode="explicit"),
    "reweight": ProcessorSpec("reweight", weights=(("red", 2.0), ("circle", 0.0))),
    "edit": ProcessorSpec("edit", edit_prompt="a blue circle"),
}
PROMPT = "a red circle"


def published_config(model: str) -> dict:
    return json.loads((CONFIGS / UNET_CONFIGS[model]).read_text())


_META_UNETS = {}


def meta_unet(model: str):
    """The model's full-size UNet with its weights on the meta device (no memory, no values), built once."""
    if model not in _META_UNETS:
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        with init_empty_weights():
            _META_UNETS[model] = UNet2DConditionModel.from_config(published_config(model))
    return _META_UNETS[model]


def shape_only_pipe(unet):
    """A stand-in pipeline for `use_processor`: the UNet plus a 77-token tokenizer (as CLIP's), no guidance."""
    return SimpleNamespace(unet=unet, tokenizer=tiny_tokenizer(max_length=77))


def use(unet, name: str, **kwargs):
    """Install processor `name` as `generate` would for a batch of two images (edit: source and edit)."""
    prompts = [PROMPT] if name == "edit" else [PROMPT, PROMPT]
    return use_processor(shape_only_pipe(unet), SPECS[name], prompts=prompts, steps=1, **kwargs)


def meta_forward(unet, latent_hw: tuple[int, int], batch: int = 2):
    """One shapes-only UNet call on a latent of `latent_hw`, with SDXL's added conditioning when the UNet has it."""
    meta = dict(device="meta")
    kwargs = {"encoder_hidden_states": torch.empty(batch, 77, unet.config.cross_attention_dim, **meta)}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop numbers
        time_ids = 6 * unet.config.addition_time_embed_dim
        text_embeds = unet.config.projection_class_embeddings_input_dim - time_ids
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text_embeds, **meta),
                                       "time_ids": torch.empty(batch, 6, **meta)}
    sample = torch.empty(batch, unet.config.in_channels, *latent_hw, **meta)
    with torch.no_grad():
        return unet(sample, torch.tensor(999, **meta), **kwargs).sample


# -- installing and restoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(UNET_CONFIGS))
def test_published_configs_have_the_expected_cross_attention_layers(model):
    unet = meta_unet(model)
    assert unet.device.type == "meta"
    layers = cross_attention_layers(unet)
    assert len(layers) == CROSS_ATTENTION_LAYERS[model]
    assert all(name.endswith(".attn2") for name in layers)
    assert len(unet.attn_processors) == 2 * len(layers)  # every transformer block: attn1 (self) + attn2 (cross)
    top_level = any(name.startswith("down_blocks.0.") for name in layers)
    assert top_level == (model != "sdxl")  # SDXL's first level (1/8 of the image) has no cross-attention


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("model", list(UNET_CONFIGS))
def test_each_processor_installs_on_exactly_the_cross_attention_layers_and_restores(model, name):
    unet = meta_unet(model)
    before = dict(unet.attn_processors)
    cross = {f"{layer}.processor" for layer in cross_attention_layers(unet)}
    with use(unet, name):
        during = unet.attn_processors
        ours = {key for key, proc in during.items() if isinstance(proc, CaptureProcessor)}
        assert ours == (set() if name == "default" else cross)
        assert all(during[key] is before[key] for key in before.keys() - ours)  # attn1 untouched
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)


@pytest.mark.parametrize("name", ["capture-exact", "capture-explicit", "reweight", "edit"])
def test_processors_are_restored_after_an_error_in_the_forward_pass(name):
    unet = meta_unet("sd15")
    before = dict(unet.attn_processors)
    with RaiseInsideForward(unet) as boom:  # the last cross-attention layer raises; fifteen others have run
        with pytest.raises(RuntimeError, match="boom inside the forward pass"):
            with use(unet, name):
                meta_forward(unet, (8, 8), batch=2)
    assert isinstance(boom.processor_seen, CaptureProcessor)
    assert all(unet.attn_processors[key] is proc for key, proc in before.items())
    assert not unet._forward_pre_hooks


# -- map sizes from shapes-only forward passes ---------------------------------------------------------------

SD_512 = [(64, 64), (32, 32), (16, 16), (8, 8)]  # 512 px -> latent 64: maps at 1/8, 1/16, 1/32, 1/64
SDXL_1024 = [(64, 64), (32, 32)]  # 1024 px -> latent 128: SDXL has no cross-attention at 1/8
HEADS = {  # heads per map size, from the configs' attention_head_dim (Diffusers reads it as a head count)
    "sd15": {64: 8, 32: 8, 16: 8, 8: 8},  # 8 heads at every level
    "sd21": {64: 5, 32: 10, 16: 20, 8: 20},  # [5, 10, 20, 20]: 64 channels per head
    "sdxl": {64: 10, 32: 20},  # [5, 10, 20]: the 5-head level has no cross-attention
}
STEERING = ["capture-exact", "capture-explicit", "reweight", "edit"]


@pytest.mark.parametrize("model, latent_hw, sizes, name", [
    *[("sd15", (64, 64), SD_512, name) for name in STEERING],
    ("sd21", (64, 64), SD_512, "capture-exact"),  # SD 1.5's layout; only widths, heads and projections differ
    *[("sdxl", (128, 128), SDXL_1024, name) for name in STEERING],
])
def test_meta_forward_records_maps_at_the_native_resolutions(model, latent_hw, sizes, name):
    unet = meta_unet(model)
    with use(unet, name, keep_heads=True) as store:
        out = meta_forward(unet, latent_hw)
    assert out.shape == (2, 4, *latent_hw)
    assert store.resolutions() == sizes
    assert set(store.layers) == set(cross_attention_layers(unet))
    assert all(count == 1 for count in store.counts.values())
    assert {(s.shape[0], s.shape[-1]) for s in store.sums.values()} == {(2, 77)}  # (images, h, w, tokens)
    assert {store.layer_shape(layer)[0]: store.num_heads(layer) for layer in store.layers} == HEADS[model]


@pytest.mark.parametrize("model, latent_hw, sizes", [
    # 640 x 520 px (W x H): 65 latent rows is odd, so each stride-2 level rounds up: 65 -> 33 -> 17 -> 9
    ("sd15", (65, 80), [(65, 80), (33, 40), (17, 20), (9, 10)]),
    ("sdxl", (152, 104), [(76, 52), (38, 26)]),  # 832 x 1216 portrait, one of SDXL's training buckets
    ("sdxl", (64, 64), [(32, 32), (16, 16)]),  # SDXL-Turbo's 512 px (same architecture as SDXL)
])
def test_meta_forward_records_non_square_and_smaller_maps(model, latent_hw, sizes):
    unet = meta_unet(model)
    with capture(unet) as store:
        meta_forward(unet, latent_hw)
    assert store.latent_hw == latent_hw
    assert store.resolutions() == sizes
    # the sizes read from the UNet's blocks (used to select layers by resolution) are the ones the forward made
    assert layer_sizes(unet, latent_hw) == {layer: store.layer_shape(layer) for layer in store.layers}


@pytest.mark.parametrize("model, latent_hw, selector, sizes", [
    ("sd15", (64, 64), "16", [(16, 16)]),
    ("sd15", (64, 64), "64, 8", [(64, 64), (8, 8)]),
    ("sd15", (65, 80), "17x20", [(17, 20)]),  # an exact h x w
    ("sd15", (65, 80), "20", [(17, 20)]),  # a bare number is the longer side
    ("sdxl", (128, 128), "32", [(32, 32)]),
    ("sdxl", (128, 128), "up_blocks.*, 64", [(64, 64), (32, 32)]),  # patterns and resolutions mix
])
def test_resolution_selectors_put_processors_on_that_resolutions_layers(model, latent_hw, selector, sizes):
    unet = meta_unet(model)
    before = dict(unet.attn_processors)
    with capture(unet, layers=[s.strip() for s in selector.split(",")], latent_size=latent_hw) as store:
        chosen = {k.removesuffix(".processor") for k, p in unet.attn_processors.items() if isinstance(p, CaptureProcessor)}
        meta_forward(unet, latent_hw)
    assert set(store.layers) == chosen
    assert sorted(store.resolutions(), reverse=True) == sizes
    assert dict(unet.attn_processors) == before


def test_a_resolution_the_unet_does_not_have_names_the_ones_it_has():
    unet = meta_unet("sd15")
    with pytest.raises(ValueError, match=r"layers='12'.*64x64, 32x32, 16x16, 8x8"):
        with capture(unet, layers="12"):
            pass


# -- one real forward pass of a full-size UNet -----------------------------------------------------------------


def test_full_size_sd15_unet_forward_on_cpu():
    """The one heavy test (~25 s, ~4 GB): random SD 1.5 weights, one UNet call at a 32x32 latent (256 px)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(published_config("sd15")).eval()
    try:
        sample = torch.randn(1, 4, 32, 32)
        text = torch.randn(1, 77, 768)
        with torch.no_grad(), capture(unet, "exact") as store:
            out = unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
        assert out.shape == sample.shape and torch.isfinite(out).all()
        assert store.resolutions() == [(32, 32), (16, 16), (8, 8), (4, 4)]
        assert len(store.layers) == 16 and store.timesteps == [500.0]
        for layer in store.layers:  # each pixel's probabilities over the 77 tokens sum to 1
            torch.testing.assert_close(store.sums[layer].sum(-1), torch.ones(store.sums[layer].shape[:-1]))
    finally:
        del unet
        gc.collect()


# -- presets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, source, family, size, steps, guidance", [
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, 30, 7.5),
    ("sd21", "stabilityai/stable-diffusion-2-1-base", "sd", 512, 30, 7.5),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, 30, 5.0),
    ("sdxl-turbo", "stabilityai/sdxl-turbo", "sdxl", 512, 4, 0.0),
])
def test_presets(name, source, family, size, steps, guidance):
    preset = load_presets()[name]
    assert (preset.source, preset.family, preset.height, preset.width) == (source, family, size, size)
    assert (preset.steps, preset.guidance) == (steps, guidance)
    assert preset.max_side >= size and preset.examples and preset.description
    assert preset.map_layers == "all"  # real checkpoints: every layer, as DAAM averages (not measured here)


def test_map_layers_is_checked():
    from crossattn_sd.config import ModelPreset

    assert load_presets()["tiny"].map_layers == "finest"  # measured best on the embedded model (README)
    with pytest.raises(ValueError, match="map_layers must be one of all, finest, last, got 'best'"):
        ModelPreset(name="x", source="x", map_layers="best")


def test_presets_command_lists_the_real_checkpoints(capsys):
    from crossattn_sd.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("sd15", "sd21", "sdxl", "sdxl-turbo"):
        assert any(line.split()[0] == name for line in out.splitlines())


# -- load_pipeline: sources, device, dtype, offload -------------------------------------------------------------


class FakePipeline:
    """What `from_pretrained` returned: records where it was moved and whether offload was asked for."""

    def __init__(self, source, torch_dtype):
        self.source, self.dtype, self.device, self.offloaded = source, torch_dtype, None, False
        self.unet = meta_unet("sd15")  # a real UNet class: load_pipeline checks the model's family

    def to(self, device):
        self.device = device
        return self

    def enable_model_cpu_offload(self):
        self.offloaded = True

    def set_progress_bar_config(self, **kwargs):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace `DiffusionPipeline.from_pretrained` with one that downloads nothing; returns the calls made."""
    from diffusers import DiffusionPipeline

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(FakePipeline(source, kwargs.get("torch_dtype", kwargs.get("dtype"))))
        return calls[-1]

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    return calls


def no_accelerator(monkeypatch, cuda=False, mps=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "sdxl-turbo"])
def test_a_preset_name_loads_its_hub_source_with_its_defaults(fake_hub, monkeypatch, name):
    from crossattn_sd.pipeline import load_pipeline

    no_accelerator(monkeypatch)
    pipe = load_pipeline(name)
    preset = load_presets()[name]
    assert pipe.source == preset.source == pipe.crossattn_source
    assert (pipe.device, pipe.dtype) == ("cpu", torch.float32)
    defaults = pipe.crossattn_defaults
    assert (defaults.steps, defaults.guidance, defaults.height, defaults.width) == (
        preset.steps, preset.guidance, preset.height, preset.width)


@pytest.mark.parametrize("cuda, mps, device, dtype", [
    (True, False, "cuda", torch.float16),  # real checkpoints in half precision on CUDA
    (False, True, "mps", torch.float32),
    (False, False, "cpu", torch.float32),
])
def test_device_and_dtype_follow_the_available_accelerator(fake_hub, monkeypatch, cuda, mps, device, dtype):
    from crossattn_sd.pipeline import default_device, load_pipeline

    no_accelerator(monkeypatch, cuda=cuda, mps=mps)
    assert default_device() == device
    pipe = load_pipeline("sdxl")
    assert (pipe.device, pipe.dtype, pipe.offloaded) == (device, dtype, False)


def test_explicit_device_dtype_and_offload_win(fake_hub, monkeypatch):
    from crossattn_sd.pipeline import load_pipeline

    no_accelerator(monkeypatch, cuda=True)
    pipe = load_pipeline("sd15", device="cpu", dtype="bfloat16")
    assert (pipe.device, pipe.dtype) == ("cpu", torch.bfloat16)
    pipe = load_pipeline("sd15", dtype=torch.float32, offload=True)
    assert (pipe.device, pipe.dtype, pipe.offloaded) == (None, torch.float32, True)  # offload moves it, not .to()


def test_a_local_folder_loads_from_that_folder(fake_hub, monkeypatch, tmp_path):
    from crossattn_sd.pipeline import load_pipeline

    no_accelerator(monkeypatch, cuda=True)
    (tmp_path / "model_index.json").write_text("{}")
    pipe = load_pipeline(str(tmp_path))
    assert pipe.source == tmp_path and pipe.dtype == torch.float16
    assert pipe.crossattn_defaults.steps == 30 and pipe.crossattn_defaults.height is None  # the UNet's own size


def test_a_local_pipeline_folder_really_loads(sd_pipe_dir):
    from crossattn_sd.pipeline import load_pipeline

    pipe = load_pipeline(str(sd_pipe_dir), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.dtype == torch.float32
    assert pipe.crossattn_source == str(sd_pipe_dir)


@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), ("bfloat16", torch.bfloat16),
                                             (torch.float16, torch.float16)])
def test_a_saved_pipeline_really_loads_in_the_chosen_dtype(sd_pipe_dir, dtype, expected):
    from crossattn_sd.pipeline import generate, load_pipeline

    pipe = load_pipeline(str(sd_pipe_dir), device="cpu", dtype=dtype)  # the fp32 files, read for real
    for part in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(pipe, part).parameters()} == {expected}, part
        assert {p.device.type for p in getattr(pipe, part).parameters()} == {"cpu"}, part
    if expected == torch.bfloat16:  # it runs in that precision too, and its maps are kept in float32
        result = generate(pipe, "a red square", steps=1, height=16, width=16)
        assert result.images[0].size == (16, 16)
        assert result.heatmap("red").dtype == np.float32 and np.isfinite(result.heatmap("red")).all()


def test_missing_folder_is_a_file_not_found_error(tmp_path):
    from crossattn_sd.pipeline import load_pipeline

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_hub_ids_can_be_refused_but_presets_stay_allowed(fake_hub):
    from crossattn_sd.pipeline import load_pipeline

    with pytest.raises(PermissionError, match="'someone/some-model'"):
        load_pipeline("someone/some-model", allow_hub=False)
    assert fake_hub == []
    load_pipeline("sdxl-turbo", allow_hub=False, device="cpu")  # the web UI's case: presets only
    assert fake_hub[-1].source == "stabilityai/sdxl-turbo"


def test_an_uncached_hub_id_offline_says_how_to_work_offline(monkeypatch):
    from crossattn_sd.pipeline import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_pipeline("crossattn-sd-tests/no-such-model", device="cpu")
    message = str(err.value)
    assert "crossattn-sd-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download" in message


def test_serve_passes_model_device_dtype_and_offload_to_the_pipeline(fake_hub, monkeypatch):
    # what `python app.py --model sd15 --dtype bfloat16 --offload` does, short of serving: the UI's service
    # loads the preset's Hub source (from the cache, here the fake hub) with the chosen device settings
    import crossattn_sd.ui as ui

    launched = []
    monkeypatch.setattr(ui, "launch", lambda demo, **kw: launched.append((demo, kw)))
    built = []
    monkeypatch.setattr(ui, "build_demo", lambda service: built.append(service) or "demo")
    from crossattn_sd.cli import main

    no_accelerator(monkeypatch, cuda=True)
    assert main(["serve", "--model", "sd15", "--dtype", "bfloat16", "--offload", "--outputs", "", "--port", "7999"]) == 0
    (service,), ((demo, kw),) = built, launched
    assert demo == "demo" and kw["server_port"] == 7999 and kw["server_name"] == "127.0.0.1"
    pipe = service.pipe
    assert pipe.source == load_presets()["sd15"].source
    assert (pipe.dtype, pipe.offloaded) == (torch.bfloat16, True)
