"""Images in: one image as H×W×3 uint8 RGB from encoded bytes, base64 or pixel arrays, the images of a pyfunc
input (a DataFrame, a dict of lists, a list or an array), and the resize to the model's input size that the
training loader uses."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_shards.errors import DataError


class ModelInputError(DataError):
    """An input the model cannot read as an image; the message says which row and what was expected."""


def decode_image(item: Any, where: str = "image") -> np.ndarray:
    """One image as H×W×3 uint8 RGB from encoded bytes (JPEG/PNG/...), a base64 string of them, or pixels
    (H×W×3 or H×W, uint8 0-255 or float 0-1, as an array or nested lists)."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=False)
        except (binascii.Error, ValueError) as err:
            raise ModelInputError(f"{where}: a string must be base64 of JPEG/PNG bytes ({err})") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(item))) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ModelInputError(f"{where}: not a readable JPEG/PNG image ({err})") from None
    pixels = np.asarray(item)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or min(pixels.shape[:2]) < 1:
        raise ModelInputError(f"{where}: pixels must be H×W×3 (or H×W), got shape {pixels.shape}")
    pixels = pixels[..., :3]
    if pixels.dtype.kind == "f":
        scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
        pixels = np.clip(pixels * scale + (0.5 if scale > 1 else 0.0), 0, 255)
    return pixels.astype(np.uint8)


def model_input_images(model_input: Any) -> list[np.ndarray]:
    """The images of a pyfunc input: a DataFrame with an `image` (bytes) or `pixels` (array) column, a dict of
    such lists, a list of bytes/arrays, or one array (H×W×3) or a batch of them (B×H×W×3)."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame({k: list(v) for k, v in model_input.items()})
    if isinstance(model_input, pd.DataFrame):
        columns = [c for c in ("image", "pixels") if c in model_input.columns]
        if not columns:
            raise ModelInputError(f"input has columns {list(model_input.columns)}; expected 'image' (JPEG/PNG "
                                  "bytes, base64 in JSON) or 'pixels' (H×W×3 arrays)")
        images = []
        for i, row in enumerate(model_input[columns].itertuples(index=False)):
            values = [v for v in row if v is not None and not (isinstance(v, float) and np.isnan(v))]
            if len(values) != 1:
                raise ModelInputError(f"row {i}: give exactly one of 'image' or 'pixels'")
            images.append(decode_image(values[0], f"row {i}"))
        return images
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return [decode_image(x, f"image {i}") for i, x in enumerate(model_input)]
    if isinstance(model_input, np.ndarray) and model_input.ndim in (2, 3):
        return [decode_image(model_input)]
    if isinstance(model_input, (list, tuple)):
        return [decode_image(x, f"image {i}") for i, x in enumerate(model_input)]
    raise ModelInputError(f"cannot read images from a {type(model_input).__name__}; expected a DataFrame "
                          "with an 'image' or 'pixels' column, a list of images, or an array")


def resize_for_model(image: np.ndarray, size: int) -> torch.Tensor:
    """H×W×3 uint8 → 3×S×S float in [0,1], resized exactly as the training loader resizes."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).float().div_(255.0)
