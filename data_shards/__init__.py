"""Data sets as WebDataset shards with a manifest: toy-birds builder, converters, streaming loader."""
from .loader import SkipCounter, make_dataset, make_loader
from .manifest import DataError, Manifest, SplitInfo, read_manifest, write_manifest

__all__ = ["DataError", "Manifest", "SkipCounter", "SplitInfo", "make_dataset", "make_loader",
           "read_manifest", "write_manifest"]
