"""Opening map bundles: limits checked before extraction, nothing left on disk, the files checked as a whole.

Every refusal is one line naming the file (by its base name) and what is wrong with it.
"""

import dataclasses
import json
import os
import shutil
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_sd_pipeline
from PIL import Image

from crossattn_sd import bundles, workdir
from crossattn_sd.config import get_preset
from crossattn_sd.service import AttentionService, GenerateRequest

PRESET = dataclasses.replace(get_preset("tiny"), steps=2, height=32, width=32, max_side=64)
PROMPT = "a red square on the left"


@pytest.fixture(scope="module")
def service():
    return AttentionService(PRESET, pipe=tiny_sd_pipeline(0))


@pytest.fixture(scope="module")
def runs(service, tmp_path_factory):
    """Two saved runs that differ in size and prompt, as folders."""
    root = tmp_path_factory.mktemp("runs")
    a = service.generate(GenerateRequest(PROMPT, seed=1))
    b = service.generate(GenerateRequest("a blue cat", seed=2, width=48, height=32))
    return a.result.save(root / "a"), b.result.save(root / "b")


def pack(folder: Path, zip_path: Path, replace: dict[str, bytes] | None = None) -> Path:
    """Zip a result folder, replacing some members' bytes."""
    replace = replace or {}
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.writestr(p.name, replace.get(p.name, p.read_bytes()))
    return zip_path


def edited_meta(folder: Path, edit) -> bytes:
    meta = json.loads((folder / "meta.json").read_text())
    meta = edit(meta)
    return json.dumps(meta).encode()


