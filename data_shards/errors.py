"""The error type of every data-set failure (bad input, missing file or object, S3 trouble); its own
module so that the manifest, the S3 client and the loader can all raise it without importing each other."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data-set input: the message names the input and what was expected."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message  # kept apart from .args, which webdataset's handlers append to
