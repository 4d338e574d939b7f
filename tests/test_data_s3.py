"""Data sets on S3 against a real S3-compatible server (s3rver): toy-birds written straight to S3, the
loader over 2 simulated ranks x 2 workers in exact and resampled mode, a server restart in the middle of a
shard, corrupt contents, clear errors, `data upload` / `data ls`, retries on throttling."""
import io
import os
import subprocess
import sys
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest

from data_shards import s3
from data_shards.errors import DataError
from data_shards.loader import LoaderOptions, make_loader, raw_samples
from data_shards.manifest import SplitInfo, read_manifest, url_exists, write_manifest
from data_shards.toy_birds import build_toy_birds
from data_shards.writer import ShardWriter, copy_dataset, encode_jpeg, make_sample
from s3_server import BUCKET, s3_server  # noqa: F401  (the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
TOY = dict(seed=0, size=64, rho=0.9, maxcount=16, progress=False,
           counts={"train": 96, "val": 32, "test_aligned": 16, "test_conflict": 16})


def _put(url: str, data: bytes) -> None:
    with s3.open_s3(url, "wb") as f:
        f.write(data)


def _get(url: str) -> bytes:
    with s3.open_s3(url, "rb") as f:
        return f.read()


def _good(key: str, labels=(0,)) -> dict:
    pixels = np.random.default_rng(zlib.crc32(key.encode())).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return make_sample(key, encode_jpeg(pixels), {"labels": list(labels)})


def _tar(samples: list[dict]) -> bytes:
    """A tar of the samples member by member (any bytes allowed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _per_rank(monkeypatch, url: str, ranks: int = 2, **kwargs) -> list[list[dict]]:
    """All batches each simulated rank's DataLoader yields (RANK / WORLD_SIZE in the environment)."""
    out = []
    for rank in range(ranks):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        loader = make_loader(url, "train", LoaderOptions(image_size=SIZE, batch_size=8, train=True, **kwargs))
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.dataset.skipped.total == 0
        out.append(batches)
    return out


@pytest.fixture(scope="module")
def s3_toy(s3_server, tmp_path_factory) -> tuple[str, str]:
    """toy-birds built straight into S3, and the same build on local disk: (S3 manifest, local manifest)."""
    url = build_toy_birds(f"s3://{BUCKET}/toy", **TOY)
    local = build_toy_birds(str(tmp_path_factory.mktemp("toy_local")), **TOY)
    return url, local


def test_toy_birds_written_to_s3_equal_the_local_build(s3_toy):
    url, local = s3_toy
    assert url == f"s3://{BUCKET}/toy/manifest.json"
    remote, here = read_manifest(url), read_manifest(local)
    assert {n: (i.samples, i.has_masks, i.shard_samples) for n, i in remote.splits.items()} == \
        {n: (i.samples, i.has_masks, i.shard_samples) for n, i in here.splits.items()}
    assert remote.split("train").shard_samples == [16] * 6
    for split in remote.splits:
        for s3_shard, local_shard in zip(remote.split(split).shards, here.split(split).shards):
            assert s3_shard == f"s3://{BUCKET}/toy/{os.path.basename(local_shard)}"
            assert _get(s3_shard) == open(local_shard, "rb").read()
    assert _get(url) == open(local, "rb").read()


def test_exact_mode_every_sample_once_over_2_ranks_x_2_workers(s3_toy, monkeypatch):
    url, _ = s3_toy
    expected = sorted(raw["__key__"] for shard in read_manifest(url).split("train").shards for raw in raw_samples(shard))
    assert len(expected) == 96
    for epoch in (0, 1):
        ranks = _per_rank(monkeypatch, url, num_workers=2, epoch=epoch, shuffle_buffer=20)
        counts = [len(batches) for batches in ranks]
        # 6 shards of 16 over 4 readers: two read 32 samples (4 batches), two read 16 and are padded to 4
        assert counts == [8, 8]
        real = [k for batches in ranks for b in batches for k, pad in zip(b["key"], b["padded"]) if not pad]
        assert sorted(real) == expected  # no duplicates, no losses
        padded = [k for batches in ranks for b in batches for k, pad in zip(b["key"], b["padded"]) if pad]
        assert len(padded) == 8 * 8 * 2 - 96
        for batches in ranks:
            assert all(b["image"].shape == (8, 3, SIZE, SIZE) and "mask" not in b for b in batches)
    # the drop policy cuts every reader to the shortest instead: 2 batches each, nothing padded
    ranks = _per_rank(monkeypatch, url, num_workers=2, balance="drop")
    assert [len(b) for b in ranks] == [4, 4]
    keys = [k for batches in ranks for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys) == 64 and not any(p for bs in ranks for b in bs for p in b["padded"])


