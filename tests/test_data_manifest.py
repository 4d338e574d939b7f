"""Manifest round trip and errors; shard writer naming, temp files and byte-identical output."""
import json
import os

import pytest

from data_shards.loader import raw_samples
from data_shards.errors import DataError
from data_shards.manifest import SplitInfo, open_url, read_manifest, write_manifest
from data_shards.writer import ShardWriter, make_sample


def _write(folder, split, n, maxcount):
    with ShardWriter(str(folder), split, maxcount) as writer:
        for i in range(n):
            writer.write(make_sample(f"{split}-{i:06d}", b"jpegbytes%d" % i, {"labels": [i % 2]}))
        return writer.close()


def test_writer_names_counts_and_deterministic_bytes(tmp_path):
    info = _write(tmp_path / "a", "train", 7, maxcount=3)
    assert info.shards == ["train-00000.tar", "train-00001.tar", "train-00002.tar"] and info.samples == 7
    assert sorted(os.listdir(tmp_path / "a")) == info.shards  # no temp files left
    assert [len(raw_samples(str(tmp_path / "a" / s))) for s in info.shards] == [3, 3, 1]
    _write(tmp_path / "b", "train", 7, maxcount=3)
    for name in info.shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert _write(tmp_path / "c", "val", 0, maxcount=3).shards == []  # no empty shard


def test_manifest_round_trip_resolves_shards_next_to_it(tmp_path):
    split = SplitInfo(["train-00000.tar", "train-00001.tar"], 12, False)
    path = write_manifest(str(tmp_path), ["bird", "fish"], {"train": split, "val": SplitInfo(["val-00000.tar"], 3, True)})
    assert path == str(tmp_path / "manifest.json") and not os.path.exists(path + ".tmp")
    doc = json.loads(open(path).read())
    assert doc == {"version": 1, "classes": ["bird", "fish"], "splits": {
        "train": {"shards": ["train-00000.tar", "train-00001.tar"], "samples": 12, "has_masks": False},
        "val": {"shards": ["val-00000.tar"], "samples": 3, "has_masks": True}}}
    for url in (str(tmp_path), path, "file://" + path):
        manifest = read_manifest(url)
        assert manifest.classes == ["bird", "fish"]
        assert manifest.split("train").shards == [str(tmp_path / "train-00000.tar"), str(tmp_path / "train-00001.tar")]
        assert manifest.split("val").has_masks and manifest.split("val").samples == 3


def test_manifest_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match=rf"no manifest.json in {tmp_path} \(expected a data set written by"):
        read_manifest(str(tmp_path))
    write_manifest(str(tmp_path), ["bird"], {"train": SplitInfo([], 0), "val": SplitInfo([], 0)})
    with pytest.raises(DataError, match=rf"manifest {tmp_path}/manifest.json has no split 'foo' \(splits: train, val\)"):
        read_manifest(str(tmp_path)).split("foo")
    (tmp_path / "manifest.json").write_text('{"version": 1, "classes": ["bird"]}')
    with pytest.raises(DataError, match=r"manifest .*manifest.json is not valid: 'splits'"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"version": 7, "classes": [], "splits": {}}')
    with pytest.raises(DataError, match=r"has version 7; this reader understands 1"):
        read_manifest(str(tmp_path))
    with pytest.raises(DataError, match=r"cannot open gs://bucket/x/manifest.json: unsupported URL scheme 'gs'"):
        open_url("gs://bucket/x/manifest.json")
