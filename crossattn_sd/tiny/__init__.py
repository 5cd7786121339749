"""The embedded default model: a tiny Stable-Diffusion-structured model of a shapes world.

- world.py: the synthetic world (scenes, rendering, captions, held-out split)
- judge.py: a pixel judge that checks a generated image against its caption
- build.py: the model's components and the diffusers folder writer
- train.py: the two-stage CPU training run (``crossattn-sd train-tiny``)
- weights/: the shipped pipeline folder, loadable with
  ``StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR)``
"""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