def test_resampled_mode_equal_batch_counts_per_rank(s3_toy, monkeypatch):
    url, _ = s3_toy
    ranks = _per_rank(monkeypatch, url, num_workers=2, sampling="resampled")
    assert [len(b) for b in ranks] == [96 // (8 * 2 * 2) * 2] * 2 == [6, 6]
    again = _per_rank(monkeypatch, url, num_workers=2, sampling="resampled")
    assert [k for bs in ranks for b in bs for k in b["key"]] == [k for bs in again for b in bs for k in b["key"]]
    # with 3 ranks x 2 workers = 6 readers the exact mode still has a shard per reader; 4 ranks would not
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(DataError, match=r"has 6 shard\(s\) for 4 rank\(s\) x 2 worker\(s\) = 8 readers; exact"):
        make_loader(url, "train", LoaderOptions(image_size=SIZE, batch_size=8, train=True, num_workers=2))
    assert len(make_loader(url, "train", LoaderOptions(image_size=SIZE, batch_size=8, train=True, num_workers=2,
                                                      sampling="resampled"))) == 2


def test_eval_split_from_s3_with_masks(s3_toy):
    url, local = s3_toy
    options = LoaderOptions(image_size=SIZE, batch_size=10, train=False, num_workers=2)
    remote = [(k, m.sum().item()) for b in make_loader(url, "val", options) for k, m in zip(b["key"], b["mask"])]
    here = [(k, m.sum().item()) for b in make_loader(local, "val", options) for k, m in zip(b["key"], b["mask"])]
    assert sorted(remote) == sorted(here) and len(remote) == 32


def test_server_restart_in_the_middle_of_a_shard(s3_server, caplog):
    # One ~30 MB shard of incompressible images: far more than the socket buffers hold, so killing the
    # server after the first batch breaks the stream mid-object.
    rng = np.random.default_rng(0)
    url = f"s3://{BUCKET}/restart"
    with ShardWriter(url, "val", maxcount=1000) as writer:
        for i in range(96):
            noise = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
            writer.write(make_sample(f"val-{i:06d}", encode_jpeg(noise, quality=95), {"labels": [i % 2]}))
        info = writer.close()
    write_manifest(url, ["bird", "fish"], {"val": info})
    shard = info.shards[0]
    head = s3.client().head_object(Bucket=BUCKET, Key="restart/" + shard)
    assert head["ContentLength"] > 25 * 2**20

    loader = make_loader(url, "val", LoaderOptions(image_size=SIZE, batch_size=8, train=False))
    keys = []
    with caplog.at_level("WARNING", logger="data_shards.s3"):
        for number, batch in enumerate(loader):
            keys += batch["key"]
            if number == 0:
                s3_server.restart()
    assert keys == [f"val-{i:06d}" for i in range(96)]  # every sample once, in order
    assert loader.dataset.skipped.total == 0
    assert any("resuming with a ranged GET" in r.getMessage() for r in caplog.records)


def test_corrupt_contents_are_skipped_and_counted(s3_server):
    prefix = f"s3://{BUCKET}/corrupt"
    good = [_good(f"a{i:03d}") for i in range(6)]
    shard0 = good[:3] + [{**_good("b000"), "jpg": b"\xff\xd8 not a jpeg"}, {**_good("b001"), "json": b"{oops"},
                         {k: v for k, v in _good("b002").items() if k != "jpg"}] + good[3:]
    shard1 = _tar([_good(f"c{i:03d}") for i in range(8)])
    _put(f"{prefix}/val-00000.tar", _tar(shard0))
    with tarfile.open(fileobj=io.BytesIO(shard1)) as tar:
        cut = tar.getmember("c001.jpg").offset_data + 100
    _put(f"{prefix}/val-00001.tar", shard1[:cut])  # truncated inside the second sample
    write_manifest(prefix, ["bird"], {"val": SplitInfo(["val-00000.tar", "val-00001.tar"], 17, False)})
    loader = make_loader(prefix, "val", LoaderOptions(image_size=SIZE, batch_size=4, train=False))
    keys = [k for b in loader for k in b["key"]]
    assert keys == [f"a{i:03d}" for i in range(6)] + ["c000"]
    counts = loader.dataset.skipped.counts()
    assert (counts["image"], counts["json"], counts["missing"]) == (1, 1, 1) and counts["tar"] >= 1


def test_missing_object_bucket_and_manifest_fail_with_the_url(s3_server):
    prefix = f"s3://{BUCKET}/holes"
    _put(f"{prefix}/train-00000.tar", _tar([_good(f"a{i:03d}") for i in range(4)]))
    write_manifest(prefix, ["bird"], {"train": SplitInfo(["train-00000.tar", "train-00001.tar"], 8, False)})
    loader = make_loader(prefix, "train", LoaderOptions(image_size=SIZE, batch_size=2, train=False))
    with pytest.raises(DataError, match=rf"cannot read {prefix}/train-00001.tar: no such object"):
        list(loader)
    with pytest.raises(DataError, match=r"cannot read s3://no-such-bucket/x/manifest.json: bucket "
                                        r"'no-such-bucket' does not exist"):
        read_manifest("s3://no-such-bucket/x")
    with pytest.raises(DataError, match=rf"no manifest.json in s3://{BUCKET}/nothing-here \(expected a data set"):
        read_manifest(f"s3://{BUCKET}/nothing-here/")
    assert not url_exists(f"s3://{BUCKET}/nothing-here/manifest.json")
    with pytest.raises(DataError, match=r"cannot stat s3://no-such-bucket/a: bucket 'no-such-bucket' does not"):
        url_exists("s3://no-such-bucket/a")


def test_convert_folder_straight_to_s3_and_add_a_split(s3_server, tmp_path):
    from PIL import Image

    from data_shards.convert import convert_folder

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(images / f"im{i}.jpg")
    (tmp_path / "tags.csv").write_text("image,labels\n" + "".join(f"im{i}.jpg,{'cat' if i % 2 else ''}\n"
                                                                  for i in range(5)))
    out = f"s3://{BUCKET}/converted"
    for split in ("train", "val"):
        path = convert_folder(str(images), str(tmp_path / "tags.csv"), out, split, classes=["cat"], maxcount=2)
    manifest = read_manifest(path)
    assert path == f"{out}/manifest.json" and list(manifest.splits) == ["train", "val"]
    assert manifest.split("val").shard_samples == [2, 2, 1]
    batches = list(make_loader(out, "val", LoaderOptions(image_size=16, batch_size=5, train=False)))
    assert batches[0]["labels"][:, 0].tolist() == [0, 1, 0, 1, 0]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data_shards", "data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_bad_or_no_credentials_fail_clearly_and_never_show_the_secret(s3_toy, s3_server):
    url, _ = s3_toy
    secret = "wsssrec-very-secret-value-42"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY", "AWS_SECRET_ACCESS_KEY": secret}
    result = _cli("ls", url, env=env)
    assert result.returncode == 2
    assert f"cannot read {url}: access denied (InvalidAccessKeyId)" in result.stderr
    assert "AWS_PROFILE" in result.stderr and "Traceback" not in result.stderr
    assert secret not in result.stderr + result.stdout and "AKIAWRONGKEY" not in result.stderr + result.stdout
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    result = _cli("ls", url, env=env)
    assert result.returncode == 2 and f"cannot read {url}: no AWS credentials found" in result.stderr


def test_upload_and_ls_commands(toy_dataset, s3_server):
    dest = f"s3://{BUCKET}/uploaded"
    result = _cli("upload", os.path.dirname(toy_dataset), dest)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    manifest_line = lines.index(f"wrote manifest {dest}/manifest.json (last)")
    assert all(line.startswith("copied ") for line in lines[:manifest_line]) and manifest_line == 6  # 3+1+1+1 shards
    local = read_manifest(toy_dataset)
    total_bytes = sum(os.path.getsize(s) for info in local.splits.values() for s in info.shards)
    for shard in local.split("train").shards:
        assert _get(f"{dest}/{os.path.basename(shard)}") == open(shard, "rb").read()

    result = _cli("ls", dest)
    assert result.returncode == 0, result.stderr
    assert "classes (1): bird" in result.stdout.splitlines()
    assert any(line.split()[:5] == ["train", "96", "samples", "3", "shards"] for line in result.stdout.splitlines())
    assert result.stdout.splitlines()[-1] == f"total 192 samples, {total_bytes} bytes"

    with pytest.raises(DataError, match=rf"{dest}/manifest.json already exists \(pass overwrite=True / --overwrite"):
        copy_dataset(toy_dataset, dest)
    assert copy_dataset(toy_dataset, dest, overwrite=True) == f"{dest}/manifest.json"


def test_manifest_is_uploaded_last_and_failed_shards_leave_nothing(toy_dataset, s3_server):
    dest = f"s3://{BUCKET}/ordered"
    seen = []
    copy_dataset(toy_dataset, dest, progress=lambda src, dst: seen.append(url_exists(f"{dest}/manifest.json")))
    assert len(seen) == 6 and not any(seen) and url_exists(f"{dest}/manifest.json")

    url = f"s3://{BUCKET}/failed"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(url, "train", maxcount=4) as writer:
            for i in range(6):
                writer.write(_good(f"s{i:03d}"))
            raise RuntimeError("boom")
    assert url_exists(f"{url}/train-00000.tar") and not url_exists(f"{url}/train-00001.tar")


def test_large_objects_go_up_in_parts_and_appear_only_when_complete(s3_server):
    url = f"s3://{BUCKET}/big/object.bin"
    data = np.random.default_rng(1).integers(0, 256, 2 * s3.PART_SIZE + 12345, dtype=np.uint8).tobytes()
    writer = s3.open_s3(url, "wb")
    for start in range(0, len(data), 3 * 2**20):
        writer.write(data[start:start + 3 * 2**20])
        assert not url_exists(url)  # parts uploaded so far are invisible
    writer.close()
    assert [p["PartNumber"] for p in writer.parts] == [1, 2, 3]
    assert _get(url) == data
    aborted = s3.open_s3(f"s3://{BUCKET}/big/aborted.bin", "wb")
    aborted.write(data)
    aborted.abort()
    assert not url_exists(f"s3://{BUCKET}/big/aborted.bin")


class _Throttling:
    """Wraps the real client: the first `failures` calls of `operation` answer 503 SlowDown (a fault the
    real server cannot be made to show)."""

    def __init__(self, real, operation: str, failures: int):
        self.real, self.operation, self.failures, self.calls = real, operation, failures, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name != self.operation:
            return attr

        def throttled(**kwargs):
            from botocore.exceptions import ClientError

            self.calls += 1
            if self.calls <= self.failures:
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                                   "ResponseMetadata": {"HTTPStatusCode": 503}}, name)
            return attr(**kwargs)
        return throttled


