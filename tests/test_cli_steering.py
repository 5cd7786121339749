"""`crossattn-sd generate` with the steering processors, and `crossattn-sd compare`, in process."""
import json

import numpy as np
import pytest
from PIL import Image

from crossattn_sd.cli import main

PROMPT = "a red circle, on the left"
EDIT = "a blue circle, on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
EDIT_WORDS = ["a", "blue", "circle", "on", "the", "left"]


def args(command, out, model, *extra):
    return [command, PROMPT, "--out", str(out), "--model", str(model), "--steps", "2", "--guidance", "3",
            "--height", "32", "--width", "48", "--quiet", *extra]


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_generate_with_reweight(sd_pipe_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args("generate", out, sd_pipe_dir, "--processor", "reweight", "--weights", "circle:2")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["processor"] == {"name": "reweight", "mode": "exact", "weights": [["circle", 2.0]],
                                             "edit_prompt": None, "inject": 0.8, "layers": "*"}
    assert meta["settings"]["mode"] == "exact"  # reweight runs through the values at SDPA speed
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == sorted(WORDS)
    assert sorted(p.name for p in out.glob("overlay-*.png")) == sorted(f"overlay-{w}.png" for w in WORDS)


def test_layers_by_resolution(sd_pipe_dir, tmp_path):
    # 32 x 48 px, VAE factor 2: a 16 x 24 latent, cross-attention maps at 16x24 and 8x12
    runs = {}
    for layers in ("*", "8x12", "24", "16x24", "24, 8x12"):
        out = tmp_path / layers.replace("*", "all").replace(", ", "+")
        assert main(args("generate", out, sd_pipe_dir, "--processor", "reweight", "--weights", "circle:0",
                         "--layers", layers)) == 0
        assert json.loads((out / "meta.json").read_text())["settings"]["processor"]["layers"] == layers
        runs[layers] = pixels(out / "image.png")
    # "24" (longer side 24) is exactly the 16x24 layers: neither every layer nor the 8x12 ones
    assert np.array_equal(runs["24"], runs["16x24"])
    assert not np.array_equal(runs["24"], runs["*"]) and not np.array_equal(runs["24"], runs["8x12"])
    assert not np.array_equal(runs["8x12"], runs["*"])
    assert np.array_equal(runs["24, 8x12"], runs["*"])  # the two levels together are every layer


def test_generate_with_edit_writes_source_and_edit(sd_pipe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args("generate", out, sd_pipe_dir, "--processor", "edit", "--edit-prompt", EDIT,
                     "--inject", "0.5")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompts"] == [PROMPT, EDIT] and meta["settings"]["edit_source_prompt"] == PROMPT
    assert meta["settings"]["processor"]["inject"] == 0.5
    with Image.open(out / "image-1.png") as im:
        assert im.size == (48, 32) and im.text["parameters"].splitlines()[0] == EDIT
    with np.load(out / "maps.npz") as maps:  # the source's words, then the edit's as "1/<word>"
        assert sorted(maps.files) == sorted(WORDS + [f"1/{w}" for w in EDIT_WORDS])
    overlays = sorted(p.name for p in out.glob("overlay-*.png"))
    assert overlays == sorted([f"overlay-{w}.png" for w in WORDS] + [f"overlay-1-{w}.png" for w in EDIT_WORDS])

    only = tmp_path / "only-blue"  # --word picks the images whose prompt has the word
    assert main(args("generate", only, sd_pipe_dir, "--processor", "edit", "--edit-prompt", EDIT,
                     "--word", "blue")) == 0
    assert [p.name for p in only.glob("overlay-*.png")] == ["overlay-1-blue.png"]
    capsys.readouterr()
    assert main(args("generate", tmp_path / "bad", sd_pipe_dir, "--processor", "edit", "--edit-prompt", EDIT,
                     "--word", "zebra")) == 2
    assert "word 'zebra' is not in the prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra,named", [
    (["--processor", "reweight", "--weights", "circle"], "bad weight 'circle'"),
    (["--processor", "reweight", "--weights", "circle:2, red:x"], "bad weight 'red:x'"),
    (["--processor", "reweight", "--weights", "zebra:2"], "word 'zebra' is not in the prompt; the prompt's words are: "
                                                          "'a', 'red', 'circle', 'on', 'the', 'left'"),
    (["--processor", "reweight"], "the reweight processor needs weights"),
    (["--processor", "edit"], "the edit processor needs an edit prompt"),
    (["--processor", "edit", "--edit-prompt", EDIT, "--inject", "2"], "inject=2.0 is out of range"),
    (["--processor", "reweight", "--weights", "red:2", "--layers", "mid"], "layers='mid' matches no"),
    (["--processor", "reweight", "--weights", "red:2", "--layers", "5"], "map sizes are 16x24, 8x12"),
])
def test_bad_steering_flags_exit_2_with_one_line(sd_pipe_dir, tmp_path, capsys, extra, named):
    assert main(args("generate", tmp_path / "run", sd_pipe_dir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossattn-sd: error: ") and named in err, err


def test_compare_writes_both_runs_the_sheet_the_difference_and_a_summary(sd_pipe_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(args("compare", out, sd_pipe_dir, "--processor", "reweight", "--weights", "circle:2")) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "compare.json", "compare.png", "difference.png"]
    # A: the capture baseline (as in the web UI's Compare tab) records maps too
    assert len(list((out / "a").glob("overlay-*.png"))) == len(WORDS)
    assert len(list((out / "b").glob("overlay-*.png"))) == len(WORDS)
    a, b = pixels(out / "a" / "image.png"), pixels(out / "b" / "image.png")
    summary = json.loads((out / "compare.json").read_text())
    assert summary["a"]["name"] == "capture" and summary["b"]["name"] == "reweight"
    assert summary["max_abs_pixel_difference"] == int(np.abs(a - b).max()) > 0
    assert summary["mean_abs_pixel_difference"] == pytest.approx(float(np.abs(a - b).mean()))
    with Image.open(out / "difference.png") as diff, Image.open(out / "compare.png") as sheet:
        assert diff.size == (48, 32) and sheet.width >= 3 * 48 and sheet.height >= 32
        assert np.asarray(diff).max() == 255  # scaled so the largest difference is white


def test_compare_capture_exact_against_default_is_zero(sd_pipe_dir, tmp_path):
    out = tmp_path / "cmp"
    assert main(args("compare", out, sd_pipe_dir, "--processor-a", "default", "--processor", "capture")) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["max_abs_pixel_difference"] == 0 and summary["mean_abs_pixel_difference"] == 0.0
    assert (out / "b" / "overlay-circle.png").is_file()


def test_compare_an_edit_against_the_edited_image(sd_pipe_dir, tmp_path):
    out = tmp_path / "cmp"
    assert main(args("compare", out, sd_pipe_dir, "--processor-a", "capture", "--mode", "explicit",
                     "--processor", "edit", "--edit-prompt", EDIT)) == 0
    a, edited = pixels(out / "a" / "image.png"), pixels(out / "b" / "image-1.png")
    assert np.array_equal(pixels(out / "b" / "image.png"), a)  # the edit's source is the plain image
    summary = json.loads((out / "compare.json").read_text())
    assert summary["max_abs_pixel_difference"] == int(np.abs(a - edited).max()) > 0