def zip_bomb(path: Path, gib: int = 1) -> Path:
    """A valid zip whose attention.safetensors is `gib` GiB of zeros packed into about 1 MiB: the deflate stream
    of 1 MiB of zeros after a full flush is the same bytes every time, so it is written `1024 * gib` times
    instead of compressing a GiB (the CRC is the only pass over the zeros)."""
    zero = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
    data = block * (1024 * gib) + c.flush()
    crc = 0
    for _ in range(1024 * gib):
        crc = zlib.crc32(zero, crc)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("meta.json", "{}")
        zf.writestr("image.png", b"")
        info = zipfile.ZipInfo("attention.safetensors", date_time=(2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = gib << 30, len(data), crc
        info.header_offset = zf.fp.tell()
        zf.fp.write(info.FileHeader(zip64=True))
        zf.fp.write(data)
        zf.start_dir = zf.fp.tell()
        zf.filelist.append(info)
        zf.NameToInfo[info.filename] = info
        zf._didModify = True
    return path


def on_disk(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_a_zip_bomb_is_refused_before_extraction_and_leaves_nothing(service, tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip")
    with zipfile.ZipFile(bomb) as zf:
        assert zf.getinfo("attention.safetensors").file_size >= 1 << 30
    assert bomb.stat().st_size <= 1.1 * 2**20
    before = on_disk(service.workdir)
    with pytest.raises(ValueError, match=r"^bomb\.zip is not a crossattn-sd map bundle \(attention\.safetensors "
                                         r"unpacks 1\d\d\d times larger than it is packed; the limit is 100\)"):
        service.open_bundle(bomb)
    assert on_disk(service.workdir) == before  # no extraction folder, no entry, no copy
    assert not any((service.workdir / "scratch").glob("*"))


def test_the_size_and_member_limits_come_from_the_zip_directory(runs, tmp_path, monkeypatch):
    a, _ = runs
    zipped = pack(a, tmp_path / "run.zip")
    monkeypatch.setattr(bundles, "MAX_BUNDLE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"run\.zip is not a crossattn-sd map bundle \(it unpacks to [\d.]+ "
                                         r"(bytes|MiB); the limit is 1000 bytes\)"):
        bundles.read_bundle(zipped, tmp_path / "scratch-1")
    monkeypatch.undo()
    many = tmp_path / "many.zip"
    shutil.copyfile(zipped, many)
    with zipfile.ZipFile(many, "a") as zf:
        for i in range(bundles.MAX_MEMBERS):
            zf.writestr(f"junk-{i}.txt", "")
    with pytest.raises(ValueError, match=f"it has {bundles.MAX_MEMBERS + 4} members; a bundle has at most"):
        bundles.read_bundle(many)


def test_members_with_paths_are_never_written(runs, tmp_path):
    a, _ = runs
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        for p in sorted(a.iterdir()):
            zf.writestr(f"../{p.name}", p.read_bytes())
        zf.writestr("/tmp/meta.json", "{}")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ValueError, match="evil.zip is not a crossattn-sd map bundle .it lacks meta.json, "
                                         "attention.safetensors, image.png."):
        bundles.read_bundle(evil, scratch)
    assert list(scratch.iterdir()) == [] and not (tmp_path / "meta.json").exists()


def test_a_good_bundle_opens_and_its_extraction_folder_is_removed(service, runs, tmp_path):
    a, _ = runs
    entry = service.open_bundle(pack(a, tmp_path / "good.zip"))
    assert entry.words == ["a", "red", "square", "on", "the", "left"]
    assert not any((service.workdir / "scratch").glob("*"))
    assert sorted(p.name for p in entry.bundle.parent.iterdir()) == ["good.zip", "image.png"]
    assert entry.image_path.is_file()


# Each bad bundle: (what to change in run a's files, what the one-line error must say).
BAD = {
    "meta is a list": (lambda a, b: {"meta.json": b"[]"}, r"meta\.json is \[\]; expected an object"),
    "settings is a list": (lambda a, b: {"meta.json": edited_meta(a, lambda m: {**m, "settings": [1, 2]})},
                           r"settings is \[1, 2\]; expected an object"),
    "token index past the maps": (
        lambda a, b: {"meta.json": edited_meta(a, lambda m: {**m, "alignments": [
            {**m["alignments"][0], "words": [{**m["alignments"][0]["words"][1], "token_indices": [999]}]}]})},
        r"prompt 0's token index 999 is outside the maps' 16 tokens"),
    "token index not a number": (
        lambda a, b: {"meta.json": edited_meta(a, lambda m: {**m, "alignments": [
            {**m["alignments"][0], "words": [{**m["alignments"][0]["words"][1], "token_indices": ["x"]}]}]})},
        r'alignments\[0\]\.words\[0\]\.token_indices\[0\] is "x"; expected a whole number'),
    "another run's maps": (lambda a, b: {"attention.safetensors": (b / "attention.safetensors").read_bytes()},
                           r"attention\.safetensors is not the file meta\.json describes \(the files come from "
                           r"different runs\)"),
    "another run's maps, no checksums": (
        lambda a, b: {"attention.safetensors": (b / "attention.safetensors").read_bytes(),
                      "meta.json": edited_meta(a, lambda m: {k: v for k, v in m.items() if k != "sha256"})},
        r"meta\.json's layer shapes differ from the maps'"),
    "another run's image, no checksums": (
        lambda a, b: {"image.png": (b / "image.png").read_bytes(),
                      "meta.json": edited_meta(a, lambda m: {k: v for k, v in m.items() if k != "sha256"})},
        r"layer 'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2''s 16x16 maps do not fit the 48x32 "
        r"image"),
    "format": (lambda a, b: {"meta.json": edited_meta(a, lambda m: {**m, "format": "1"})},
               r"unsupported format '1'; this version reads format 1"),
    "unknown tensor": (lambda a, b: {"meta.json": edited_meta(a, lambda m: {k: v for k, v in m.items()
                                                                             if k != "sha256"}),
                                     "attention.safetensors": _extra_tensor(a)},
                       r"attention\.safetensors has an unknown tensor 'junk'"),
}


def _extra_tensor(folder: Path) -> bytes:
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(str(folder / "attention.safetensors"))
    return save({**tensors, "junk": torch.zeros(1)})


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_bundle_is_one_line_naming_the_value(service, runs, tmp_path, case):
    change, message = BAD[case]
    a, b = runs
    zipped = pack(a, tmp_path / "upload.zip", change(a, b))
    before = on_disk(service.workdir)
    with pytest.raises(ValueError, match=message) as info:
        service.open_bundle(zipped)
    text = str(info.value)
    assert text.startswith("upload.zip is not a readable crossattn-sd result (") and "\n" not in text
    assert str(tmp_path) not in text and str(service.workdir) not in text  # base names only
    assert on_disk(service.workdir) == before


def test_old_bundles_without_checksums_still_open(service, runs, tmp_path):
    a, _ = runs
    meta = edited_meta(a, lambda m: {k: v for k, v in m.items() if k != "sha256"})
    entry = service.open_bundle(pack(a, tmp_path / "old.zip", {"meta.json": meta}))
    assert entry.words == ["a", "red", "square", "on", "the", "left"]


def test_the_work_folder_is_pruned_by_age_and_size(service, monkeypatch):
    service.work.prune()  # start from what the other tests left
    entries = [service.generate(GenerateRequest(PROMPT, seed=s, steps=1)) for s in range(3)]
    folders = [e.bundle.parent for e in entries]
    assert all(f.is_dir() for f in folders)
    view = service.png_file(Image.new("RGB", (4, 4)))
    service.work.prune(now=time.time() + workdir.VIEW_MAX_AGE_S + 1)
    assert not view.exists() and all(f.is_dir() for f in folders)  # views go first
    service.work.prune(now=time.time() + workdir.ENTRY_MAX_AGE_S + 1)
    assert not any(f.exists() for f in folders)
    # A session still showing a pruned entry gets its files written again.
    again = service.files(entries[0])
    assert again.bundle.is_file() and again.image_path.is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(again.image_path).convert("RGB")), np.asarray(entries[0].image))

    more = [service.generate(GenerateRequest(PROMPT, seed=s, steps=1)) for s in range(3)]
    size = sum(p.stat().st_size for e in more[1:] for p in e.bundle.parent.iterdir())
    monkeypatch.setattr(workdir, "MAX_ENTRY_BYTES", size)  # room for the newest two
    for e, t in zip(more, (1, 2, 3)):  # oldest first
        os.utime(e.bundle.parent, (2e9 - 10 + t, 2e9 - 10 + t))
    service.work.prune(now=2e9)
    assert [e.bundle.parent.exists() for e in more] == [False, True, True]


def test_without_an_outputs_folder_an_entry_keeps_only_its_zip_and_images(service):
    entry = service.generate(GenerateRequest(PROMPT, seed=4, steps=1))
    assert sorted(p.name for p in entry.bundle.parent.iterdir()) == sorted([entry.bundle.name, "image.png"])
    with zipfile.ZipFile(entry.bundle) as zf:
        assert sorted(zf.namelist()) == ["attention.safetensors", "image.png", "maps.npz", "meta.json"]
