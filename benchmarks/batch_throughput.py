"""Batch throughput: rows per minute of `crossattn-sd batch` on the embedded model, one process vs. two.

Writes `--rows` held-out shapes-world captions (seed = row index) to a prompt file and runs, as a user would, in
fresh output folders:

  1 process x 1 thread     python -m crossattn_sd batch prompts.txt --out DIR --threads 1
  1 process x 2 threads    ... --threads 2
  2 processes x 1 thread   accelerate launch --multi_gpu --num_processes 2 -m crossattn_sd batch ... --threads 1
                           (torchrun underneath; on a CPU-only machine the engine forms a gloo group)

Each configuration runs `--repeats` times, interleaved (A B C, B C A, ...). Reported per configuration, medians:
end-to-end rows per minute (the command's wall clock: process start, imports, model load, every row, the index
merge), and the rows' rate alone (rows / the busiest process's summed generate + save seconds, from index.jsonl).
Every run is checked: all rows "ok", and the two-process run's bundles equal the one-thread run's byte for byte.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/batch_throughput.py --rows 48
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # name -> (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}


def command(prompts: Path, out: Path, processes: int, threads: int) -> list[str]:
    batch = ["batch", str(prompts), "--out", str(out), "--threads", str(threads), "--quiet"]
    if processes == 1:
        return [sys.executable, "-m", "crossattn_sd", *batch]
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "crossattn_sd", *batch]


def run(prompts: Path, out: Path, processes: int, threads: int, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command(prompts, out, processes, threads), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"batch failed ({processes} x {threads}):\n{proc.stderr[-3000:]}")
    index = [json.loads(s) for s in (out / "index.jsonl").read_text().splitlines()]
    bad = [line for line in index if line["status"] != "ok"]
    if bad:
        raise SystemExit(f"row {bad[0]['row']} failed: {bad[0]['error']}")
    busy = {}
    for line in index:
        busy[line["process"]] = busy.get(line["process"], 0.0) + sum(line["seconds"].values())
    return {"wall_s": wall, "rows_per_min": 60 * len(index) / wall,
            "loop_rows_per_min": 60 * len(index) / max(busy.values()), "processes_used": sorted(busy)}


def bundles(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("0*/*"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=48, help="prompts in the batch (default 48)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    from crossattn_sd.tiny.evaluate import captions

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_MAX_": "0",
           "MALLOC_TRIM_THRESHOLD_": "100000000000", "MALLOC_TOP_PAD_": "1073741824"}
    env.pop("OMP_NUM_THREADS", None)  # --threads sets each process's torch threads
    results = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": text, "seed": k}) + "\n"
                                   for k, (text, _, _) in enumerate(captions(args.rows, 0))))
        names = list(CONFIGS)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                processes, threads = CONFIGS[name]
                out = tmp / name.replace(" ", "")
                results[name].append(run(prompts, out, processes, threads, env))
                print(f"round {r + 1}: {name}: {results[name][-1]['rows_per_min']:.1f} rows/min end to end",
                      file=sys.stderr)
            one, two = bundles(tmp / "1processx1thread"), bundles(tmp / "2processesx1thread")
            if one != two or len(one) != 4 * args.rows:
                raise SystemExit("the two-process run's bundles differ from the one-process run's")

    print(f"{args.rows} rows of the embedded model (64 x 64, 20 steps, capture), {args.repeats} runs each, "
          f"{os.cpu_count()} CPUs, medians")
    print(f"{'configuration':24s} {'rows/min end to end':>20s} {'wall s':>7s} {'rows/min in the loop':>21s}")
    summary = {}
    for name, runs in results.items():
        s = {k: statistics.median(r[k] for r in runs) for k in ("rows_per_min", "wall_s", "loop_rows_per_min")}
        summary[name] = {**s, "runs": runs}
        print(f"{name:24s} {s['rows_per_min']:20.1f} {s['wall_s']:7.1f} {s['loop_rows_per_min']:21.1f}")
    print("bundles of 2 processes == 1 process (1 thread), byte for byte: yes")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "configs": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
