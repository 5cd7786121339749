"""`crossattn-sd batch`: bundles and index, failed rows, bad input files, resuming after a kill, many processes."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from crossattn_sd.batch import WORK
from crossattn_sd.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ["attention.safetensors", "image.png", "maps.npz", "meta.json"]
ROWS = [  # six rows that differ in every way a row can
    {"prompt": "a red circle on the left", "seed": 1},
    {"prompt": "a blue square on the right", "seed": 2, "per_step": True},
    {"prompt": "a green square", "height": 48, "guidance": 1.0},
    {"prompt": "a red square and a blue circle", "processor": "reweight", "weights": "square:2"},
    {"prompt": "a cat on the left", "processor": "edit", "edit_prompt": "a red cat on the left", "inject": 0.5},
    {"prompt": "a blue cat", "seed": 7, "scheduler": "euler"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch_args(prompts, out, model, *extra):
    return ["batch", str(prompts), "--out", str(out), "--model", str(model), "--steps", "2", "--height", "32",
            "--width", "32", "--threads", "1", "--quiet", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def index(out: Path) -> list[dict]:
    return [json.loads(s) for s in (out / "index.jsonl").read_text().splitlines()]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("0*/*"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_row_is_a_bundle_and_an_index_line(sd_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\n\n  a blue square  \n")
    out = tmp_path / "out"
    assert main(batch_args(prompts, out, sd_pipe_dir, "--seed", "3")) == 0
    assert "2 rows: 2 ok, 0 failed" in capsys.readouterr().out
    lines = index(out)
    assert [l["name"] for l in lines] == ["00000-a-red-circle-on-the-left", "00001-a-blue-square"]
    assert [l["line"] for l in lines] == [1, 3]  # the blank line is skipped
    first = lines[0]
    assert first["status"] == "ok" and first["error"] is None and first["prompt"] == "a red circle on the left"
    assert first["words"] == ["a", "red", "circle", "on", "the", "left"] and first["dropped_words"] == []
    assert first["files"] == [f"00000-a-red-circle-on-the-left/{f}" for f in BUNDLE]
    assert set(first["seconds"]) == {"generate", "save"} and first["options"]["seed"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["00000-a-red-circle-on-the-left", "00001-a-blue-square",
                                                     "index.jsonl"]  # no work folder left behind

    # The bundle is what GenerationResult.save writes for the same call, byte for byte (nothing run-specific).
    from crossattn_sd import generate, load_pipeline

    pipe = load_pipeline(str(sd_pipe_dir), device="cpu")
    generate(pipe, "a blue square", seed=3, steps=2, height=32, width=32).save(tmp_path / "alone")
    alone = {p.name: p.read_bytes() for p in (tmp_path / "alone").iterdir()}
    assert alone == {p.name: p.read_bytes() for p in (out / "00001-a-blue-square").iterdir()}


def test_bad_rows_are_recorded_and_the_others_finish(sd_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed,width,processor,weights\n"
                       "a red circle,1,,,\n"
                       ",2,,,\n"                                  # empty prompt
                       "a blue square,3,,reweight,zebra:2\n"      # unknown word in weights
                       "a green square,4,63,,\n"                  # width 63
                       "a cat,many,,,\n"                          # seed not a number
                       "a red square,5,,,\n")
    out = tmp_path / "out"
    assert main(batch_args(prompts, out, sd_pipe_dir)) == 0
    lines = index(out)
    assert [l["status"] for l in lines] == ["ok", "failed", "failed", "failed", "failed", "ok"]
    errors = [l["error"] for l in lines]
    assert errors[0] is None and errors[5] is None
    assert "empty prompt" in errors[1]
    assert "'zebra'" in errors[2] and "'blue'" in errors[2]  # names the word and the prompt's words
    assert "width=63" in errors[3] and "use 56 or 64" in errors[3]
    assert "seed='many'" in errors[4]
    assert all("\n" not in e for e in errors[1:5])
    assert [l["line"] for l in lines] == [2, 3, 4, 5, 6, 7]
    assert sorted(p.name for p in out.glob("0*")) == ["00000-a-red-circle", "00005-a-red-square"]
    assert all(l["files"] == [] for l in lines[1:5])
    report = capsys.readouterr().out
    assert "6 rows: 2 ok, 4 failed" in report and "row 3 (line 5): width=63" in report


def test_a_negative_prompt_column_is_used(sd_pipe_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a blue cat", "negative_prompt": "red"}])
    assert main(batch_args(prompts, tmp_path / "out", sd_pipe_dir)) == 0
    line = index(tmp_path / "out")[0]
    assert line["status"] == "ok", line["error"]


@pytest.mark.parametrize("name,text,named", [
    ("p.csv", "seed,steps\n1,2\n", "no prompt column"),
    ("p.csv", "prompt,colour\na red circle,red\n", "unknown column 'colour'"),
    ("p.jsonl", '{"prompt": "a red circle", "sead": 1}\n', "unknown column 'sead' on line 1"),
    ("p.jsonl", '{"prompt": "a red circle"}\n["a blue square"]\n', "line 2: list is not an object"),
    ("p.jsonl", '{"prompt": "a red circle"\n', "line 1: not JSON"),
    ("p.txt", "\n  \n", "has no rows"),
    ("p.csv", "", "no prompt column"),
    ("p.yaml", "prompt: a red circle\n", "unknown kind of prompt file '.yaml'"),
    ("folder", None, "is a folder"),
    ("missing.txt", None, "does not exist"),
])
def test_bad_input_files_exit_2_with_one_line_before_loading(tmp_path, capsys, name, text, named):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    elif name == "folder":
        path.mkdir()
    out = tmp_path / "out"
    # a model that does not exist: the file is checked before the model loads, or the error would be about it
    assert main(batch_args(path, out, tmp_path / "no-such-model")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossattn-sd: error: ") and named in err, err
    if "unknown column" in named:
        assert "the columns are prompt, negative_prompt, seed" in err
    assert not out.exists()


def test_rerun_skips_finished_rows_retries_failed_and_redoes_changed(sd_pipe_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "a blue square"},
                                                 {"prompt": "a cat", "width": 63}])
    out = tmp_path / "out"
    assert main(batch_args(prompts, out, sd_pipe_dir)) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("0*/*")}
    assert main(batch_args(prompts, out, sd_pipe_dir)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("0*/*")} == stamps  # nothing rewritten
    assert [l["status"] for l in index(out)] == ["ok", "ok", "failed"]

    write_jsonl(prompts, [{"prompt": "a red circle", "seed": 9}, {"prompt": "a blue square"}, {"prompt": "a cat"}])
    assert main(batch_args(prompts, out, sd_pipe_dir)) == 0
    redone = {p.parent.name for p in out.glob("0*/*") if stamps.get(p) != p.stat().st_mtime_ns}
    assert redone == {"00000-a-red-circle", "00002-a-cat"}  # the changed row and the failed one
    assert [l["status"] for l in index(out)] == ["ok", "ok", "ok"] and index(out)[0]["options"]["seed"] == 9


KILL_ON_FOURTH_SAVE = """
import os, signal, sys
from crossattn_sd import result

