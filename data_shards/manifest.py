"""The data set manifest: which shards make up each split, how many samples, which classes.

A data set is a folder (later also an S3 prefix) holding WebDataset shards and a `manifest.json`
that is written last, so a reader never sees a half-written data set.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import IO

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
HOW_TO_MAKE = "expected a data set written by `wsssrec data toy-birds` or `wsssrec data convert`"


class DataError(ValueError):
    """Bad data-set input: the message names the input and what was expected."""


@dataclass
class SplitInfo:
    shards: list[str]  # full URLs after read_manifest; names relative to the manifest on disk
    samples: int
    has_masks: bool = False


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


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a data-set URL. The one place a new scheme (s3://) gets added."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("", "file"):
        raise DataError(f"cannot open {url}: unsupported URL scheme {scheme!r} (expected a local path)")
    return open(url[len("file://"):] if scheme == "file" else url, mode)


def _join(base_dir: str, name: str) -> str:
    return name if "://" in name or os.path.isabs(name) else os.path.join(base_dir, name)


def manifest_url(url: str) -> str:
    """A manifest URL from either the manifest itself or the folder that holds it."""
    if url.endswith(".json"):
        return url
    return _join(url, MANIFEST_NAME) if "://" not in url else url.rstrip("/") + "/" + MANIFEST_NAME


def read_manifest(url: str) -> Manifest:
    """Read a manifest (path to manifest.json or to its folder); shard names become full paths."""
    path = manifest_url(os.fspath(url))
    if path.startswith("file://"):
        path = path[len("file://"):]
    try:
        with open_url(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        where = os.path.dirname(path) or "."
        raise DataError(f"no {MANIFEST_NAME} in {where} ({HOW_TO_MAKE})") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a manifest file ({HOW_TO_MAKE})") from None
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
    base_dir = os.path.dirname(path)
    splits = {}
    for name, info in split_docs.items():
        try:
            splits[name] = SplitInfo(
                shards=[_join(base_dir, s) for s in info["shards"]],
                samples=int(info["samples"]),
                has_masks=bool(info.get("has_masks", False)),
            )
        except (KeyError, TypeError, ValueError) as exn:
            raise DataError(
                f"manifest {path}: split {name!r} is not valid ({exn!r}; expected shards and samples)"
            ) from None
    return Manifest(url=path, version=version, classes=classes, splits=splits)


def write_manifest(out_dir: str, classes: list[str], splits: dict[str, SplitInfo]) -> str:
    """Write manifest.json atomically (temp file, then rename); call it after every shard is written.

    Shard names are stored relative to `out_dir`. Returns the manifest path.
    """
    doc = {
        "version": MANIFEST_VERSION,
        "classes": list(classes),
        "splits": {
            name: {
                "shards": [os.path.relpath(s, out_dir) if os.path.isabs(s) else s for s in info.shards],
                "samples": int(info.samples),
                "has_masks": bool(info.has_masks),
            }
            for name, info in splits.items()
        },
    }
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
