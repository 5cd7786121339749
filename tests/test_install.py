"""The package as users install it: a wheel, not the source tree.

An editable install (or the checkout on `sys.path`) hides anything the wheel leaves out, such as the presets'
YAML files or the embedded model's weights; these tests build the wheel and use it from elsewhere.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

import crossattn_sd

ROOT = Path(__file__).resolve().parents[1]  # the checkout holding pyproject.toml
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
ENV.pop("PYTHONPATH", None)  # the wheel, not a source tree, must be what the new environment imports


def run(cmd, cwd, **kw):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(python, crossattn-sd script) of a fresh virtual environment holding only the wheel built from ROOT.

    torch, diffusers and the other dependencies come from the running interpreter's environment, through a
    `.pth` file: `venv --system-site-packages` would give the *base* interpreter's packages, which are not the
    ones installed here when the tests themselves run in a virtual environment (as `.ci/run` does). Plain paths
    in a `.pth` file do not run that environment's own `.pth` files, so an editable install there stays out.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so building leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "crossattn_sd", src / "crossattn_sd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("crossattn_sd-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip())
    outer = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (purelib / "_outer_env.pth").write_text("".join(f"{p}\n" for p in outer))
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp)
    return python, env_dir / "bin" / "crossattn-sd", purelib


def test_the_wheel_lists_every_preset_and_loads_them_from_elsewhere(wheel_env, tmp_path):
    python, script, purelib = wheel_env
    presets = sorted(p.stem for p in (ROOT / "crossattn_sd" / "configs").glob("*.yaml"))
    assert {"tiny", "sd15", "sd21", "sdxl", "sdxl-turbo"} <= set(presets)

    listed = run([script, "presets"], cwd=tmp_path)  # a directory outside the checkout
    assert sorted(line.split()[0] for line in listed.splitlines() if line.strip()) == presets

    check = textwrap.dedent("""
        import json, sys
        import crossattn_sd
        from crossattn_sd.config import CONFIG_DIR, EMBEDDED_MODEL_DIR, load_presets
        from crossattn_sd.tiny import WEIGHTS_DIR
        presets = load_presets()
        pipe = crossattn_sd.load_pipeline()  # the embedded model, from the wheel's package data
        print(json.dumps(dict(
            file=crossattn_sd.__file__, config_dir=str(CONFIG_DIR), weights=str(EMBEDDED_MODEL_DIR),
            weights_dir=str(WEIGHTS_DIR), presets={n: [p.source, p.family, p.steps] for n, p in presets.items()},
            unet_layers=len(pipe.unet.attn_processors), source=pipe.crossattn_source,
            # the packaged comparison models, whose VAE, tokenizer and scheduler come from tiny's folder
            shared={m: [type(p).__name__, len(p.unet.attn_processors)]
                    for m, p in ((m, crossattn_sd.load_pipeline(m)) for m in ("tiny-untaught", "tiny-film"))},
        )))
    """)
    import json

    got = json.loads(run([python, "-c", check], cwd=tmp_path).splitlines()[-1])
    for key in ("file", "config_dir", "weights", "weights_dir"):
        assert Path(got[key]).is_relative_to(purelib), (key, got[key])  # the wheel's copy, not the checkout's
    from crossattn_sd.config import load_presets

    here = load_presets()
    assert got["presets"] == {n: [p.source, p.family, p.steps] for n, p in here.items()}
    assert got["presets"]["sd15"][0] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a preset, not a Hub guess
    assert got["unet_layers"] == 14  # 7 cross-attention + 7 self-attention layers of the embedded UNet
    assert got["shared"] == {"tiny-untaught": ["StableDiffusionPipeline", 14], "tiny-film": ["StableDiffusionPipeline", 0]}


def test_ci_imports_the_installed_package_not_the_checkout():
    """`.ci/run` installs the project non-editable and sets CROSSATTN_SD_TEST_INSTALLED=1: then every test must
    have imported the installed copy. (`python -m pytest` from the checkout would put it first on sys.path.)"""
    if os.environ.get("CROSSATTN_SD_TEST_INSTALLED") != "1":
        pytest.skip("set CROSSATTN_SD_TEST_INSTALLED=1 (as .ci/run does) to check which copy is imported")
    where = Path(crossattn_sd.__file__).resolve()
    assert not where.is_relative_to(ROOT / "crossattn_sd"), f"imported the checkout's copy: {where}"
    assert where.is_relative_to(Path(sysconfig.get_path("purelib")).resolve()), where
