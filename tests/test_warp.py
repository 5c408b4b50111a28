"""The R-CNN region warp on hand-computed cases.

Geometry: output pixel u of an S-wide warp (centre u + 0.5) samples the image at
continuous x = x1c + (u + 0.5) * w / S, i.e. at OpenCV coordinate x - 0.5 (pixel
centres at integers), where x1c, w describe the context box. Bilinear
interpolation reproduces a linear ramp exactly, so ramp images give exact
expected values wherever the sample point has an integer (or exactly
representable) value.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.data.images import load_image
from stages.ops.warp import context_boxes, to_tensor_batch, warp_regions

BLACK = (0, 0, 0)


def ramp_image(height: int = 64, width: int = 64) -> np.ndarray:
    """``(H, W, 3)`` uint8 with R = 4 * column, G = 4 * row, B = 0."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, :, 0] = 4 * np.arange(width)[None, :]
    image[:, :, 1] = 4 * np.arange(height)[:, None]
    return image


def test_context_boxes_rcnn_example() -> None:
    # box [10, 20, 110, 70], S = 227, p = 16: scale 227 / 195 = 1.1641026 about centre (60, 45)
    # width 100 * 227 / 195 = 116.410256, half 58.205128 -> x 1.794872 .. 118.205128
    # height 50 * 227 / 195 = 58.205128, half 29.102564 -> y 15.897436 .. 74.102564
    out = context_boxes(np.array([[10, 20, 110, 70]]), 227, 16)
    assert out.shape == (1, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.794872, 15.897436, 118.205128, 74.102564]], atol=1e-4)


def test_context_boxes_no_padding_is_identity_and_degenerate_is_one_pixel() -> None:
    boxes = np.array(
        [
            [3, 4, 30, 40],  # unchanged at p = 0
            [5, 5, 5, 8],  # zero width: 1 pixel about x = 5 -> 4.5 .. 5.5
            [6, 5, 4, 5],  # inverted width, zero height: centre (5, 5), 1 x 1 -> 4.5 .. 5.5
        ]
    )
    np.testing.assert_allclose(
        context_boxes(boxes, 10, 0), [[3, 4, 30, 40], [4.5, 5, 5.5, 8], [4.5, 4.5, 5.5, 5.5]]
    )
    # p = 10 at S = 40: scale 40 / 20 = 2; box [10, 16, 30, 56] -> centre (20, 36), 40 x 80
    np.testing.assert_allclose(context_boxes(np.array([[10, 16, 30, 56]]), 40, 10), [[0, -4, 40, 76]])


def test_context_boxes_empty() -> None:
    assert context_boxes(np.zeros((0, 4)), 227, 16).shape == (0, 4)


@pytest.mark.parametrize("padding", [-1, 113.5, 114, 200])
def test_context_boxes_rejects_bad_padding(padding: float) -> None:
    with pytest.raises(ValueError):
        context_boxes(np.array([[0, 0, 10, 10]]), 227, padding)


def test_identity_warp_returns_the_image() -> None:
    # box = whole 32 x 32 image, S = 32, p = 0: u -> continuous u + 0.5 -> OpenCV coordinate u
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = warp_regions(image, np.array([[0, 0, 32, 32]]), 32, 0, BLACK)
    assert out.shape == (1, 32, 32, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], image)


def test_anisotropic_warp_on_ramp() -> None:
    # box [10, 16, 30, 56], S = 40, p = 0. x: w / S = 0.5, OpenCV x = 10 + (u + 0.5) * 0.5 - 0.5
    # = 9.75 + u / 2 -> R = 4 * that = 39 + 2u. y: h / S = 1, OpenCV y = 16 + v -> G = 64 + 4v.
    out = warp_regions(ramp_image(), np.array([[10, 16, 30, 56]]), 40, 0, BLACK)[0]
    u = np.arange(40)
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(39 + 2 * u[None, :], (40, 40)))
    np.testing.assert_array_equal(out[:, :, 1], np.broadcast_to(64 + 4 * u[:, None], (40, 40)))
    np.testing.assert_array_equal(out[:, :, 2], 0)


