"""Data sets as WebDataset shards with a manifest: toy-birds builder, converters, streaming loader."""
from .errors import DataError
from .manifest import Manifest, SplitInfo, read_manifest, write_manifest

__all__ = ["DataError", "LoaderOptions", "Manifest", "ShardDataset", "SkipCounter", "SplitInfo", "make_loader",
           "read_manifest", "write_manifest"]


def __getattr__(name: str):
    # The loader pulls in torch; import it only when asked, so `data ls` and friends start fast.
    if name in ("LoaderOptions", "ShardDataset", "make_loader", "SkipCounter"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
