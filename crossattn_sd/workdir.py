"""The server's work folder: what it writes for the browser, bounded in age and size.

    views/           drawn overlays, grids and GIFs: the browser fetches them at once; deleted after VIEW_MAX_AGE_S
    entries/<key>/   one generation's (or opened bundle's) zip and shown images: deleted after ENTRY_MAX_AGE_S,
                     and oldest first while all entries hold more than MAX_ENTRY_BYTES
    scratch/         bundles being saved or opened (temporary folders, removed when done, also after errors)

Pruning runs at most once every PRUNE_EVERY_S, when something is written. The folder is removed when the
process exits: normally, on Ctrl-C, and on SIGTERM (`ui.serve` turns SIGTERM into the same shutdown).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

VIEW_MAX_AGE_S = 3600  # views go to the browser at once (Gradio copies them into its own cache)
ENTRY_MAX_AGE_S = 86400  # a day, as long as Gradio keeps its copies (`build_demo`'s delete_cache)
MAX_ENTRY_BYTES = 2 << 30  # all entries' zips and images together
PRUNE_EVERY_S = 60


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class WorkFolder:
    """A temporary folder of one server (`path`), pruned as it is written and removed at exit."""

    def __init__(self, prefix: str = "crossattn-sd-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._lock = threading.Lock()
        self._pruned = time.monotonic()
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def remove(self) -> None:
        """Delete the folder now (what exit does)."""
        self._finalizer()

    @contextlib.contextmanager
    def scratch(self):
        """A fresh temporary folder, removed on exit from the block (also after an error)."""
        (self.path / "scratch").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.path / "scratch") as tmp:
            yield Path(tmp)

    def new_entry(self) -> Path:
        """A new, empty folder for one entry's files."""
        self.maybe_prune()
        folder = self.path / "entries" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder

    def view(self, data: bytes, suffix: str) -> Path:
        """Write a drawn view, named by its hash (the same view twice is one file)."""
        self.maybe_prune()
        folder = self.path / "views"
        path = folder / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
        try:
            os.utime(path)  # in use again: not old
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path

    @staticmethod
    def touch(folder: Path) -> None:
        """Mark an entry's folder as in use (pruning goes by the folder's time)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(folder)

    def maybe_prune(self) -> None:
        with self._lock:
            if time.monotonic() - self._pruned < PRUNE_EVERY_S:
                return
            self._pruned = time.monotonic()
        self.prune()

    def prune(self, now: float | None = None) -> None:
        """Delete views older than VIEW_MAX_AGE_S, entries older than ENTRY_MAX_AGE_S, then the oldest entries
        while they hold more than MAX_ENTRY_BYTES."""
        now = time.time() if now is None else now
        for old in (self.path / "views").glob("*"):
            with contextlib.suppress(FileNotFoundError):  # another thread's prune got there first
                if now - old.stat().st_mtime > VIEW_MAX_AGE_S:
                    old.unlink()
        entries = []
        for folder in (self.path / "entries").glob("*"):
            with contextlib.suppress(FileNotFoundError):
                entries.append((folder.stat().st_mtime, _size(folder), folder))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for mtime, size, folder in entries:
            if now - mtime <= ENTRY_MAX_AGE_S and total <= MAX_ENTRY_BYTES:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
