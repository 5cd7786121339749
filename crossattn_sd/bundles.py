"""Map bundles: a saved result as one .zip (what the web UI offers for download and opens again).

Opening one is bounded and checked before anything is written: at most `MAX_MEMBERS` members, no duplicate
names, only the files `GenerationResult.save` writes (by name: no paths, so nothing lands outside the
extraction folder), at most `MAX_BUNDLE_BYTES` unpacked and no member packed more than `MAX_RATIO` times
(a zip bomb is refused from its directory, before a byte is extracted). Extraction goes to a fresh temporary
folder that is removed when the bundle is loaded or refused; `load_result` then checks the files as a whole.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import GenerationResult

BUNDLE_MEMBERS = re.compile(r"(meta\.json|attention\.safetensors|maps\.npz|image(-\d+)?\.png)")
REQUIRED = ("meta.json", "attention.safetensors", "image.png")
MAX_BUNDLE_BYTES = 2 << 30  # unpacked size of a bundle's files (per-step maps are capped at 1 GiB by default)
MAX_MEMBERS = 100  # zip entries of any name (a result has at most 64 images + 3 files)
MAX_RATIO = 100  # unpacked / packed size of one member; ours are stored (1x) or JSON (about 5x)
SMALL_MEMBER = 1 << 20  # members smaller than this may pack better than MAX_RATIO (a short meta.json)
FIX = "upload a .zip downloaded from this app or made from a folder written by result.save()"


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip a saved result (binary maps stored as they are: they barely compress)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.iterdir()):
            if path.is_file() and BUNDLE_MEMBERS.fullmatch(path.name):
                packed = path.suffix in (".safetensors", ".npz", ".png")
                zf.write(path, path.name, compress_type=zipfile.ZIP_STORED if packed else zipfile.ZIP_DEFLATED)
    return zip_path


def bundle_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members to extract, after checking the zip's directory against the limits (ValueError if not)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ValueError(f"it has {len(infos)} members; a bundle has at most {MAX_MEMBERS}")
    members = [i for i in infos if BUNDLE_MEMBERS.fullmatch(i.filename)]
    names = [i.filename for i in members]
    if len(set(names)) != len(names):
        raise ValueError("it holds a file twice")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    total = sum(i.file_size for i in members)
    if total > MAX_BUNDLE_BYTES:
        raise ValueError(f"it unpacks to {_human(total)}; the limit is {_human(MAX_BUNDLE_BYTES)}")
    for i in members:
        if i.file_size > SMALL_MEMBER and i.file_size > MAX_RATIO * max(1, i.compress_size):
            raise ValueError(f"{i.filename} unpacks {i.file_size // max(1, i.compress_size)} times larger than "
                             f"it is packed; the limit is {MAX_RATIO}")
    return members


def _human(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path) -> None:
    """Copy one member, writing no more than its directory entry declares."""
    left = info.file_size
    with zf.open(info) as src, open(folder / info.filename, "wb") as dst:
        while chunk := src.read(min(1 << 20, left + 1)):
            left -= len(chunk)
            if left < 0:
                raise ValueError(f"{info.filename} is larger than the zip's directory says")
            dst.write(chunk)


def read_bundle(zip_path: str | Path, scratch: str | Path | None = None, *, name: str | None = None,
                keep_images: Path | None = None) -> GenerationResult:
    """Load a zip bundle: check it, extract it into a temporary folder under `scratch`, load and check the result,
    and remove the folder (also when it is refused).

    Args:
        zip_path: the .zip file.
        scratch: where the temporary folder goes (default: the system's temp folder).
        name: what error messages call the file (default: its base name; never its folder).
        keep_images: a folder to move the bundle's images to before the rest is removed.

    Raises:
        ValueError: it is not a bundle, exceeds a limit, or its files are not one consistent result (one line).
    """
    from .bundle_load import load_result

    zip_path = Path(zip_path)
    name = name or zip_path.name
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as zf, tempfile.TemporaryDirectory(dir=scratch, prefix="open-") as tmp:
            members = bundle_members(zf)
            for info in members:
                _extract(zf, info, Path(tmp))
            result = load_result(tmp, name=name)
            if keep_images is not None:
                keep_images.mkdir(parents=True, exist_ok=True)
                for info in members:
                    if info.filename.endswith(".png"):
                        shutil.move(Path(tmp) / info.filename, keep_images / info.filename)
    except ValueError as err:
        if str(err).startswith(f"{name} is not a readable"):  # load_result's: it names the file already
            raise
        raise ValueError(f"{name} is not a crossattn-sd map bundle ({err}); {FIX}") from err
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise ValueError(f"{name} is not a crossattn-sd map bundle ({why}); {FIX}") from err
    return result

