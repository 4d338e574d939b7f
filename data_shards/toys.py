"""The toy data sets by name: one dispatch for `wsssrec data NAME` and for `wsssrec demo` (config `toy.name`).
No heavy imports: each builder is imported when it is asked for."""
from __future__ import annotations

from .errors import DataError

TOY_SETS = ("toy-birds", "toy-multi", "toy-multi8")


def build_toy(name: str, out_dir: str, *, paired: int | None = None, **kwargs) -> str:
    """Build the toy set `name` into `out_dir` with the builder's keyword arguments (seed, size, rho, counts,
    ...); `paired` (test_paired pairs) is toy-birds' only (the multi-class sets have no paired split, so they
    ignore it), None = the builder's default. Returns the manifest path."""
    if name == "toy-birds":
        from .toy_birds import build_toy_birds

        return build_toy_birds(out_dir, **kwargs, **({} if paired is None else {"paired": paired}))
    if name == "toy-multi":
        from .toy_multi import build_toy_multi

        return build_toy_multi(out_dir, **kwargs)
    if name == "toy-multi8":
        from .toy_multi8 import build_toy_multi8

        return build_toy_multi8(out_dir, **kwargs)
    raise DataError(f"unknown toy data set {name!r}; expected one of {', '.join(TOY_SETS)}")
