"""Per-step maps kept small: the prompt's real token columns, float16, per resolution; same maps, bundles, budget."""
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import tiny_sd3_pipeline, tiny_sd_pipeline
from crossattn_sd import generate, load_result
from crossattn_sd.aggregate import token_maps
from crossattn_sd.maps import MapStore, resolution_key
from crossattn_sd.processors import CaptureProcessor, capture, guidance_probe, install
from crossattn_sd.tokens import align_prompt, prompt_columns

PROMPT = "a red circle, on the left"  # a comma: a real token that is in no word
KW = dict(steps=3, guidance_scale=3.0, height=32, width=48, seed=1, per_step=True)
SIZES = [(16, 24), (8, 12)]  # the tiny UNet's map sizes at 32 x 48


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def full(pipe):
    return generate(pipe, PROMPT, per_step_tokens="all", **KW)


@pytest.fixture(scope="module")
def real(pipe):
    return generate(pipe, PROMPT, **KW)  # the default: the prompt's own columns


def every_map(result, **filters):
    words = [*dict.fromkeys(result.words), "<start>", "<end>"]
    return {w: result.heatmap(w, normalize_by="none", **filters) for w in words}


def test_prompt_columns_run_from_start_to_end_and_leave_padding_out(pipe):
    a = align_prompt(pipe.tokenizer, PROMPT)
    cols = prompt_columns([a])
    assert cols == list(range(a.special_indices["end"][0] + 1))  # start .. end, the comma included
    assert not set(cols) & set(a.special_indices["pad"]) and len(cols) < len(a.tokens)
    longer = align_prompt(pipe.tokenizer, PROMPT + " and a blue square")
    assert prompt_columns([a, longer]) == prompt_columns([longer])  # the union over prompts


def test_real_columns_give_the_same_heat_maps_as_every_column(full, real):
    assert np.array_equal(np.asarray(full.images[0]), np.asarray(real.images[0]))
    num_tokens = len(real.alignments[0].tokens)
    kept = real.store.step_columns
    assert kept == tuple(prompt_columns(real.alignments)) and len(kept) < num_tokens
    layer = real.store.layers[0]
    assert real.store.steps[0][layer].shape[-1] == len(kept) + 1  # the kept columns and the rest's sum
    assert full.store.steps[0][layer].shape[-1] == num_tokens
    assert real.store.step_bytes * num_tokens == full.store.step_bytes * (len(kept) + 1)
    for filters in ({"steps": range(3)}, {"steps": [1]}, {"steps": [0, 2], "resolutions": [12]},
                    {"steps": [2], "layers": "up_blocks.*"}, {}):
        a, b = every_map(full, **filters), every_map(real, **filters)
        for word in a:
            assert a[word].tobytes() == b[word].tobytes(), (word, filters)  # exactly, every word