def test_padding_context_and_out_of_image_fill() -> None:
    # Same box with p = 10: context [0, -4, 40, 76] (see test above), w / S = 1, h / S = 2.
    # x: OpenCV x = u -> R = 4u. y: OpenCV y = -4 + (v + 0.5) * 2 - 0.5 = 2v - 3.5 -> G = 8v - 14
    # for 2 <= v <= 33 (y 0.5 .. 62.5); rows 0, 1 (y <= -1.5) and 34..39 (y >= 64.5) lie more than
    # one pixel outside the 64-row image, so they are exactly the fill colour.
    fill = (123.68, 116.78, 103.94)  # ImageNet mean x 255 -> rounded to (124, 117, 104)
    out = warp_regions(ramp_image(), np.array([[10, 16, 30, 56]]), 40, 10, fill)[0]
    u = np.arange(40)
    inside = np.arange(2, 34)
    np.testing.assert_array_equal(out[inside, :, 0], np.broadcast_to(4 * u[None, :], (32, 40)))
    np.testing.assert_array_equal(out[inside, :, 1], np.broadcast_to(8 * inside[:, None] - 14, (32, 40)))
    np.testing.assert_array_equal(out[inside, :, 2], 0)
    outside = np.r_[0:2, 34:40]
    np.testing.assert_array_equal(out[outside], np.broadcast_to([124, 117, 104], (8, 40, 3)))


def test_box_content_fills_the_central_pixels_exactly() -> None:
    # White rectangle = box [20, 30, 60, 50] on a black 100 x 100 image; S = 50, p = 5, scale 50 / 40.
    # Context x [15, 65] (w / S = 1): OpenCV x = 15 + u -> columns 5..44 white, the rest black.
    # Context y [27.5, 52.5] (h / S = 0.5): OpenCV y = 27.25 + v / 2. The box's top edge (y = 30)
    # lands at output coordinate (30 - 27.5) * 2 = 5 = p and its bottom edge (50) at 45 = S - p.
    # Bilinear interpolation blends the rows whose sample lies between image rows 29 | 30 and 49 | 50:
    # v = 4 (y 29.25) -> 0.75 * 0 + 0.25 * 255 = 63.75, v = 5 (y 29.75) -> 191.25,
    # v = 44 (y 49.25) -> 191.25, v = 45 (y 49.75) -> 63.75; rows 6..43 white, 0..3 and 46..49 black.
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[30:50, 20:60] = 255
    out = warp_regions(image, np.array([[20, 30, 60, 50]]), 50, 5, BLACK)[0]
    expected = np.zeros((50, 50, 3), dtype=np.uint8)
    expected[6:44, 5:45] = 255
    exact_rows = np.r_[0:4, 6:44, 46:50]
    np.testing.assert_array_equal(out[exact_rows], expected[exact_rows])
    blended = out[[4, 5, 44, 45], 5:45, 0].astype(float)
    np.testing.assert_allclose(blended, np.broadcast_to([[63.75], [191.25], [191.25], [63.75]], (4, 40)), atol=1)
    np.testing.assert_array_equal(out[4:6][:, np.r_[0:5, 45:50]], 0)
    np.testing.assert_array_equal(out[44:46][:, np.r_[0:5, 45:50]], 0)


