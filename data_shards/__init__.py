"""Data sets as WebDataset shards with a manifest: toy-birds builder, converters, streaming loader."""
from .manifest import DataError, Manifest, SplitInfo, read_manifest, write_manifest

__all__ = ["DataError", "Manifest", "SkipCounter", "SplitInfo", "make_dataset", "make_loader",
           "read_manifest", "write_manifest"]


def __getattr__(name: str):
    # The loader pulls in torch; import it only when asked, so `data ls` and friends start fast.
    if name in ("make_dataset", "make_loader", "SkipCounter"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