def test_real_columns_keep_each_rows_total(full, real):
    """The rest column keeps every pixel's total, so maps renormalised over the text (text_share=False) agree."""
    for layer in real.store.layers:
        torch.testing.assert_close(real.store.layer_total(layer, steps=[0, 1]),
                                   full.store.layer_total(layer, steps=[0, 1]), rtol=0, atol=1e-6)
        kept = list(real.store.step_columns)
        torch.testing.assert_close(real.store.layer_mean(layer, steps=[2])[..., kept],
                                   full.store.layer_mean(layer, steps=[2])[..., kept], rtol=0, atol=0)
    groups = [real.alignments[0].indices_of(w) for w in real.words]
    a = token_maps(full.store, groups, (32, 48), steps=[0, 1], text_share=False)
    b = token_maps(real.store, groups, (32, 48), steps=[0, 1], text_share=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_joint_attention_rows_keep_their_text_share():
    """SD3: a row's text columns sum to less than 1 and padding has its share; text_share=False stays the same."""
    pipe = tiny_sd3_pipeline()
    kw = dict(steps=2, guidance_scale=3.0, height=32, width=32, per_step=True, max_sequence_length=8)
    full = generate(pipe, "a red circle", per_step_tokens="all", **kw)
    real = generate(pipe, "a red circle", **kw)
    assert len(real.store.step_columns) < len(real.alignments[0].tokens)
    groups = [real.alignments[0].indices_of(w) for w in real.words]
    for share in (True, False):
        a = token_maps(full.store, groups, (32, 32), steps=[1], text_share=share)
        b = token_maps(real.store, groups, (32, 32), steps=[1], text_share=share)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_float16_per_step_maps_are_half_the_bytes_and_close(pipe, real):
    half = generate(pipe, PROMPT, per_step_dtype="float16", **KW)
    assert half.store.steps[0][half.store.layers[0]].dtype == torch.float16
    assert 2 * half.store.step_bytes == real.store.step_bytes
    a, b = every_map(real, steps=[0, 2]), every_map(half, steps=[0, 2])
    for word in a:
        np.testing.assert_allclose(b[word], a[word], rtol=0, atol=2e-3 * float(a[word].max()))
    for layer in real.store.layers:  # the running sums stay float32 and exact
        assert torch.equal(half.store.sums[layer], real.store.sums[layer])
    assert half.settings["per_step_dtype"] == "float16"


@pytest.mark.parametrize("mode", ["exact", "explicit"])  # exact: batched at the end; explicit: one call at a time
def test_per_resolution_maps_are_the_sums_of_their_layers(pipe, mode):
    layered = generate(pipe, PROMPT, mode=mode, **KW)
    by_res = generate(pipe, PROMPT, mode=mode, per_step_by="resolution", **KW)
    store, ref = by_res.store, layered.store
    assert store.resolutions() == ref.resolutions() == SIZES
    for step, ref_step in zip(store.steps, ref.steps, strict=True):
        assert sorted(step) == sorted(resolution_key(hw) for hw in SIZES)
        for hw in SIZES:
            layers = [l for l in ref.layers if ref.layer_shape(l) == hw]
            torch.testing.assert_close(step[resolution_key(hw)], sum(ref_step[l] for l in layers), rtol=0, atol=1e-6)
    assert store.step_bytes < ref.step_bytes
    for filters in ({"steps": range(3)}, {"steps": [1], "resolutions": [24]}):
        a, b = every_map(layered, **filters), every_map(by_res, **filters)
        for word in a:
            np.testing.assert_allclose(b[word], a[word], rtol=0, atol=1e-6)
    for layer in ref.layers:  # the sums are kept per layer as before
        assert torch.equal(store.sums[layer], ref.sums[layer])
    assert by_res.heatmap("red", layers=ref.layers[0]).tobytes() == layered.heatmap("red", layers=ref.layers[0]).tobytes()
    with pytest.raises(ValueError, match="a step range takes all 16x24 layers"):
        by_res.heatmap("red", steps=[0], layers=ref.layers[0])
    with pytest.raises(ValueError, match="per-step maps were kept per resolution"):
        store.layer_mean(ref.layers[0], steps=[0])


@pytest.mark.parametrize("defer_bytes", [0, 20_000])
def test_per_resolution_sums_do_not_depend_on_when_the_store_flushes(pipe, defer_bytes):
    """Flushes in the middle of a step (a small defer_bytes) must not close a step's sum before all its layers."""
    kw = dict(per_step=True, step_columns=prompt_columns([align_prompt(pipe.tokenizer, PROMPT)]),
              per_step_by="resolution")
    generator = torch.Generator().manual_seed(0)
    call = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=48, output_type="latent")
    with capture(pipe, **kw) as batched:
        pipe(PROMPT, generator=generator, **call)
    other = MapStore(cfg=guidance_probe(pipe), defer_bytes=defer_bytes, **kw)
    with install(pipe.unet, other, lambda s, layer, _original: CaptureProcessor(s, layer)):
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call)
    assert other.step_bytes == batched.step_bytes
    for a, b in zip(other.steps, batched.steps, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"per_step_dtype": "float16", "per_step_by": "resolution"}])
