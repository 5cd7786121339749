"""Batch runs: many prompts, one bundle folder each, an index, resumable, split between processes by accelerate.

    crossattn-sd batch prompts.txt --out runs/b1
    accelerate launch --num_processes 2 -m crossattn_sd batch prompts.jsonl --out runs/b1

The input is a `.txt` (one prompt a line; blank lines are skipped), a `.jsonl` (one object a line) or a `.csv`
(a header row) whose columns are `generate`'s options (`COLUMNS`); a column a row leaves out (or an empty CSV
cell, a JSON null) takes the run's default. The output folder holds, per row, a folder named from the row's
index and prompt (`00003-a-red-circle-on-the-left`) with the files `GenerationResult.save` writes (the bundle
the web UI exports), and `index.jsonl`, one line per row in row order: status ("ok" or "failed"), words,
dropped words, files, timings, and the one-line error of a failed row.

A row is finished when its folder is in place and the index says "ok" for the same options: the bundle is written
into `DIR/.batch/tmp/` and renamed into place, and only then is its index line appended, so a killed run never
leaves a half-written bundle marked finished, and a rerun skips finished rows (and retries failed ones). Each
process appends to its own `DIR/.batch/parts/index-<process>.jsonl`; the main process merges them into
`index.jsonl` at the start (leftovers of a killed run) and at the end of a run. Nothing run-specific (timings,
process, row index) goes into a bundle, so a row's files are the same bytes whether it runs alone, in a batch, or
on any process (at a given torch thread count on CPU).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

# Each column's type; the run's defaults (the CLI's options) fill in what a row leaves out.
COLUMNS = {
    "prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": float, "height": int,
    "width": int, "scheduler": str, "mode": str, "processor": str, "weights": str, "edit_prompt": str,
    "inject": float, "layers": str, "per_step": bool, "concepts": str, "concept_kind": str,
}
DEFAULTS = {"negative_prompt": None, "seed": 0, "steps": None, "guidance": None, "height": None, "width": None,
            "scheduler": "default", "mode": "exact", "processor": "capture", "weights": "", "edit_prompt": None,
            "inject": 0.8, "layers": "*", "per_step": False, "concepts": "", "concept_kind": None}
SUFFIXES = (".txt", ".jsonl", ".csv")
INDEX = "index.jsonl"
WORK = ".batch"  # parts/ (per-process index lines) and tmp/ (bundles being written)
BARRIER_TIMEOUT = timedelta(hours=24)  # processes wait at the end for the slowest (NCCL's default is 10 min)


class BatchInputError(ValueError):
    """The prompt file cannot be read as a batch (the CLI prints it as one line and exits 2)."""


@dataclass(frozen=True)
class Row:
    """One row of the input: its 0-based index, its line in the file, and its options (every column, defaults
    filled in), or the one-line error that makes it fail (a bad value, an empty prompt)."""

    index: int
    line: int
    options: dict
    error: str | None = None

    @property
    def name(self) -> str:
        return row_name(self.index, self.options.get("prompt"))


def row_name(index: int, prompt) -> str:
    """The row's folder: its index and a file-name-safe slug of its prompt, e.g. 00003-a-red-circle."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(prompt or "").lower()).strip("-")[:40].strip("-")
    return f"{index:05d}-{slug or 'row'}"


# -- reading the input ---------------------------------------------------------------------------------------

def _convert(column: str, value):
    """A cell's value as its column's type (ValueError naming the column and the value)."""
    kind = COLUMNS[column]
    if kind is str:
        if column == "weights" and isinstance(value, dict):  # {"circle": 2} in JSON lines
            return ", ".join(f"{w}:{v}" for w, v in value.items())
        if column == "concepts" and isinstance(value, list) and all(isinstance(c, str) for c in value):
            return ", ".join(value)  # ["triangle", "green"] in JSON lines
        if not isinstance(value, str):
            raise ValueError(f"{column}={value!r} must be a string")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"{column}={value!r} is not a boolean; use true or false")
    if isinstance(value, bool):
        raise ValueError(f"{column}={value!r} must be a number")
    if kind is int and isinstance(value, (int, str)):
        try:
            return int(value)  # exactly, not through a float (seeds go up to 2**63 - 1)
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{column}={value!r} is not a number") from None
    if kind is int:
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{column}={value!r} must be an integer")
        return int(number)
    return number


