"""Model families: one small adapter per architecture, and the registry that picks one for a pipeline or model.

    >>> from crossattn_sd.families import family_of
    >>> family = family_of(pipe)          # a pipeline, or a bare denoiser (UNet, transformer)
    >>> family.name, family.layers()[:1]
    ('sd3', ['transformer_blocks.0.attn'])

Adding a family is one file: a `Family` subclass (see `base.py`) with its processor, appended to `FAMILIES` (and,
for a preset of it in `configs/`, its name added to `config.PRESET_FAMILIES`). chroma.py, qwenimage.py, zimage.py
and sana.py were added that way.
"""

from __future__ import annotations

import torch

from .base import MODES, Family, Recorder, Steering
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .qwenimage import QwenImageFamily
from .sana import SanaFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .zimage import ZImageFamily

FAMILIES: list[type[Family]] = [UNetFamily, SD3Family, FluxFamily, Flux2Family, ChromaFamily, SanaFamily,
                                 QwenImageFamily, ZImageFamily]


def denoiser_of(pipe_or_model):
    """The denoiser of a pipeline (`pipe.unet`, `pipe.transformer`, ...), or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    for family in FAMILIES:
        model = getattr(pipe_or_model, family.denoiser_attr, None)
        if model is not None:
            return model
    return None


def family_of(pipe_or_model) -> Family:
    """The family adapter bound to the denoiser of `pipe_or_model`; an unsupported one raises a one-line
    ValueError naming it and the supported families."""
    model = denoiser_of(pipe_or_model)
    for family in FAMILIES:
        if model is not None and family.handles(model):
            return family(model)
    what = type(pipe_or_model).__name__
    if model is not None and model is not pipe_or_model:
        what += f" (denoiser {type(model).__name__})"
    raise ValueError(f"crossattn-sd does not support {what}; supported: "
                     f"{'; '.join(f.description for f in FAMILIES)}")


def is_pipeline(obj) -> bool:
    return not isinstance(obj, torch.nn.Module)


__all__ = ["FAMILIES", "MODES", "ChromaFamily", "Family", "Flux2Family", "FluxFamily", "QwenImageFamily", "Recorder",
           "SanaFamily", "Steering", "SD3Family", "UNetFamily", "ZImageFamily", "denoiser_of",
           "family_of"]
