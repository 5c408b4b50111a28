"""Image decoding: every accepted format becomes (H, W, 3) uint8 RGB; broken files name themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.core.errors import PipelineError
from stages.data.images import ImageError, image_scales, load_image

# JPEG is lossy; flat colours come back within a couple of levels.
JPEG_TOLERANCE = 2


def _check(image: np.ndarray, height: int, width: int) -> None:
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8


def _assert_colour(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 0) -> None:
    diff = np.abs(image.astype(int) - np.array(rgb)).max()
    assert diff <= tolerance, f"max difference {diff} from {rgb}"


def test_rgb_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "rgb.jpg"
    Image.new("RGB", (7, 5), (200, 40, 90)).save(path, "JPEG", quality=95)
    image = load_image(path)
    _check(image, 5, 7)
    _assert_colour(image, (200, 40, 90), JPEG_TOLERANCE)


def test_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "rgb.jpg"
    Image.new("RGB", (4, 3), (0, 0, 0)).save(path, "JPEG")
    _check(load_image(str(path)), 3, 4)


def test_grayscale_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (6, 4), 100).save(path, "JPEG", quality=95)
    image = load_image(path)
    _check(image, 4, 6)
    _assert_colour(image, (100, 100, 100), JPEG_TOLERANCE)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    # C=0, M=255, Y=255, K=0 is pure red
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    _check(image, 8, 8)
    _assert_colour(image, (255, 0, 0), JPEG_TOLERANCE)


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(path)
    image = load_image(path)
    _check(image, 2, 3)
    _assert_colour(image, (10, 20, 30))


def test_palette_png(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 1, 2, 3])  # entry 1 is (1, 2, 3)
    palette.save(path)
    assert Image.open(path).mode == "P"
    image = load_image(path)
    _check(image, 4, 4)
    _assert_colour(image, (1, 2, 3))


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    values = np.array([[0x0000, 0x1234], [0x8000, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    _check(image, 2, 2)
    # the high byte of each 16-bit value: 0x00, 0x12, 0x80, 0xFF
    np.testing.assert_array_equal(image[..., 0], [[0x00, 0x12], [0x80, 0xFF]])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_png_named_jpg_decodes_by_content(tmp_path: Path) -> None:
    path = tmp_path / "actually_png.jpg"
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    Image.fromarray(pixels).save(path, "PNG")
    image = load_image(path)
    _check(image, 2, 3)
    np.testing.assert_array_equal(image, pixels)  # lossless: exact


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: cannot decode image")
    assert "truncated" in str(info.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: cannot decode image")


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageError, match="cannot decode image"):
        load_image(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: image file not found"
    assert isinstance(info.value, PipelineError)


def test_image_scales_shorter_side_then_longer_cap():
    # 300 x 200: shorter side 200 -> 100 (x0.5); -> 688 would make the longer side 1032 > 1000: capped at 1000/300
    assert image_scales(300, 200, (100, 688), 1000) == pytest.approx([0.5, 1000 / 300])
    assert image_scales(200, 400, (688,), 2000) == pytest.approx([3.44])
