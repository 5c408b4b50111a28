"""Image decoding: one function, every format and colour model the pipeline accepts."""
from __future__ import annotations

import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

import cv2
import numpy as np
from PIL import Image

from stages.core.errors import PipelineError

if TYPE_CHECKING:
    import torch

# Large scans and aerial images are legitimate input; Pillow's decompression-bomb
# guard (89 M pixels) would reject them with a warning promoted to an error later.
Image.MAX_IMAGE_PIXELS = 2**31


T = TypeVar("T")
U = TypeVar("U")


class ImageError(PipelineError, ValueError):
    """An image file is missing, truncated or not a decodable image."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array.

    Grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB. The
    format is taken from the file's content, not its name (a PNG named ``.jpg``
    decodes). EXIF orientation is ignored: annotations refer to stored pixels.
    A truncated file is an error, never a partly grey image.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode.startswith("I;16"):
                    # Pillow's convert() clips 16-bit values at 255 (an all-white image); keep the high byte.
                    rgb = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)).convert("RGB")
                else:
                    rgb = image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    return np.asarray(rgb)


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    """``(H, W, 3)`` -> ``(round(H * factor), round(W * factor), 3)`` (at least 1 x 1), bilinear."""
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def image_scales(width: int, height: int, scales: Sequence[int], max_side: int) -> list[float]:
    """Resize factor of each scale: the shorter side becomes ``scale``, unless the longer would exceed ``max_side``."""
    short, long = min(width, height), max(width, height)
    return [min(scale / short, max_side / long) for scale in scales]


def scaled_images(
    path: str | Path, scales: Sequence[int], max_side: int, pin: bool
) -> tuple[list["torch.Tensor"], list[float]]:
    """Decode an image and resize it for a conv pass at each of ``scales`` (the shorter side becomes the scale,
    the longer at most ``max_side``: :func:`image_scales`): ``(h, w, 3)`` uint8 RGB tensors,
    pinned if ``pin`` (for non-blocking copies to a GPU), and their resize factors."""
    import torch  # here: the index and features stages' workers decode with this module and need no torch

    image = load_image(path)
    factors = image_scales(image.shape[1], image.shape[0], scales, max_side)
    tensors = [torch.from_numpy(resize(image, factor)) for factor in factors]
    return [t.pin_memory() if pin else t for t in tensors], factors


def prefetch(function: Callable[[T], U], items: Iterable[T], threads: int) -> Iterator[U]:
    """``map(function, items)`` run ahead by up to ``threads`` items in a thread pool (for GIL-releasing work)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[U]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