def test_throttling_is_retried_with_exponential_backoff(s3_server, monkeypatch):
    url = f"s3://{BUCKET}/throttled/object.bin"
    _put(url, b"x" * 1000)
    sleeps = []
    monkeypatch.setattr(s3.time, "sleep", sleeps.append)
    monkeypatch.setattr(s3.random, "uniform", lambda low, high: 1.0)
    throttled = _Throttling(s3.client(), "get_object", failures=4)
    monkeypatch.setattr(s3, "client", lambda: throttled)
    assert _get(url) == b"x" * 1000
    assert throttled.calls == 5 and sleeps == [0.25, 0.5, 1.0, 2.0]
    throttled.calls, throttled.failures = 0, 100
    with pytest.raises(DataError, match=rf"cannot read {url}: gave up after 8 attempts \(ClientError"):
        _get(url)
    assert Counter(sleeps[4:]) == Counter([0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0])


@pytest.mark.slow
def test_two_process_training_reads_from_s3(s3_toy, tmp_path):
    """Stage 1 under the real `deepspeed` launcher, 2 ranks on CPU, data.url=s3://..."""
    import json
    import shutil

    from s3_server import _free_port

    url, _ = s3_toy
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [deepspeed, "--num_accelerators", "2", "--master_port", str(_free_port()), "--module", "trainer",
         "train-classifier", "-c", "configs/toy_birds.yaml", f"data.url={os.path.dirname(url)}",
         "data.image_size=64", "data.num_workers=1", "classifier.epochs=1", f"train.out_dir={tmp_path}",
         "train.run_name=s3", "mlflow.enabled=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((tmp_path / "s3" / "classifier_history.json").read_text())
    assert history["world_size"] == 2 and len(history["loss"]) == 2  # 96 images / (32 x 2 ranks), padded up
    assert (tmp_path / "s3" / "classifier.pt").stat().st_size > 1e6
    assert "stage 1 done" in result.stdout and "val/g_accuracy" in result.stdout