save, calls = result.GenerationResult.save, []
def save_then_die(self, folder, **kwargs):
    out = save(self, folder, **kwargs)
    calls.append(folder)
    if len(calls) == 4:  # the 4th bundle is fully written, but not yet moved into place nor indexed
        os.kill(os.getpid(), signal.SIGKILL)
    return out
result.GenerationResult.save = save_then_die
from crossattn_sd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_without_redoing_finished_rows(sd_pipe_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_ON_FOURTH_SAVE, *batch_args(prompts, out, sd_pipe_dir)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = sorted(p.name for p in out.glob("0*"))
    assert done == ["00000-a-red-circle-on-the-left", "00001-a-blue-square-on-the-right", "00002-a-green-square"]
    assert list((out / WORK / "tmp").iterdir())  # row 3's bundle, written but never moved into place
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("0*/*")}

    assert main(batch_args(prompts, out, sd_pipe_dir)) == 0
    lines = index(out)
    assert [l["status"] for l in lines] == ["ok"] * 6
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("0*/*") if p in stamps} == stamps
    assert len(list(out.glob("0*"))) == 6 and not (out / WORK).exists()
    from crossattn_sd import load_result

    assert load_result(out / lines[3]["name"]).words == ["a", "red", "square", "and", "a", "blue", "circle"]


def test_two_processes_write_the_same_files_as_one(sd_pipe_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(batch_args(prompts, one, sd_pipe_dir)) == 0
    # accelerate 1.x starts CPU processes through torchrun with --multi_gpu (--cpu alone starts one process
    # unless mpirun is configured); the engine asks for a CPU (gloo) group when torch sees no GPU
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "crossattn_sd", *batch_args(prompts, two, sd_pipe_dir)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("6 rows: 6 ok") == 1  # the main process reports, once

    lines_one, lines_two = index(one), index(two)
    assert [l["process"] for l in lines_two] == [0, 0, 0, 1, 1, 1]  # split between the two processes
    assert [l["process"] for l in lines_one] == [0] * 6
    strip = lambda lines: [{k: v for k, v in l.items() if k not in ("seconds", "process")} for l in lines]  # noqa
    assert strip(lines_one) == strip(lines_two)
    a, b = files(one), files(two)
    assert len(a) == 6 * 4 + 1  # the edit row has image-1.png too
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_eval_tiny_scores_its_bundles_as_the_results_in_memory_and_resumes(tmp_path):
    from crossattn_sd import generate, load_pipeline
    from crossattn_sd.tiny import evaluate as ev

    pipe = load_pipeline(device="cpu")  # the embedded model
    out = tmp_path / "eval"
    summary = ev.evaluate(pipe, n=2, out=out, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("0*/*")}
    assert len(stamps) == 2 * 4
    assert ev.evaluate(pipe, n=2, out=out, progress=False) == summary  # resumed: nothing generated again
    assert {p: p.stat().st_mtime_ns for p in out.glob("0*/*")} == stamps

    tally = ev.Tally()
    for text, kinds, seed in ev.captions(2, 0):
        ev.score(tally, generate(pipe, text, seed=seed), kinds)
    expected = tally.summary()
    assert summary["median_seconds_per_image"] > 0
    for s in (summary, expected):
        s.pop("median_seconds_per_image")
    assert {k: v for k, v in summary.items() if k != "map_view"} == expected
