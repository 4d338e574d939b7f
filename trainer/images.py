"""Images in: one image as H×W×3 uint8 RGB from encoded bytes, base64 or pixel arrays, the images of a pyfunc
input (a DataFrame, a dict of lists, a list or an array), and the image as the model takes it: resized to the
model's input size as the training loader resizes, or at its own size padded to a multiple of 32."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data_shards.errors import DataError


class ModelInputError(DataError):
    """An input the model cannot read as an image; the message says which row and what was expected."""


def decode_image(item: Any, where: str = "image") -> np.ndarray:
    """One image as H×W×3 uint8 RGB from encoded bytes (JPEG/PNG/...), a base64 string of them, or pixels
    (H×W×3 or H×W: integers 0-255, or floats 0-1, as an array or nested lists). Anything else is refused with
    a ModelInputError that starts with `where` and says what was wrong."""
    if isinstance(item, np.ndarray) and item.dtype.kind in "SUO" and item.size == 1:
        item = item.reshape(-1)[0]  # MLflow hands `instances`/`inputs` records over as one-element arrays
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=False)
        except (binascii.Error, ValueError) as err:
            raise ModelInputError(f"{where}: a string must be base64 of JPEG/PNG bytes ({err})") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(item), where)
    return _check_pixels(item, where)


# 8-bit modes Pillow converts to RGB exactly (CMYK and YCbCr by its own formulas)
_DIRECT = {"RGB", "L", "1", "CMYK", "YCbCr", "RGBX"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def _decode_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded bytes → RGB, right for every mode Pillow opens: EXIF orientation applied, 16-bit and 32-bit
    integer grey scaled from their full range, float grey read as 0-1, transparency (alpha, palette or LA)
    composited over white (what a viewer shows; the colour under a transparent pixel is arbitrary)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, where)
    except ModelInputError:
        raise
    except UnidentifiedImageError as err:
        unwrapped = _base64_bytes(data)  # `instances` records reach the model as base64 text, not decoded
        if unwrapped is not None:
            return _decode_bytes(unwrapped, where)
        raise ModelInputError(f"{where}: not a readable JPEG/PNG image ({err})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ModelInputError(f"{where}: not a readable JPEG/PNG image ({err})") from None


def _base64_bytes(data: bytes) -> bytes | None:
    """The bytes that `data` encodes when it is base64 text of something else, else None."""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if decoded and decoded != data else None


def _to_rgb(img: Image.Image, where: str) -> np.ndarray:
    mode = img.mode
    if mode == "P" and "transparency" not in img.info:
        return np.asarray(img.convert("RGB"))
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in _DIRECT:
        return np.asarray(img.convert("RGB"))
    if mode in _SIXTEEN_BIT or mode == "I":
        grey = np.asarray(img).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ModelInputError(f"{where}: a 32-bit integer image with values {grey.min()}..{grey.max()}; "
                                  "integer grey images are read as 16-bit (0-65535)")
        return _grey_to_rgb(grey / 65535.0)
    if mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if not np.isfinite(grey).all() or (grey.size and (grey.min() < 0 or grey.max() > 1)):
            raise ModelInputError(f"{where}: a float image must hold finite values in 0-1, got "
                                  f"{np.nanmin(grey):g}..{np.nanmax(grey):g}")
        return _grey_to_rgb(grey)
    raise ModelInputError(f"{where}: image mode {mode} is not supported (use RGB, grey, palette, CMYK, "
                          "16-bit or float grey)")


def _grey_to_rgb(unit: np.ndarray) -> np.ndarray:
    """H×W in [0, 1] → H×W×3 uint8, rounded."""
    grey = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _check_pixels(item: Any, where: str) -> np.ndarray:
    """Pixel arrays as the REST API and the pyfunc take them, checked: shape H×W×3 or H×W, integers 0-255 or
    finite floats 0-1, at most as many pixels as Pillow opens."""
    try:
        pixels = np.asarray(item)
    except ValueError as err:  # ragged nested lists
        raise ModelInputError(f"{where}: pixels must be a rectangular H×W×3 array ({err})") from None
    if pixels.dtype == object and pixels.size:
        try:  # a column of per-row arrays (MLflow's schema enforcement) nests arrays in object arrays
            pixels = np.asarray(pixels.tolist())
        except ValueError as err:
            raise ModelInputError(f"{where}: pixels must be a rectangular H×W×3 array ({err})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or min(pixels.shape[:2]) < 1:
        raise ModelInputError(f"{where}: pixels must be H×W×3 (or H×W), got shape {pixels.shape}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and pixels.shape[0] * pixels.shape[1] > limit:
        raise ModelInputError(f"{where}: {pixels.shape[0]}×{pixels.shape[1]} pixels is more than the "
                              f"{limit} an image may have")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise ModelInputError(f"{where}: integer pixels must be 0-255, got values from {low} to {high}")
        return pixels.astype(np.uint8)
    if pixels.dtype.kind == "f":
        if not np.isfinite(pixels).all():
            raise ModelInputError(f"{where}: float pixels must be finite, got NaN or infinity")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 1:
            raise ModelInputError(f"{where}: float pixels must be 0-1, got values from {low:g} to {high:g} "
                                  "(send integers for 0-255)")
        return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    raise ModelInputError(f"{where}: pixels must be integers 0-255 or floats 0-1, got dtype {pixels.dtype}")


def model_input_images(model_input: Any, dropped_columns: list[str] | None = None) -> list[np.ndarray]:
    """The images of a pyfunc input: a DataFrame with an `image` (bytes) or `pixels` (array) column, a dict of
    such lists, a list of bytes/arrays, or one array (H×W×3) or a batch of them (B×H×W×3).
    `dropped_columns`: columns the request had that MLflow's schema enforcement removed (named in errors)."""
    import pandas as pd

    if isinstance(model_input, dict):
        try:
            model_input = pd.DataFrame({k: list(v) for k, v in model_input.items()})
        except (TypeError, ValueError) as err:
            raise ModelInputError(f"input columns {list(model_input)} must be lists of equal length ({err})") from None
    if isinstance(model_input, pd.DataFrame):
        columns = [c for c in ("image", "pixels") if c in model_input.columns]
        if not columns:
            given = [str(c) for c in model_input.columns] + [c for c in dropped_columns or []
                                                              if c not in model_input.columns]
            hint = (" (a bare list in `instances` or `inputs` has no column names: send records such as "
                    '{"instances": [{"image": "<base64>"}]} or a dataframe_split with columns ["image"])'
                    if given and all(c.isdigit() for c in given) else "")
            raise ModelInputError(f"input has {'columns ' + repr(given) if given else 'no columns'}; expected "
                                  f"'image' (JPEG/PNG bytes, base64 in JSON) or 'pixels' (H×W×3 arrays){hint}")
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


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float in [0,1], as the loader's batches hold images."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def resize_for_model(image: np.ndarray, size: int) -> torch.Tensor:
    """H×W×3 uint8 → 3×S×S float in [0,1], resized exactly as the training loader resizes."""
    return image_tensor(np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)))


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """3×H×W → 3×H'×W' with H', W' the next multiples of `multiple`: zeros at the bottom and right, as the
    evaluation loader pads real photos (data_shards.augment.pad_batch), so an encoder that downsamples
    `multiple` times takes any image at its own size."""
    pad_h, pad_w = -image.shape[-2] % multiple, -image.shape[-1] % multiple
    return torch.nn.functional.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