def _resolve(index: int, line: int, values: dict, defaults: dict) -> Row:
    options = {**DEFAULTS, **defaults}
    try:
        for column, value in values.items():
            if value is not None and not (value == "" and column != "prompt"):  # empty cell: the default
                options[column] = _convert(column, value)
        if not str(options.get("prompt") or "").strip():
            raise ValueError("empty prompt; give each row a prompt")
    except ValueError as err:
        return Row(index, line, {**DEFAULTS, **defaults, **values}, str(err))
    return Row(index, line, options)


def _column(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _check_columns(columns, where: str, path: Path) -> None:
    unknown = [c for c in columns if _column(c) not in COLUMNS]
    if unknown:
        raise BatchInputError(f"{path}: unknown column {unknown[0]!r}{where}; the columns are "
                              f"{', '.join(COLUMNS)}")


def read_rows(path: str | Path, defaults: dict | None = None) -> list[Row]:
    """Read a batch input file into rows (see the module docstring).

    Args:
        path: a `.txt`, `.jsonl` or `.csv` file.
        defaults (`dict`, *optional*): values for the columns a row leaves out (e.g. the CLI's options).

    Raises:
        BatchInputError: the file is missing, a folder, empty, of another kind, has no prompt column, an unknown
            column, or a line that is not JSON; the message is one line naming the problem.
    """
    path = Path(path)
    defaults = {k: v for k, v in (defaults or {}).items() if k in COLUMNS and k != "prompt"}
    if path.is_dir():
        raise BatchInputError(f"{path} is a folder; give a prompt file ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise BatchInputError(f"prompt file {str(path)!r} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise BatchInputError(f"{path}: unknown kind of prompt file {path.suffix!r}; use {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise BatchInputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    records = []  # (line number, {column: value})
    if path.suffix.lower() == ".txt":
        records = [(n, {"prompt": s.strip()}) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    elif path.suffix.lower() == ".jsonl":
        for n, s in enumerate(text.splitlines(), 1):
            if not s.strip():
                continue
            try:
                record = json.loads(s)
            except json.JSONDecodeError as err:
                raise BatchInputError(f"{path}, line {n}: not JSON ({err.msg}); write one object a line") from None
            if not isinstance(record, dict):
                raise BatchInputError(f"{path}, line {n}: {type(record).__name__} is not an object; write one "
                                      'object a line, e.g. {"prompt": "a red circle", "seed": 3}')
            _check_columns(record, f" on line {n}", path)
            record = {_column(k): v for k, v in record.items()}
            if "prompt" not in record:
                raise BatchInputError(f"{path}, line {n}: no 'prompt'; give each line a prompt")
            records.append((n, record))
    else:
        reader = csv.DictReader(text.splitlines())
        header = reader.fieldnames or []
        _check_columns([c for c in header if c is not None], "", path)
        if "prompt" not in (_column(c) for c in header):
            raise BatchInputError(f"{path} has no prompt column; its header is {', '.join(header) or 'empty'}")
        for record in reader:
            if None in record:
                raise BatchInputError(f"{path}, line {reader.line_num}: more cells than the header has columns")
            records.append((reader.line_num, {_column(k): v for k, v in record.items()}))
    if not records:
        raise BatchInputError(f"{path} has no rows; write one prompt a line (or one row per prompt)")
    return [_resolve(i, n, values, defaults) for i, (n, values) in enumerate(records)]


def make_rows(records: Sequence[dict], defaults: dict | None = None) -> list[Row]:
    """Rows from dicts of columns (e.g. an evaluation's captions and seeds); row i is line i + 1."""
    defaults = {k: v for k, v in (defaults or {}).items() if k in COLUMNS and k != "prompt"}
    for i, record in enumerate(records):
        unknown = [c for c in record if c not in COLUMNS]
        if unknown:
            raise ValueError(f"record {i}: unknown column {unknown[0]!r}; the columns are {', '.join(COLUMNS)}")
    return [_resolve(i, i + 1, dict(record), defaults) for i, record in enumerate(records)]


def process_state(cpu: bool | None = None):
    """accelerate's `PartialState` for this process (one of the processes `accelerate launch` or torchrun
    started, or the only one). `cpu`: run on the CPU; default: when torch sees no accelerator. (cpu=True is what
    makes accelerate form a gloo group of CPU processes; the first call in a process decides.)"""
    import torch
    from accelerate import PartialState

    cpu = not torch.accelerator.is_available() if cpu is None else cpu
    return PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)


# -- the index -----------------------------------------------------------------------------------------------

def _read_lines(path: Path) -> list[dict]:
    """An index file's lines; a line cut short by a killed process is skipped."""
    if not path.is_file():
        return []
    out = []
    for s in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(s))
        except json.JSONDecodeError:
            continue
    return out


def _append(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, 2)
        if f.tell():  # after a line cut short by a kill, start a new one
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(json.dumps(line) + "\n")
        f.flush()


def _merge(out: Path, keep: set[int] | None = None) -> list[dict]:
    """Fold the per-process parts into index.jsonl (written atomically, in row order) and remove them."""
    lines = {}
    parts = sorted((out / WORK / "parts").glob("index-*.jsonl"))
    for path in [out / INDEX, *parts]:  # parts are newer than the index
        for line in _read_lines(path):
            lines[line["row"]] = line
    merged = [lines[r] for r in sorted(lines) if keep is None or r in keep]
    tmp = out / WORK / f"{INDEX}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(line) + "\n" for line in merged), encoding="utf-8")
    tmp.replace(out / INDEX)
    for path in parts:
        path.unlink()
    return merged


def _finished(row: Row, line: dict | None, out: Path, model: str | None) -> bool:
    return (line is not None and line.get("status") == "ok" and line.get("name") == row.name
            and line.get("options") == row.options and line.get("model") == model and (out / row.name).is_dir())


# -- running -------------------------------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def _generate(pipe, options: dict):
    from .pipeline import generate
    from .steering import ProcessorSpec, parse_weights

    o = options
    spec = ProcessorSpec(o["processor"], mode=o["mode"], weights=parse_weights(o["weights"]),
                         edit_prompt=o["edit_prompt"], inject=o["inject"], layers=o["layers"])
    return generate(pipe, o["prompt"], negative_prompt=o["negative_prompt"], seed=o["seed"], steps=o["steps"],
                    guidance_scale=o["guidance"], height=o["height"], width=o["width"],
                    scheduler=None if o["scheduler"] == "default" else o["scheduler"], per_step=o["per_step"],
                    processor=spec, concepts=o.get("concepts") or None, concept_kind=o.get("concept_kind"))


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished bundle into place (a rename: atomic), replacing an older one."""
    if final.exists():
        old = tmp.with_name(tmp.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def run_row(pipe, row: Row, out: Path, process: int = 0) -> dict:
    """Generate one row, write its bundle atomically, and return its index line (never raises for a bad row)."""
    line = {"row": row.index, "line": row.line, "name": row.name, "status": "failed",
            "prompt": row.options.get("prompt"), "words": None, "dropped_words": None, "files": [],
            "seconds": None, "error": None, "process": process, "options": row.options}
    final = out / row.name
    t0 = time.perf_counter()
    try:
        if row.error:
            raise ValueError(row.error)
        result = _generate(pipe, row.options)
        t1 = time.perf_counter()
        tmp = out / WORK / "tmp" / f"{row.name}.p{process}"
        shutil.rmtree(tmp, ignore_errors=True)
        result.save(tmp)
        _publish(tmp, final)
        t2 = time.perf_counter()
    except Exception as err:  # a row's failure, whatever it is, is recorded and the run goes on
        line.update(error=_one_line(err), seconds={"generate": round(time.perf_counter() - t0, 4)})
        if final.exists():  # an older run's bundle for other options: the folder exists only when ok
            shutil.rmtree(final)
        return line
    line.update(status="ok", words=result.words, dropped_words=result.dropped_words,
                files=sorted(f"{row.name}/{p.name}" for p in final.iterdir()),
                seconds={"generate": round(t1 - t0, 4), "save": round(t2 - t1, 4)})
    return line


def run_batch(rows: Sequence[Row], out: str | Path, load: Callable[[str], object], *, model: str | None = None,
              cpu: bool | None = None, progress: bool = True, desc: str = "batch") -> list[dict]:
    """Run every unfinished row, split between accelerate's processes; returns the merged index (every process).

    Args:
        rows: from `read_rows`.
        out: the output folder (created if needed; on a filesystem every process sees).
        load: called as `load(device)` on each process that has rows to run ("cuda", "cpu", ...: this process's
            device); returns the pipeline.
        model (`str`, *optional*): the model's name, recorded in the index: a row finished with another model
            is run again.
        cpu (`bool`, *optional*): run on the CPU; default: when torch sees no accelerator (see `process_state`).
        progress (`bool`): a progress bar (rows of every process, with ETA) on the main process.
        desc (`str`): the progress bar's label.
    """
    state = process_state(cpu)
    out = Path(out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / WORK / "tmp", ignore_errors=True)  # bundles a killed run left half-written
        _merge(out)
    state.wait_for_everyone()
    known = {line["row"]: line for line in _read_lines(out / INDEX)}
    todo = [r for r in rows if not _finished(r, known.get(r.index), out, model)]
    part = out / WORK / "parts" / f"index-{state.process_index}.jsonl"
    with state.split_between_processes(list(todo)) as mine:
        pipe = load(state.device.type) if mine else None
        bar = _progress_bar(len(todo), len(rows) - len(todo), progress and state.is_main_process, desc)
        for row in mine:
            line = run_row(pipe, row, out, state.process_index)
            line["model"] = model
            _append(part, line)
            if bar is not None:
                bar.n = sum(len(_read_lines(p)) for p in part.parent.glob("index-*.jsonl"))
                bar.set_postfix_str(f"{row.name}: {line['status']}", refresh=True)
    state.wait_for_everyone()
    if bar is not None:
        bar.n = len(todo)
        bar.close()
    if state.is_main_process:
        _merge(out, keep={r.index for r in rows})
        shutil.rmtree(out / WORK, ignore_errors=True)
    state.wait_for_everyone()
    return _read_lines(out / INDEX)


def _progress_bar(total: int, skipped: int, show: bool, desc: str):
    """Started after the model loads, so its rate and ETA are the rows'."""
    if not show or not total:
        return None
    from tqdm.auto import tqdm

    desc = f"{desc} ({skipped} done before)" if skipped else desc
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)


def summary_text(index: list[dict], out: Path) -> str:
    ok = sum(line["status"] == "ok" for line in index)
    failed = [line for line in index if line["status"] != "ok"]
    text = f"{len(index)} rows: {ok} ok, {len(failed)} failed; index: {Path(out) / INDEX}"
    for line in failed[:5]:
        text += f"\n  row {line['row']} (line {line['line']}): {line['error']}"
    if len(failed) > 5:
        text += f"\n  ... and {len(failed) - 5} more (status \"failed\" in the index)"
    return text
