"""Image decoding is right for every mode Pillow opens, or refuses with a message; pixel input is checked
(issue 21, item 3)."""
import io

import numpy as np
import pytest
from PIL import Image

from trainer.images import ModelInputError, decode_image, model_input_images


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_16_bit_grey_is_scaled_from_its_full_range():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    img = Image.fromarray(ramp)  # uint16 → mode I;16
    data = _encode(img)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # what Pillow hands back for a 16-bit PNG
    got = decode_image(data)
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp / 65535 * 255).astype(np.uint8))
    assert (got[..., 0] == got[..., 2]).all() and got.min() == 0 and got.max() == 245  # not saturated white


def test_float_grey_reads_0_to_1_and_refuses_other_ranges():
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    got = decode_image(_encode(Image.fromarray(unit, mode="F"), "TIFF"))
    np.testing.assert_array_equal(got[..., 1], np.rint(unit * 255).astype(np.uint8))
    with pytest.raises(ModelInputError, match=r"row 3: a float image must hold finite values in 0-1, got 0\.\.300"):
        decode_image(_encode(Image.fromarray(unit * 300, mode="F"), "TIFF"), "row 3")


def test_32_bit_integer_grey_outside_16_bit_is_refused():
    big = np.full((4, 4), 70000, dtype=np.int32)
    with pytest.raises(ModelInputError, match="32-bit integer image with values 70000..70000"):
        decode_image(_encode(Image.fromarray(big, mode="I"), "TIFF"))


def test_transparency_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red; the other pixels are transparent black
    got = decode_image(_encode(Image.fromarray(rgba, mode="RGBA")))
    assert tuple(got[0, 0]) == (200, 10, 10) and (got[1] == 255).all()

    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[0, 0] = (40, 255)
    got = decode_image(_encode(Image.fromarray(la, mode="LA")))
    assert tuple(got[0, 0]) == (40, 40, 40) and (got[1] == 255).all()

    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    got = decode_image(_encode(palette, transparency=0))  # index 0 (black) transparent
    assert tuple(got[0, 0]) == (0, 200, 0) and (got[1] == 255).all()


def test_cmyk_and_exif_orientation():
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # red in CMYK
    got = decode_image(_encode(cmyk, "JPEG", quality=100))
    assert got.shape == (4, 6, 3) and got[..., 0].mean() > 200 and got[..., 1].mean() < 60

    img = Image.new("RGB", (6, 4), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    got = decode_image(_encode(img, "PNG", exif=exif))
    assert got.shape == (6, 4, 3)  # shown upright: 4 wide, 6 high
    assert tuple(got[0, -1]) == (255, 0, 0)  # the top-left pixel lands top-right


@pytest.mark.parametrize("pixels, message", [
    ([[[300, 0, 0]], [[-5, 0, 0]]], "row 0: integer pixels must be 0-255, got values from -5 to 300"),
    (np.full((2, 2, 3), 1.5), "row 0: float pixels must be 0-1, got values from 1.5 to 1.5"),
    (np.full((2, 2, 3), np.nan), "row 0: float pixels must be finite"),
    (np.zeros((2, 2, 2), dtype=np.uint8), r"row 0: pixels must be H×W×3 \(or H×W\), got shape \(2, 2, 2\)"),
    ([[[1, 2, 3]], [[1, 2]]], "row 0: pixels must be a rectangular H×W×3 array"),
    (np.zeros((2, 2, 3), dtype=bool), "row 0: pixels must be integers 0-255 or floats 0-1, got dtype bool"),
])
def test_pixel_input_is_checked(pixels, message):
    with pytest.raises(ModelInputError, match=message):
        decode_image(pixels, "row 0")


def test_valid_pixels_still_decode():
    np.testing.assert_array_equal(decode_image(np.full((2, 2), 0.5))[..., 2], np.full((2, 2), 128))
    np.testing.assert_array_equal(decode_image([[[0, 128, 255]]]), np.array([[[0, 128, 255]]], dtype=np.uint8))
    import pandas as pd

    frame = pd.DataFrame({"pixels": [np.array([np.array([[1, 2, 3]])], dtype=object)]})
    assert model_input_images(frame)[0].tolist() == [[[1, 2, 3]]]
    with pytest.raises(ModelInputError, match="row 0: integer pixels must be 0-255"):
        model_input_images(pd.DataFrame({"pixels": [[[[300, 1, 2]]]]}))