def test_bundles_round_trip_compact_per_step_maps(pipe, tmp_path, options):
    result = generate(pipe, PROMPT, **KW, **options)
    back = load_result(result.save(tmp_path / "run"))
    store = back.store
    assert store.step_columns == result.store.step_columns and store.per_step_by == result.store.per_step_by
    assert store.per_step_dtype == result.store.per_step_dtype and store.step_bytes == result.store.step_bytes
    for filters in ({"steps": [0, 1]}, {}):
        a, b = every_map(result, **filters), every_map(back, **filters)
        assert all(a[w].tobytes() == b[w].tobytes() for w in a)
    assert back.settings == result.settings


def rewrite_tensors(folder, change):
    """Change a saved result's attention.safetensors and its checksum in meta.json (a consistent forgery)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "attention.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "attention.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"]["attention.safetensors"] = hashlib.sha256((folder / "attention.safetensors").read_bytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update(step_columns=torch.tensor([0, 99])), "step_columns are not distinct token indices"),
    (lambda t: t.update(step_columns=torch.tensor([0.5])), "'step_columns' is not a 1-D list"),
    (lambda t: t.pop("step_columns"), "has shape"),  # the maps are compact, but no columns say so
    (lambda t: t.update({"step/0/resolution:3x3": torch.zeros(1, 3, 3, 2)}), "mix per-layer and per-resolution"),
])
def test_bundles_with_inconsistent_per_step_maps_are_refused(pipe, real, tmp_path, damage, message):
    folder = real.save(tmp_path / "run", word_maps=False)
    rewrite_tensors(folder, damage)
    with pytest.raises(ValueError, match=message):
        load_result(folder)


def test_budget_counts_the_bytes_kept(pipe, real):
    half_res = dict(per_step_dtype="float16", per_step_by="resolution")
    small = generate(pipe, PROMPT, **KW, **half_res)
    one_step = sum(m.numel() * 2 for m in small.store.steps[0].values())
    assert small.store.step_bytes == 3 * one_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what fits, fits: no warning
        fits = generate(pipe, PROMPT, max_step_bytes=3 * one_step, **KW, **half_res)
    assert fits.store.has_steps
    with pytest.warns(RuntimeWarning, match="per_step_dtype=float16 or per_step_by='resolution'") as caught:
        cut = generate(pipe, PROMPT, max_step_bytes=3 * one_step - 1, **KW, **half_res)
    assert len(caught) == 1 and cut.store.steps_dropped and cut.store.steps == [] and cut.store.step_bytes == 0
    for layer in real.store.layers:
        assert torch.equal(cut.store.sums[layer], real.store.sums[layer])
    with pytest.warns(RuntimeWarning):  # the same budget drops the float32 per-layer timeline
        assert generate(pipe, PROMPT, max_step_bytes=3 * one_step, **KW).store.steps_dropped


def test_bad_per_step_options_are_refused_before_the_run(pipe):
    for option, value in (("per_step_tokens", "some"), ("per_step_dtype", "int8"), ("per_step_by", "block")):
        with pytest.raises(ValueError, match=f"{option}='{value}' is not known"):
            generate(pipe, PROMPT, **{**KW, option: value})


def test_batch_rows_and_cli_flags_choose_how_per_step_maps_are_kept(sd_pipe_dir, tmp_path):
    from crossattn_sd.cli import main

    rows = [{"prompt": "a red circle", "per_step": True, "per_step_dtype": "float16", "per_step_by": "resolution"},
            {"prompt": "a blue square", "per_step": True},  # the command line's defaults below
            {"prompt": "a red square", "per_step": True, "per_step_by": "block"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--model", str(sd_pipe_dir), "--steps", "2",
                 "--height", "32", "--width", "32", "--threads", "1", "--quiet", "--per-step-tokens", "all"]) == 0
    lines = [json.loads(s) for s in (out / "index.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok", "failed"]
    assert "per_step_by='block' is not known" in lines[2]["error"]
    first, second = (load_result(out / line["name"]) for line in lines[:2])
    assert first.store.per_step_by == "resolution" and first.store.per_step_dtype == torch.float16
    assert first.store.step_columns is None  # --per-step-tokens all, the run's default
    assert second.store.per_step_by == "layer" and second.settings["per_step_tokens"] == "all"
