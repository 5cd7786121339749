"""Typed settings: model presets (from `crossattn_sd/configs/*.yaml`) and generation defaults.

YAML files only fill in these dataclasses; an unknown key is an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "tiny" / "weights"
CONFIG_DIR = PACKAGE_DIR / "configs"  # package data: a wheel installs it with the code
EMBEDDED = "embedded"
PACKAGE_SOURCE = "package:"  # a preset source "package:tiny/weights-mmdit" is that folder of the installed package
MAP_LAYERS = ("all", "finest", "last")  # ModelPreset.map_layers
PRESET_FAMILIES = ("sd", "sdxl", "sd3", "flux", "flux2", "chroma", "sana", "qwenimage",
                   "zimage")  # ModelPreset.family


@dataclass(frozen=True)
class ModelPreset:
    """A model the app and CLI know by name.

    Args:
        name: the preset's name, as given to `--model`.
        source: "embedded" (the model shipped in the package), "package:FOLDER" (another pipeline folder shipped
            in the package, relative to it), a local folder, or a Hub id.
        family: one of `PRESET_FAMILIES`: "sd" (SD 1.x / 2.x), "sdxl", "sd3" (SD3 / SD3.5), "flux" (FLUX.1),
            "flux2" (FLUX.2), "chroma", "sana", "qwenimage" or "zimage";
            informative (the pipeline class comes from the model's own `model_index.json`).
        steps, guidance, height, width: generation defaults for this model.
        max_side: the largest height or width the UI offers (the model's training size bounds it).
        scheduler: default scheduler name (see `pipeline.SCHEDULERS`); None keeps the model's own.
        map_layers: which layers a heat map averages when none are asked for: "all" (every cross-attention
            layer, as DAAM does), "finest" (only the layers with the largest maps; chosen for a model where
            they were measured to localise words best, as for the embedded one), or "last" (the last
            text-attention layer in forward order; tiny-mmdit's, measured likewise).
        map_head: the one attention head of those layers a heat map shows when none is asked for (None: the
            mean of the heads); a preset that sets it keeps per-head maps in every generation.
        max_sequence_length: for SD3 pipelines, the `max_sequence_length` to call them with (the number of T5
            tokens; a model without T5 gets that many zero tokens); None: the pipeline's default.
        examples: example prompts shown in the UI.
        description: one line for `--help` and the UI.
        vocabulary: the words a closed-vocabulary model was trained on (the embedded models); a prompt's other
            words are named before generation, since the model never learned them. Empty: an open vocabulary.
        components_from: for a packaged model that shares components with another one: "embedded" or
            "package:FOLDER"; the components the source's model_index.json lists but whose subfolder the source
            lacks (the shapes-world models' VAE, tokenizer and scheduler) are loaded from there. None: none shared.
    """

    name: str
    source: str
    family: str = "sd"
    steps: int = 30
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    max_side: int = 1024
    scheduler: str | None = None
    map_layers: str = "all"
    map_head: int | None = None
    max_sequence_length: int | None = None
    examples: tuple[str, ...] = ()
    description: str = ""
    vocabulary: tuple[str, ...] = ()
    components_from: str | None = None

    def __post_init__(self):
        if self.family not in PRESET_FAMILIES:
            raise ValueError(f"preset {self.name!r}: family must be one of {', '.join(PRESET_FAMILIES)}, "
                             f"got {self.family!r}")
        bad = [w for w in self.vocabulary if not isinstance(w, str) or not w.strip()]
        if bad:
            raise ValueError(f"preset {self.name!r}: vocabulary entries must be words, got {bad!r} (quote words "
                             "such as \"on\" and \"no\", which YAML reads as true/false)")
        if self.components_from is not None and not (self.components_from == EMBEDDED
                                                     or self.components_from.startswith(PACKAGE_SOURCE)):
            raise ValueError(f"preset {self.name!r}: components_from must be \"embedded\" or \"package:FOLDER\", "
                             f"got {self.components_from!r}")
        if self.map_layers not in MAP_LAYERS:
            raise ValueError(f"preset {self.name!r}: map_layers must be one of {', '.join(MAP_LAYERS)}, "
                             f"got {self.map_layers!r}")
        if self.map_head is not None and (not isinstance(self.map_head, int) or self.map_head < 0):
            raise ValueError(f"preset {self.name!r}: map_head must be a head index (0, 1, ...) or null, "
                             f"got {self.map_head!r}")


EMBEDDED_PRESET = ModelPreset(
    name="tiny", source=EMBEDDED, steps=20, guidance=2.0, height=64, width=64, max_side=128, map_layers="finest",
    examples=("a red circle on the left and a blue square on the right",),
    description="the embedded 64x64 shapes-world model (offline, CPU)",
)


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`, refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**data)


def load_presets() -> dict[str, ModelPreset]:
    """All presets from `crossattn_sd/configs/*.yaml` (one preset per file, named by the file), plus the embedded one."""
    import yaml

    presets = {EMBEDDED_PRESET.name: EMBEDDED_PRESET}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        data.setdefault("name", path.stem)
        presets[data["name"]] = from_dict(ModelPreset, data, where=str(path))
    return presets


def get_preset(name: str) -> ModelPreset:
    presets = load_presets()
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(presets)}")
    return presets[name]


@dataclass
class GenerationDefaults:
    """Defaults `generate` uses for arguments left as None."""

    steps: int = 30
    guidance: float = 7.5
    height: int | None = None  # None: the UNet's sample_size times the VAE factor
    width: int | None = None
    examples: tuple[str, ...] = field(default_factory=tuple)
    map_layers: str = "all"  # see ModelPreset
    vocabulary: tuple[str, ...] = field(default_factory=tuple)  # see ModelPreset
    max_sequence_length: int | None = None  # see ModelPreset
    map_head: int | None = None  # see ModelPreset

    @classmethod
    def from_preset(cls, preset: ModelPreset) -> "GenerationDefaults":
        return cls(preset.steps, preset.guidance, preset.height, preset.width, preset.examples, preset.map_layers,
                   preset.vocabulary, preset.max_sequence_length, preset.map_head)
