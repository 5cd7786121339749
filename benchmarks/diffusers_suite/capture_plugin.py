"""A pytest plugin that runs Diffusers' own pipeline tests offline, optionally with every pipeline call captured.

Load it with `-p capture_plugin` (this folder and the crossattn-sd checkout on PYTHONPATH; `run.py` does it):

- `--crossattn-capture`: every `__call__` of a `DiffusionPipeline` subclass whose denoiser is of a family
  crossattn-sd supports (a UNet with cross-attention layers, SD3, FLUX.1, FLUX.2) runs inside
  `crossattn_sd.capture(pipe, mode="exact")`. The test harness patches the pipeline classes
  for the test run (and restores them at the end); the package itself never patches anything. A pipeline
  called from inside another captured call is not captured twice.
- `--crossattn-outcomes PATH`: write each test's outcome ("passed", "failed", "skipped", "error") and, with
  capture, how many pipeline calls were captured and how many of them recorded maps, to a JSON file.
- Offline stand-ins: Diffusers' fast tests load tokenizers (CLIP, T5, Qwen2, a Mistral processor) and T5's
  config from the Hub; `offline_hub.py` builds local ones and redirects those ids to them. Expected pixel
  slices then differ from Diffusers' references, so compare the SETS of passing tests of two runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import threading
from pathlib import Path

import pytest

_state = threading.local()
_stats: dict[str, dict[str, int]] = {}
_hashes: dict[str, list[str]] = {}  # test -> a hash of each pipeline call's output, in call order
_current: list[str] = [""]
_patched: dict[type, object] = {}


def pytest_addoption(parser):
    group = parser.getgroup("crossattn-sd")
    group.addoption("--crossattn-capture", action="store_true",
                    help="run every pipeline call inside crossattn_sd.capture(pipe, mode='exact')")
    group.addoption("--crossattn-outcomes", default=None, help="write test outcomes (and capture counts) as JSON")


# -- capture around every pipeline call -----------------------------------------------------------------------


def _capturable(pipe) -> bool:
    """Whether crossattn-sd supports the pipeline's denoiser and it has text-attention layers."""
    from crossattn_sd.families import family_of

    try:
        family = family_of(pipe)
    except ValueError:  # a family crossattn-sd does not support: the call runs plain
        return False
    return hasattr(family.model, "attn_processors") and bool(family.layers())


def _digest(obj, h) -> None:
    """Feed a pipeline output (tensors, arrays, PIL images, nested in outputs, dicts, lists) into hash `h`."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(str(t.dtype).encode() + bytes(str(tuple(t.shape)), "ascii"))
        if t.is_meta:
            return
        t = t.cpu()
        h.update((t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(str(obj.dtype).encode() + bytes(str(obj.shape), "ascii") + np.ascontiguousarray(obj).tobytes())
    elif hasattr(obj, "tobytes") and hasattr(obj, "mode"):  # PIL image
        h.update(obj.mode.encode() + bytes(str(obj.size), "ascii") + obj.tobytes())
    elif isinstance(obj, dict):  # BaseOutput is an OrderedDict
        for key, value in obj.items():
            h.update(str(key).encode())
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _digest(value, h)
    else:
        h.update(repr(obj).encode() if isinstance(obj, (type(None), bool, int, float, str)) else type(obj).__name__.encode())


def _wrap(cls, capture: bool) -> None:
    original = cls.__dict__["__call__"]

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        import crossattn_sd

        if getattr(_state, "depth", 0):  # a pipeline called by a pipeline: only the outer call is wrapped
            return original(self, *args, **kwargs)
        stats = _stats.setdefault(_current[0], {"captured_calls": 0, "calls_with_maps": 0})
        _state.depth = 1
        try:
            if capture and _capturable(self):
                stats["captured_calls"] += 1
                with crossattn_sd.capture(self, mode="exact") as maps:
                    out = original(self, *args, **kwargs)
                stats["calls_with_maps"] += bool(maps.layers)
            else:
                out = original(self, *args, **kwargs)
        finally:
            _state.depth = 0
        h = hashlib.sha1()
        _digest(out, h)
        _hashes.setdefault(_current[0], []).append(h.hexdigest()[:16])
        return out

    _patched[cls] = original
    cls.__call__ = __call__


def _patch_pipelines(capture: bool) -> None:
    """Wrap `__call__` of every imported DiffusionPipeline subclass that defines one (idempotent): hash every
    output, and with `capture` run the call inside `crossattn_sd.capture`."""
    from diffusers import DiffusionPipeline

    todo = [DiffusionPipeline]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls not in _patched and "__call__" in cls.__dict__:
            _wrap(cls, capture)


def _unpatch_pipelines() -> None:
    for cls, original in _patched.items():
        cls.__call__ = original
    _patched.clear()


# -- hooks ---------------------------------------------------------------------------------------------------

_outcomes: dict[str, str] = {}
_reasons: dict[str, str] = {}  # the first line of each failure's exception


def pytest_configure(config):
    import offline_hub

    config._crossattn_tmp = tempfile.TemporaryDirectory(prefix="crossattn-suite-")
    offline_hub.redirect(Path(config._crossattn_tmp.name))


def pytest_runtest_setup(item):
    _current[0] = item.nodeid
    _patch_pipelines(item.config.getoption("--crossattn-capture"))  # classes imported since the last test too


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if report.when != "call" and report.outcome == "failed":
            outcome = "error"
        if _outcomes.get(report.nodeid) in (None, "passed"):
            _outcomes[report.nodeid] = outcome
            crash = getattr(report.longrepr, "reprcrash", None)
            if outcome in ("failed", "error") and crash is not None:
                _reasons[report.nodeid] = crash.message.splitlines()[0][:200]


def pytest_unconfigure(config):
    _unpatch_pipelines()
    path = config.getoption("--crossattn-outcomes")
    if path:
        data = {"capture": bool(config.getoption("--crossattn-capture")), "outcomes": _outcomes,
                "reasons": _reasons, "capture_stats": _stats, "output_hashes": _hashes}
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True))
    config._crossattn_tmp.cleanup()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    _patch_pipelines(session.config.getoption("--crossattn-capture"))
