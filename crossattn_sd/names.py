"""Small naming helpers shared by the CLI, the service and results (no heavy imports)."""

from __future__ import annotations

import re


def safe_name(word: str) -> str:
    """A word as a file-name part (letters, digits, - and _)."""
    return re.sub(r"[^\w\-]+", "_", word).strip("_") or "word"


def image_name(i: int) -> str:
    """The file name of a saved result's image `i` ("image.png", then "image-1.png", ...)."""
    return "image.png" if i == 0 else f"image-{i}.png"
