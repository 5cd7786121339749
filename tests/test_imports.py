"""Import hygiene: the core never imports Gradio; the package is lazy; the recording modules draw nothing."""
import json
import os
import subprocess
import sys

import pytest

CORE = ["crossattn_sd", "crossattn_sd.processors", "crossattn_sd.compose", "crossattn_sd.maps", "crossattn_sd.aggregate",
        "crossattn_sd.tokens", "crossattn_sd.pipeline", "crossattn_sd.result", "crossattn_sd.bundle_load",
        "crossattn_sd.overlay", "crossattn_sd.steering", "crossattn_sd.cli", "crossattn_sd.config"]


def loaded_after(modules, watch):
    """Import `modules` in a fresh interpreter; which of `watch` ended up in sys.modules."""
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(json.dumps([w for w in {watch!r} if w in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("modules,forbidden", [
    (CORE, ["gradio"]),
    (["crossattn_sd"], ["torch", "diffusers", "transformers", "gradio", "numpy"]),
    (["crossattn_sd.maps", "crossattn_sd.aggregate", "crossattn_sd.processors", "crossattn_sd.tokens"],
     ["matplotlib", "PIL", "diffusers", "gradio"]),
    (["crossattn_sd.config"], ["torch", "gradio"]),
], ids=["core-no-gradio", "package-is-lazy", "recording-draws-nothing", "config-light"])
def test_imports_stay_light(modules, forbidden):
    assert loaded_after(modules, forbidden) == []


def test_lazy_names_resolve():
    import crossattn_sd

    for name in crossattn_sd.__all__:
        assert getattr(crossattn_sd, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        crossattn_sd.nope


def test_importing_the_ui_writes_nothing_into_the_package():
    """Gradio's component metaclass writes a `.pyi` stub next to the module of any component subclass; the UI
    defines none, so an installed package stays as installed."""
    from pathlib import Path

    import crossattn_sd

    package = Path(crossattn_sd.__file__).parent
    before = {p for p in package.rglob("*") if "__pycache__" not in p.parts}
    loaded_after(["crossattn_sd.ui"], [])
    assert {p for p in package.rglob("*") if "__pycache__" not in p.parts} == before
