"""`crossattn-sd inspect` (the bundle of an existing image) and `crossattn-sd eval-seg` (segmentation on the shapes
world), in-process on the embedded model; bad input exits 2 with one line, before the model loads."""
import json

import numpy as np
import pytest
from PIL import Image

from crossattn_sd.bundle_load import load_result
from crossattn_sd.cli import build_parser, main
from crossattn_sd.tiny.segment import format_summary, main as seg_main
from crossattn_sd.tiny.world import Scene, place, render

CAPTION = "a red circle on the left and a blue square on the right"


@pytest.fixture
def scene_png(tmp_path):
    path = tmp_path / "scene.png"
    big = Image.fromarray(render(Scene((place("red", "circle", "left"), place("blue", "square", "right")))))
    big.resize((96, 96), Image.NEAREST).save(path)  # not the model's 64 x 64: the maps come back at 96 x 96
    return path


def test_inspect_writes_the_bundle_with_the_image_itself(scene_png, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["inspect", str(scene_png), "--prompt", CAPTION, "--out", str(out), "--word", "circle",
                 "--word", "triangle", "--concept", "triangle"]) == 0  # --word picks a concept's overlay too
    assert "wrote" in capsys.readouterr().out
    with Image.open(out / "image.png") as im, Image.open(scene_png) as original:
        assert im.size == (96, 96) and np.array_equal(np.asarray(im), np.asarray(original.convert("RGB")))
    with np.load(out / "maps.npz") as maps:
        assert maps["circle"].shape == (96, 96) and "square" in maps.files
    assert sorted(p.name for p in out.glob("overlay-*.png")) == ["overlay-circle.png", "overlay-concept-triangle.png"]
    with np.load(out / "maps.npz") as maps:
        assert maps["concept/triangle"].shape == (96, 96)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["inspect"]["t"] == 0.5 and meta["settings"]["inspect"]["image_size"] == [96, 96]
    assert load_result(out).heatmap("circle").shape == (96, 96)


def test_inspect_defaults_its_folder_next_to_the_image(scene_png):
    assert main(["inspect", str(scene_png), "--prompt", "a red circle on the left", "--t", "0.3",
                 "--passes", "2", "--fit", "crop"]) == 0
    meta = json.loads((scene_png.parent / "scene-maps" / "meta.json").read_text())
    assert meta["settings"]["inspect"]["passes"] == 2 and meta["settings"]["inspect"]["fit"] == "crop"


@pytest.mark.parametrize("extra, named", [
    (["--prompt", " "], "the prompt is empty"),
    (["--t", "0"], "t=0.0 is out of range"),
    (["--t", "1.01"], "t=1.01 is out of range"),
    (["--passes", "0"], "passes=0 is out of range"),
    (["--alpha", "2"], "alpha=2.0 is out of range"),
    (["--word", "zebra"], "'zebra'"),
    (["--concept", "dog"], "concept 'dog' is not a word this model knows"),
    (["--concept", " "], "a concept is empty"),
])
def test_bad_values_exit_2_with_one_line(scene_png, tmp_path, capsys, extra, named):
    argv = ["inspect", str(scene_png), "--prompt", CAPTION, "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossattn-sd: error: ") and named in err, err


def test_a_file_that_is_not_an_image_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import crossattn_sd.pipeline

    monkeypatch.setattr(crossattn_sd.pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path, named in ((notes, "notes.txt is not an image"), (tmp_path / "gone.png", "'" + str(tmp_path / "gone.png")
                                                                  + "' does not exist"), (tmp_path, "is not a file")):
        assert main(["inspect", str(path), "--prompt", CAPTION]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


def test_inspect_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = capsys.readouterr().out
    parser = build_parser()._subparsers._group_actions[0].choices["inspect"]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text, flag


def test_eval_seg_scores_rendered_scenes_against_the_baselines(tmp_path, capsys):
    """Two rendered scenes: the embedded model's colour and shape words beat both baselines at both thresholds."""
    path = tmp_path / "seg.json"
    assert seg_main(["--n", "2", "--no-generated", "--threads", "1", "--json", str(path)]) == 0
    summary = json.loads(path.read_text())
    scores = summary["scores"]
    for kind in ("colour", "shape"):
        for thr in ("0.4max", "mean"):
            got = scores[f"rendered/{kind}/default view/{thr}"]
            best = max(scores[f"rendered/{kind}/{b}/{thr}"]["miou"] for b in ("uniform", "gaussian"))
            assert got["n"] == 4 and got["miou"] > 2 * best, (kind, thr, got, best)
    assert scores["rendered/colour/uniform/mean"]["miou"] == scores["rendered/colour/uniform/0.4max"]["miou"] > 0
    text = capsys.readouterr().out
    assert text == format_summary(summary) + "\n" and "rendered images" in text


def test_eval_seg_refuses_bad_values(capsys):
    assert seg_main(["--t", "2"]) == 2
    assert "t=2.0 is out of range" in capsys.readouterr().err
