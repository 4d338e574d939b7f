"""The data set manifest (which shards make up each split, how many samples, which classes) and the URL
helpers every reader and writer goes through: local paths, `file://` and `s3://bucket/prefix`.

A data set is a folder or an S3 prefix holding WebDataset shards and a `manifest.json` that is written
last, so a reader never sees a half-written data set.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import IO

from . import s3
from .errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
HOW_TO_MAKE = "expected a data set written by `wsssrec data toy-birds` or `wsssrec data convert`"


@dataclass
class SplitInfo:
    shards: list[str]  # full URLs after read_manifest; names relative to the manifest on disk
    samples: int
    has_masks: bool = False
    shard_samples: list[int] | None = None  # samples in each shard (manifests before it lack it)


@dataclass
class Manifest:
    url: str  # the manifest file itself
    version: int
    classes: list[str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(
                f"manifest {self.url} has no split {name!r} (splits: {', '.join(self.splits) or 'none'})"
            )
        return self.splits[name]


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def _local(url: str) -> str:
    scheme = _scheme(url)
    if scheme not in ("", "file"):
        raise DataError(f"cannot open {url}: unsupported URL scheme {scheme!r} (expected a local path, "
                        f"file:// or s3://)")
    return url[len("file://"):] if scheme == "file" else url


class AtomicFile:
    """A local file written under `PATH.tmp` and renamed on `close()`; `abort()` removes it."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.tmp = path, path + ".tmp"
        self._file = open(self.tmp, "wb")
        self.closed = False

    def write(self, data) -> int:
        return self._file.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            os.replace(self.tmp, self.path)
            self.closed = True

    def abort(self) -> None:
        if not self.closed:
            self._file.close()
            os.remove(self.tmp)
            self.closed = True

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close() if exc_type is None else self.abort()


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a data-set URL (local path, file:// or s3://) for reading ("rb") or writing ("wb").

    A writer is atomic: the file or object appears whole at `close()`, and `abort()` (or an exception
    inside `with`) leaves nothing behind."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"cannot open {url} in mode {mode!r}: only 'rb' and 'wb'")
    if _scheme(url) == "s3":
        return s3.open_s3(url, mode)
    path = _local(url)
    return open(path, "rb") if mode == "rb" else AtomicFile(path)


def url_size(url: str) -> int | None:
    """Size in bytes of a file or object; None when it does not exist."""
    if _scheme(url) == "s3":
        return s3.size(url)
    path = _local(url)
    return os.path.getsize(path) if os.path.isfile(path) else None


def url_exists(url: str) -> bool:
    return url_size(url) is not None


def url_sizes(urls: list[str]) -> dict[str, int | None]:
    """Sizes of many files or objects (one S3 listing per folder, not one request per object)."""
    sizes: dict[str, int | None] = {}
    s3_dirs = sorted({url_dirname(u) for u in urls if _scheme(u) == "s3"})
    for folder in s3_dirs:
        sizes.update(s3.list_sizes(folder + "/"))
    return {u: sizes.get(u) if _scheme(u) == "s3" else url_size(u) for u in urls}


def url_dirname(url: str) -> str:
    return posixpath.dirname(url) if "://" in url else os.path.dirname(url)


def join_url(base: str, name: str) -> str:
    """`name` inside folder or prefix `base`; a name that is already absolute or a URL stays as it is."""
    if "://" in name or os.path.isabs(name):
        return name
    return base.rstrip("/") + "/" + name if "://" in base else os.path.join(base, name)


def relative_name(url: str, base: str) -> str:
    """Inverse of join_url for URLs inside `base`; others stay as they are."""
    prefix = base.rstrip("/") + "/"
    if "://" in url:
        return url[len(prefix):] if url.startswith(prefix) else url
    return os.path.relpath(url, base) if os.path.isabs(url) else url


def manifest_url(url: str) -> str:
    """A manifest URL from either the manifest itself or the folder that holds it."""
    if url.endswith(".json"):
        return url
    return join_url(url, MANIFEST_NAME)


def read_manifest(url: str) -> Manifest:
    """Read a manifest (path or URL of manifest.json or of its folder); shard names become full URLs."""
    path = manifest_url(os.fspath(url))
    if path.startswith("file://"):
        path = path[len("file://"):]
    base = url_dirname(path)
    where = base or "."
    try:
        with open_url(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"no {MANIFEST_NAME} in {where} ({HOW_TO_MAKE})") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a manifest file ({HOW_TO_MAKE})") from None
    except DataError as exn:
        if getattr(exn, "code", None) == "NoSuchKey":
            raise DataError(f"no {MANIFEST_NAME} in {where} ({HOW_TO_MAKE})") from None
        raise
    try:
        doc = json.loads(raw)
        version = int(doc["version"])
        classes = [str(c) for c in doc["classes"]]
        split_docs = doc["splits"]
        if not isinstance(split_docs, dict):
            raise TypeError("splits must be an object")
    except (ValueError, KeyError, TypeError) as exn:
        raise DataError(
            f"manifest {path} is not valid: {exn} (expected JSON with version, classes, splits)"
        ) from None
    if version != MANIFEST_VERSION:
        raise DataError(f"manifest {path} has version {version}; this reader understands {MANIFEST_VERSION}")
    splits = {}
    for name, info in split_docs.items():
        try:
            shards = [join_url(base, s) for s in info["shards"]]
            counts = info.get("shard_samples")
            if counts is not None and (len(counts) != len(shards) or sum(int(c) for c in counts) != int(info["samples"])):
                raise ValueError("shard_samples must give one count per shard, adding up to samples")
            splits[name] = SplitInfo(
                shards=shards,
                samples=int(info["samples"]),
                has_masks=bool(info.get("has_masks", False)),
                shard_samples=[int(c) for c in counts] if counts is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exn:
            raise DataError(
                f"manifest {path}: split {name!r} is not valid ({exn!r}; expected shards and samples)"
            ) from None
    return Manifest(url=path, version=version, classes=classes, splits=splits)


def write_manifest(out_dir: str, classes: list[str], splits: dict[str, SplitInfo]) -> str:
    """Write manifest.json atomically (local: temp file then rename; S3: one PUT); call it after every
    shard is written. Shard names are stored relative to `out_dir`. Returns the manifest URL."""
    def split_doc(info: SplitInfo) -> dict:
        doc = {"shards": [relative_name(s, out_dir) for s in info.shards], "samples": int(info.samples),
               "has_masks": bool(info.has_masks)}
        if info.shard_samples is not None:
            doc["shard_samples"] = [int(c) for c in info.shard_samples]
        return doc

    doc = {"version": MANIFEST_VERSION, "classes": list(classes),
           "splits": {name: split_doc(info) for name, info in splits.items()}}
    path = join_url(out_dir, MANIFEST_NAME)
    with open_url(path, "wb") as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return path
