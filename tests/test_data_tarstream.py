"""The lean tar reader (data_shards/tarstream.py) against Python's tarfile on every tar format, its damage
handling inside the loader, uint8 batches, and JPEG draft decoding."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.loader import LoaderOptions, ShardDataset, as_float, collate, decode_sample, make_loader
from data_shards.tarstream import TarStreamError, _checksum_ok, tar_members

LONG = "a-very-long-sample-key-" + "x" * 120  # > 100 characters: a pax record or a GNU long-name member


def _tar(fmt: int, members: list[tuple[str, bytes]], extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extras:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extras:
            link = tarfile.TarInfo("link.json")
            link.type, link.linkname = tarfile.SYMTYPE, "s0.json"
            tar.addfile(link)
    return buf.getvalue()


def _members(n: int = 5) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        key = LONG if i == 2 else f"sub/s{i}"
        out += [(f"{key}.jpg", rng.bytes(int(rng.integers(0, 3000)))), (f"{key}.json", b'{"labels": []}'),
                (f"__meta{i}__", b"x")]
    out.append(("exact-block.bin", b"z" * 1024))  # a size that is a multiple of the block
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_member_equals_pythons_tarfile(fmt):
    members = _members()
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long names beyond its 155 + 100 prefix split
        members = [(n.replace(LONG, "sub/" + LONG[:90]), d) for n, d in members]
    blob = _tar(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and not m.name.startswith("__")]
    got = list(tar_members(io.BytesIO(blob)))
    assert got == expected and len(got) == 11
    assert [n for n, _ in got if "long" in n] == [n for n, _ in members if "long" in n and "__" not in n]


def test_select_files_skips_members_unread():
    blob = _tar(tarfile.PAX_FORMAT, _members())
    got = list(tar_members(io.BytesIO(blob), select_files=lambda name: name.endswith(".json")))
    assert [n for n, _ in got] == [n for n, _ in _members() if n.endswith(".json")]


def test_checksum_is_exact_for_any_header_bytes():
    """The Adler-32 halves give the exact byte sum Python's tarfile computes, however large (up to 512 · 255)."""
    rng = np.random.default_rng(0)
    for fill in ("random", "max", "zero"):
        for _ in range(20 if fill == "random" else 1):
            header = bytearray(rng.integers(0, 256, 512, dtype=np.uint8).tobytes() if fill == "random"
                               else (b"\xff" if fill == "max" else b"\0") * 512)
            unsigned, _ = tarfile.calc_chksums(bytes(header))
            header[148:156] = b"%06o\0 " % unsigned
            assert _checksum_ok(bytes(header)), fill
            header[148:156] = b"%06o\0 " % (unsigned + 1)
            assert not _checksum_ok(bytes(header)), fill


def test_damaged_header_and_cut_member_raise():
    blob = bytearray(_tar(tarfile.GNU_FORMAT, _members(), extras=False))
    cut = bytes(blob[:512 + 100])  # the first header and part of its member
    with pytest.raises(TarStreamError, match="cut short"):
        list(tar_members(io.BytesIO(cut)))
    damaged = bytearray(blob)
    first_size = int(bytes(damaged[124:136]).strip(b"\0 "), 8)
    second = 512 + -(-first_size // 512) * 512
    damaged[second + 10] ^= 0xFF  # the second header's name: its checksum no longer matches
    reader = tar_members(io.BytesIO(bytes(damaged)))
    assert next(reader)[0] == "sub/s0.jpg"  # what came before the damage is kept
    with pytest.raises(TarStreamError, match="checksum"):
        next(reader)
    with pytest.raises(TarStreamError, match="ends inside a header"):
        list(tar_members(io.BytesIO(bytes(blob[:second + 300]))))


def test_damaged_shard_in_the_loader_is_counted_and_the_rest_read(toy_dataset, tmp_path):
    """A shard whose middle header is damaged: the samples before it are read, the same ones as with
    webdataset's reader, and the loss is counted as 'tar' (Python's tarfile, under webdataset, takes a bad
    header after the first for the end of the archive and says nothing)."""
    import shutil

    from data_shards.manifest import read_manifest

    copy = tmp_path / "toy"
    shutil.copytree(os.path.dirname(toy_dataset), copy)
    shards = read_manifest(str(copy)).split("val").shards
    raw = bytearray(open(shards[0], "rb").read())
    with tarfile.open(shards[0]) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    raw[offsets[len(offsets) // 2] + 5] ^= 0xFF  # the name in the header of a member halfway through
    open(shards[0], "wb").write(bytes(raw))
    counts = {}
    for reader in ("lean", "webdataset"):
        dataset = ShardDataset(str(copy), "val", LoaderOptions(image_size=32, batch_size=4, train=False,
                                                               tar_reader=reader))
        keys = [k for batch in dataset for k in batch["key"]]
        counts[reader] = (len(keys), dataset.skipped.total)
    total = read_manifest(str(copy)).split("val").samples
    assert counts["lean"][0] < total and counts["lean"][1] == 1
    assert counts["lean"][0] == counts["webdataset"][0] and counts["webdataset"][1] == 0


def test_uint8_batches_make_the_same_float_batch(toy_dataset):
    options = dict(image_size=32, batch_size=4, train=True, seed=1, shuffle_buffer=16)
    floats = list(make_loader(toy_dataset, "train", LoaderOptions(**options)))
    bytes_ = list(make_loader(toy_dataset, "train", LoaderOptions(**options, uint8=True)))
    assert len(floats) == len(bytes_) > 0
    for f, b in zip(floats, bytes_):
        assert b["image"].dtype == torch.uint8 and f["image"].dtype == torch.float32
        assert torch.equal(as_float(b["image"]), f["image"]) and as_float(b["image"]).stride() == f["image"].stride()
    assert as_float(floats[0]["image"]) is floats[0]["image"]
    batch = collate([{"image": np.full((2, 3, 3), 255, np.uint8), "labels": np.zeros(1, np.float32), "key": "k",
                      "meta": {}}], uint8=True)
    assert batch["image"].shape == (1, 3, 2, 3) and int(batch["image"].max()) == 255


def _jpeg(size: int) -> bytes:
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(6 * x) * 0.5 + 0.5, y, (x + y) / 2], -1)
    buf = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_draft_decoding_is_close_to_a_full_decode_and_only_for_large_sources():
    sample = {"__key__": "k", "jpg": _jpeg(400), "json": b'{"labels": [0]}'}
    full = decode_sample(sample, image_size=96, num_classes=1, with_mask=False, flip=False)["image"]
    draft = decode_sample(sample, image_size=96, num_classes=1, with_mask=False, flip=False, draft=True)["image"]
    assert full.shape == draft.shape == (96, 96, 3)
    error = np.abs(full.astype(float) - draft.astype(float))
    assert 0 < error.mean() < 2.0 and error.max() < 24  # not bit-identical, within ~1 % on average
    small = {**sample, "jpg": _jpeg(150)}  # < 2x the target: no DCT scaling, bit for bit the full decode
    args = dict(image_size=96, num_classes=1, with_mask=False, flip=True)
    assert np.array_equal(decode_sample(small, **args)["image"], decode_sample(small, **args, draft=True)["image"])
