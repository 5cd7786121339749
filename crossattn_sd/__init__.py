"""crossattn-sd: see and steer how text conditions a Stable Diffusion model.

    >>> import crossattn_sd
    >>> pipe = crossattn_sd.load_pipeline()            # the embedded model, offline, on the CPU
    >>> result = crossattn_sd.generate(pipe, "a red circle on the left and a blue square on the right")
    >>> result.heatmap("circle")                        # float32 (H, W) in [0, 1]

Heavy libraries (torch, diffusers) load on first use, not at import.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": "pipeline", "generate": "pipeline", "SCHEDULERS": "pipeline",
    "GenerationCancelled": "pipeline",
    "capture": "processors", "CaptureProcessor": "processors",
    "MapStore": "maps",
    "GenerationResult": "result", "load_result": "bundle_load",
    "ProcessorSpec": "steering", "parse_weights": "steering", "PROCESSORS": "steering",
    "align_prompt": "tokens",
    "inspect_image": "inspect", "load_image": "inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'crossattn_sd' has no attribute {name!r}")
