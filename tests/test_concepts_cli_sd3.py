"""Concept maps on joint-attention transformers (ConceptAttention, families/concepts_sd3.py), in the CLI and the
service (the web UI's Generate panel)."""

import json

import numpy as np
import pytest
import torch

import crossattn_sd
from crossattn_sd.cli import main
from conftest import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT = "a red square on the left and a blue cat on the right"


def pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.mark.parametrize("mode", ["exact", "explicit"])
def test_sd3_concepts_leave_the_image_bit_identical_and_map_in_the_output_space(mode):
    pipe = tiny_sd3_pipeline()
    run = dict(steps=2, height=32, width=48, guidance_scale=2.0, mode=mode)  # an 8 x 12 token grid, two halves
    plain = crossattn_sd.generate(pipe, PROMPT, **run)
    result = crossattn_sd.generate(pipe, PROMPT, concepts=["green", "cat", "left"], per_step=True, **run)
    assert np.abs(pixels(plain) - pixels(result)).max() == 0
    for word in plain.words:
        np.testing.assert_array_equal(plain.heatmap(word), result.heatmap(word))
    assert result.concept_kinds == ["output", "attention"]
    for kind in result.concept_kinds:
        store = result.store.concepts.stores[kind]
        assert store.layers == result.store.layers and store.num_steps == 2 and store.has_steps
        for layer in store.layers:  # a softmax over the concepts at every image token
            share = store.layer_mean(layer)[0].sum(-1)
            assert share.shape == (8, 12)
            torch.testing.assert_close(share, torch.ones_like(share))
    assert not np.array_equal(result.heatmap("green", kind="output"), result.heatmap("green", kind="attention"))


def test_tiny_mmdit_concepts_leave_the_image_bit_identical():
    pipe = crossattn_sd.load_pipeline("tiny-mmdit", device="cpu")
    prompt = "a red circle on the left and a blue square on the right"
    plain = crossattn_sd.generate(pipe, prompt, seed=1, steps=8)
    result = crossattn_sd.generate(pipe, prompt, seed=1, steps=8, concepts=["triangle", "green", "circle"])
    assert np.abs(pixels(plain) - pixels(result)).max() == 0
    assert result.heatmap("triangle").shape == (64, 64)


def test_flux_concepts_are_refused_in_one_line():
    with pytest.raises(ValueError, match="concept maps are not available for FluxTransformer2DModel .* yet") as err:
        crossattn_sd.generate(tiny_flux_pipeline(), PROMPT, steps=1, height=32, width=32, concepts=["green"])
    assert "\n" not in str(err.value)


def test_cli_concepts_write_their_maps_and_overlays(sd_pipe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", PROMPT, "--out", str(out), "--model", str(sd_pipe_dir), "--steps", "2", "--height",
                 "32", "--width", "48", "--quiet", "--concept", "green", "--concept", "cat",
                 "--concept-kind", "concepts-only"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["concepts"] == ["green", "cat"] and meta["concepts"]["default_kind"] == "concepts-only"
    with np.load(out / "maps.npz") as maps:
        assert {"concept/green", "concept/cat", "cat"} <= set(maps.files)
    assert (out / "overlay-concept-green.png").is_file() and (out / "overlay-concept-cat.png").is_file()
    again = crossattn_sd.load_result(out)
    assert again.concepts == ["green", "cat"] and again.concept_kinds[0] == "concepts-only"


@pytest.mark.parametrize("extra, message", [
    (["--concept", " "], "a concept is empty"),
    (["--concept", "red circle"], "concept 'red circle' is 2 words"),
    (["--concept", "dog"], "concept 'dog' is not a word this model knows"),  # the embedded model (default)
    (["--concept", "green", "--processor", "default"], "--concept needs maps; the default processor records none"),
])
def test_cli_bad_concepts_exit_2_in_one_line_before_the_model_loads(monkeypatch, tmp_path, capsys, extra, message):
    import crossattn_sd.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "a red circle", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_batch_rows_take_concepts(tmp_path):
    from crossattn_sd.batch import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a red circle", "concepts": ["triangle", "green"]}\n{"prompt": "a blue square"}\n')
    rows = read_rows(path, {"concepts": "circle"})
    assert [r.options["concepts"] for r in rows] == ["triangle, green", "circle"]


def test_the_service_maps_the_concepts_field_and_refuses_bad_ones():
    import dataclasses

    from conftest import tiny_sd_pipeline
    from crossattn_sd.config import load_presets
    from crossattn_sd.service import AttentionService, GenerateRequest

    preset = dataclasses.replace(load_presets()["tiny"], steps=2, height=32, width=32, max_side=64, vocabulary=())
    service = AttentionService(preset, pipe=tiny_sd_pipeline(0))
    entry = service.generate(GenerateRequest(prompt=PROMPT, concepts="green, cat"))
    assert entry.result.concepts == ["green", "cat"]
    assert entry.words[-1] == "green" and entry.words.count("cat") == 1  # the chips: prompt words, then concepts
    assert service.recorded_settings(entry)["concepts"] == "green, cat"
    service.overlay(entry, "green")
    with pytest.raises(ValueError, match="concept 'red circle' is 2 words"):
        service.generate(GenerateRequest(prompt=PROMPT, concepts="red circle"))