@pytest.mark.parametrize(("size", "padding", "box"), [(227, 16, (40, 60, 140, 110)), (224, 16, (7, 3, 90, 200))])
def test_box_occupies_central_size_minus_two_padding(size: int, padding: int, box: tuple) -> None:
    # White box on black: at the warped size the box must span exactly [p, S - p) in x and y.
    # Bilinear interpolation turns each edge into a ramp one source pixel wide centred on the edge,
    # so: pixels whose centre is more than half a source pixel inside are exactly white, more than
    # half a source pixel outside exactly black, and each profile's mass / 255 is S - 2p (the ramp
    # is symmetric about the edge) with its centroid at S / 2.
    image = np.zeros((240, 200, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    out = warp_regions(image, np.array([box]), size, padding, BLACK)[0, :, :, 0].astype(float)
    context = context_boxes(np.array([box]), size, padding)[0]
    centres = np.arange(size) + 0.5
    profiles = {"x": out[size // 2, :], "y": out[:, size // 2]}
    for axis, extent in (("x", context[2] - context[0]), ("y", context[3] - context[1])):
        profile = profiles[axis]
        margin = 0.5 * size / extent  # half a source pixel, in output pixels
        assert (profile[(centres > padding + margin) & (centres < size - padding - margin)] == 255).all()
        assert (profile[(centres < padding - margin) | (centres > size - padding + margin)] == 0).all()
        np.testing.assert_allclose(profile.sum() / 255, size - 2 * padding, atol=0.5)
        np.testing.assert_allclose((profile * centres).sum() / profile.sum(), size / 2, atol=0.05)


def test_random_boxes_follow_the_sampling_formula() -> None:
    # On a ramp R = column, G = row (256 x 256), pixel (u, v) must equal the OpenCV sample position
    # x1c + (u + 0.5) * w / S - 0.5 (and likewise in y) wherever that lies inside [0, 255].
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[:, :, 0] = np.arange(256)[None, :]
    image[:, :, 1] = np.arange(256)[:, None]
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, 256, (20, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    size, padding = 31, 4
    out = warp_regions(image, boxes, size, padding, BLACK).astype(float)
    context = context_boxes(boxes, size, padding).astype(float)
    centres = np.arange(size) + 0.5
    for region, (x1, y1, x2, y2) in zip(out, context):
        xs = x1 + centres * (x2 - x1) / size - 0.5
        ys = y1 + centres * (y2 - y1) / size - 0.5
        cols, rows = (xs >= 0) & (xs <= 255), (ys >= 0) & (ys <= 255)
        inside = region[np.ix_(rows, cols)]
        shape = (rows.sum(), cols.sum())
        np.testing.assert_allclose(inside[:, :, 0], np.broadcast_to(xs[cols], shape), atol=1)
        np.testing.assert_allclose(inside[:, :, 1], np.broadcast_to(ys[rows, None], shape), atol=1)


def test_mirror_flips_selected_regions() -> None:
    boxes = np.array([[10, 16, 30, 56]] * 2)
    out = warp_regions(ramp_image(), boxes, 40, 0, BLACK, mirror=np.array([False, True]))
    np.testing.assert_array_equal(out[1], out[0][:, ::-1])
    # unflipped R = 39 + 2u (see the ramp test), so flipped R = 39 + 2 * (39 - u)
    np.testing.assert_array_equal(out[1, 0, :, 0], 39 + 2 * (39 - np.arange(40)))
    with pytest.raises(ValueError):
        warp_regions(ramp_image(), boxes, 40, 0, BLACK, mirror=np.array([True]))


def test_degenerate_and_outside_boxes_do_not_crash() -> None:
    fill = (10, 20, 30)
    boxes = np.array(
        [
            [5, 5, 5, 20],  # zero width: 1 pixel about x = 5, i.e. columns 4.5 .. 5.5
            [9, 9, 3, 3],  # inverted
            [-100, -100, -50, -50],  # entirely outside, above left
            [1000, 1000, 1010, 1010],  # entirely outside, below right
        ]
    )
    out = warp_regions(ramp_image(), boxes, 16, 2, fill)
    assert out.shape == (4, 16, 16, 3)
    # zero width: every column samples between pixels 4 and 5 -> R between 16 and 20
    assert (out[0, :, :, 0] >= 16).all() and (out[0, :, :, 0] <= 20).all()
    np.testing.assert_array_equal(out[2:], np.broadcast_to(fill, (2, 16, 16, 3)))


def test_no_boxes() -> None:
    out = warp_regions(ramp_image(), np.zeros((0, 4)), 16, 2, BLACK, mirror=np.zeros(0, dtype=bool))
    assert out.shape == (0, 16, 16, 3)


def test_grayscale_derived_and_non_contiguous_images(tmp_path) -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64, value = 4 * column
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    loaded = load_image(path)
    # decoded grayscale, a zero-stride broadcast view, and a crop view of a wider image
    views = [loaded, np.broadcast_to(grey[:, :, None], (64, 64, 3)), ramp_image(64, 80)[:, :64]]
    for image in views:
        out = warp_regions(image, np.array([[10, 16, 30, 56]]), 40, 0, BLACK)[0]
        np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(39 + 2 * np.arange(40), (40, 40)))
    grey_out = warp_regions(loaded, np.array([[0, 0, 64, 64]]), 20, 3, BLACK)[0]
    np.testing.assert_array_equal(grey_out[:, :, 0], grey_out[:, :, 1])
    np.testing.assert_array_equal(grey_out[:, :, 0], grey_out[:, :, 2])


def test_rejects_bad_images() -> None:
    with pytest.raises(ValueError):
        warp_regions(np.zeros((8, 8), dtype=np.uint8), np.array([[0, 0, 4, 4]]), 8, 0, BLACK)
    with pytest.raises(ValueError):
        warp_regions(np.zeros((8, 8, 3), dtype=np.float32), np.array([[0, 0, 4, 4]]), 8, 0, BLACK)


def test_to_tensor_batch_normalises() -> None:
    regions = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    regions[1, 2, 3] = (255, 0, 128)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_tensor_batch(regions, mean, std)
    assert tuple(x.shape) == (2, 3, 4, 4)
    assert str(x.dtype) == "torch.float32"
    assert x.is_contiguous()
    # R (1 - 0.485) / 0.229 = 2.2489083; G (0 - 0.456) / 0.224 = -2.0357143;
    # B (128 / 255 - 0.406) / 0.225 = (0.5019608 - 0.406) / 0.225 = 0.4264924
    np.testing.assert_allclose(x[1, :, 2, 3].numpy(), [2.2489083, -2.0357143, 0.4264924], atol=1e-5)
    # a black pixel: -mean / std
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-5)
    # a mirrored (negative-stride) view of the batch is accepted
    np.testing.assert_array_equal(to_tensor_batch(regions[:, :, ::-1], mean, std).numpy(), x.flip(3).numpy())
