"""`crossattn-sd generate` end to end (in-process for speed, plus one real console-script run) and its errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossattn_sd import __version__
from crossattn_sd.cli import build_parser, main

PROMPT = "a red circle, on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]


def args(out, model, *extra):
    return ["generate", PROMPT, "--out", str(out), "--model", str(model), "--steps", "2", "--guidance", "3",
            "--height", "32", "--width", "48", "--quiet", *extra]


def test_generate_writes_image_maps_meta_and_overlays(sd_pipe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(out, sd_pipe_dir)) == 0
    assert "wrote" in capsys.readouterr().out

    with Image.open(out / "image.png") as im:
        assert im.size == (48, 32)
        assert PROMPT in im.text["parameters"] and "steps: 2" in im.text["parameters"]
    with np.load(out / "maps.npz") as maps:
        assert sorted(maps.files) == sorted(set(WORDS))
        for word in maps.files:
            assert maps[word].dtype == np.float32 and maps[word].shape == (32, 48)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prompts"] == [PROMPT] and meta["settings"]["prompt"] == PROMPT
    assert meta["words"] == WORDS and meta["dropped_words"] == []
    assert meta["settings"]["steps"] == 2 and meta["settings"]["guidance_scale"] == 3.0
    assert meta["model"] == str(sd_pipe_dir)
    assert meta["versions"]["crossattn_sd"] == __version__
    assert {"diffusers", "transformers", "torch"} <= set(meta["versions"])
    assert (out / "attention.safetensors").is_file()
    overlays = sorted(p.name for p in out.glob("overlay-*.png"))
    assert overlays == sorted(f"overlay-{w}.png" for w in set(WORDS))
    with Image.open(out / "overlay-circle.png") as im:
        assert im.size == (48, 32) and im.mode == "RGB"


def test_word_flag_restricts_overlays_and_dropped_words_are_reported(sd_pipe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    long_prompt = "a red square on the left and a blue circle"  # "circle" is cut by the 16-token limit
    argv = args(out, sd_pipe_dir, "--word", "red", "--word", "Blue")
    argv[1] = long_prompt
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("overlay-*.png")) == ["overlay-Blue.png", "overlay-red.png"]
    assert "dropped: circle" in capsys.readouterr().err
    assert json.loads((out / "meta.json").read_text())["dropped_words"] == ["circle"]


@pytest.mark.parametrize("command, at_least", [("generate", 20), ("compare", 20), ("serve", 10)])
def test_help_documents_every_flag(capsys, command, at_least):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    flags = [s for action in parser._actions for s in action.option_strings]
    assert len(flags) > at_least
    for flag in flags:
        assert flag in text, flag
    for action in parser._actions:  # each has its own help text, shown under the flag
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.split("%")[0][:30] in " ".join(text.split()), action.dest


@pytest.mark.parametrize("extra,named", [
    (["--steps", "0"], "steps=0"),
    (["--height", "33"], "height=33"),
    (["--height", "0"], "height=0"),
    (["--word", "zebra"], "'zebra'"),
    (["--cmap", "nope"], "'nope'"),
])
def test_bad_values_exit_2_with_one_line(sd_pipe_dir, tmp_path, capsys, extra, named):
    argv = args(tmp_path / "run", sd_pipe_dir)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossattn-sd: error: ") and named in err, err


def test_missing_model_folder_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(args(tmp_path / "run", missing)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model folder '{missing}' does not exist" in err
    assert not (tmp_path / "run").exists()


def test_unknown_mode_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args(tmp_path / "run", tmp_path, "--mode", "fast"))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one error line
    assert last.startswith("crossattn-sd generate: error:") and "invalid choice: 'fast'" in last


def test_console_script_end_to_end(sd_pipe_dir, tmp_path):
    script = Path(sys.executable).parent / "crossattn-sd"
    script = str(script) if script.exists() else shutil.which("crossattn-sd")
    assert script, "the crossattn-sd console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.run([script, *args(out, sd_pipe_dir, "--word", "circle")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.safetensors", "image.png", "maps.npz", "meta.json", "overlay-circle.png"]
    with Image.open(out / "image.png") as im:
        assert im.text["parameters"].startswith(PROMPT)
