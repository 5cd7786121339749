"""Run a Diffusers test module twice, plain and with every pipeline call inside `crossattn_sd.capture`, and
compare the sets of passing tests.

Diffusers' tests need their own checkout (its `tests/` folder, of the commit matching the installed Diffusers);
the Hub ids they load are replaced by offline stand-ins (see `capture_plugin.py`), so some tests fail in both
runs (expected pixel slices, checkpoints from the Hub): what matters is that both runs pass the same tests.
Exit status 0 when the pass sets are equal, 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_pytest(src: Path, module: str, capture: bool, pytest_args: list[str], python: str) -> tuple[dict, float]:
    """One pytest run of `module` under `src`; returns the plugin's outcomes JSON and the wall time."""
    with tempfile.TemporaryDirectory(prefix="crossattn-suite-run-") as tmp:
        out = Path(tmp) / "outcomes.json"
        cmd = [python, "-m", "pytest", "-p", "capture_plugin", "-p", "no:cacheprovider", "-q", "--rootdir", str(src),
               module, "--crossattn-outcomes", str(out), *(["--crossattn-capture"] if capture else []), *pytest_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pytest wrote no outcomes for {module} (exit {proc.returncode}); see its output above")
        return json.loads(out.read_text()), wall


def summary(outcomes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("module", help="test module, relative to --src, e.g. "
                        "tests/pipelines/stable_diffusion/test_stable_diffusion.py")
    parser.add_argument("--src", default="/work/diffusers-src", help="Diffusers checkout holding tests/")
    parser.add_argument("-k", default=None, help="pytest -k expression, passed to both runs")
    parser.add_argument("--json", default=None, help="also write both runs' outcomes and the difference here")
    parser.add_argument("--list", action="store_true", help="print every test's plain and captured outcome")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args, rest = parser.parse_known_args(argv)
    src = Path(args.src).resolve()
    pytest_args = (["-k", args.k] if args.k else []) + rest

    plain, plain_wall = run_pytest(src, args.module, False, pytest_args, args.python)
    captured, cap_wall = run_pytest(src, args.module, True, pytest_args, args.python)
    p_out, c_out = plain["outcomes"], captured["outcomes"]
    p_pass = {t for t, o in p_out.items() if o == "passed"}
    c_pass = {t for t, o in c_out.items() if o == "passed"}
    stats = captured["capture_stats"]
    calls = sum(s["captured_calls"] for s in stats.values())
    with_maps = sum(s["calls_with_maps"] for s in stats.values())

    print(f"{args.module}{'  -k ' + args.k if args.k else ''}")
    print(f"  plain:    {len(p_out)} tests: {summary(p_out)}  ({plain_wall:.0f} s)")
    print(f"  captured: {len(c_out)} tests: {summary(c_out)}  ({cap_wall:.0f} s; {calls} pipeline calls "
          f"captured in {sum(bool(s['captured_calls']) for s in stats.values())} tests, {with_maps} recorded maps)")
    p_hash, c_hash = plain.get("output_hashes", {}), captured.get("output_hashes", {})
    both = [t for t in p_hash if t in c_hash]
    differ = [t for t in both if p_hash[t] != c_hash[t]]
    compared = sum(min(len(p_hash[t]), len(c_hash[t])) for t in both)
    print(f"  outputs:  {compared} pipeline calls in {len(both)} tests compared; bit-identical in "
          f"{len(both) - len(differ)} tests" + (f", DIFFERENT in {len(differ)}" if differ else ""))
    for t in differ:
        same = sum(a == b for a, b in zip(p_hash[t], c_hash[t]))
        print(f"  outputs differ: {short(t)} ({same} of {len(p_hash[t])} plain / {len(c_hash[t])} captured calls equal)")
    lost, gained = sorted(p_pass - c_pass), sorted(c_pass - p_pass)
    for name, tests in (("passed plain only", lost), ("passed captured only", gained)):
        for t in tests:
            print(f"  {name}: {short(t)} (plain {p_out.get(t, 'absent')}, captured {c_out.get(t, 'absent')})")
    if args.list:
        reasons = {**plain.get("reasons", {}), **captured.get("reasons", {})}
        for t in sorted(set(p_out) | set(c_out)):
            why = f"  ({reasons[t]})" if t in reasons else ""
            print(f"    {p_out.get(t, '-'):8} {c_out.get(t, '-'):8} {short(t)}{why}")
    same = not lost and not gained
    print("  same pass set" if same else f"  DIFFERENT pass sets: {len(lost)} lost, {len(gained)} gained")
    if args.json:
        Path(args.json).write_text(json.dumps({"module": args.module, "k": args.k, "plain": plain,
                                               "captured": captured, "lost": lost, "gained": gained,
                                               "outputs_differ": differ}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
