"""Image and mask reading that turns every odd format into RGB uint8, and every failure into a DataError."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsseg.errors import DataError
from wsseg_infer.runtime import reduction_factor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _open(path: Path, max_side: Optional[int] = None) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        image = Image.open(path)
        if max_side is not None and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4 or 1/8 scale: much faster
        image.load()  # decode now, so a truncated file fails here and names itself
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    array = array.astype(np.float64)
    top = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def read_image(path: Path, max_side: Optional[int] = None) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB: grayscale, RGBA, palette and 16-bit inputs are converted.

    `max_side` lets large JPEGs decode at a reduced scale that still covers it (1/2, 1/4 or 1/8; other
    formats are box-reduced by the same factor), for model inputs of at most half that side.
    """
    image = _open(path, max_side)
    array = _as_rgb(image)
    if max_side is not None and image.format != "JPEG":
        # Other formats get the reduction a JPEG decoder applies, so that every input reaches the model
        # the way wsseg_infer.preprocess prepares it at deployment.
        factor = reduction_factor(array.shape[1], array.shape[0], max_side)
        if factor > 1:
            array = np.asarray(Image.fromarray(array).reduce(factor))
    return array


def _as_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = _to_uint8(np.asarray(image))
        return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def read_gray(path: Path) -> np.ndarray:
    """Read a single-channel uint8 array (masks, trimaps); colour masks are reduced to their max channel."""
    image = _open(path)
    if image.mode == "P":
        return np.asarray(image).astype(np.uint8)  # palette indices are the labels
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].max(axis=2)
    return _to_uint8(array)


LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def read_binary_mask(path: Path, threshold: int = 127) -> np.ndarray:
    """Binary mask: pixel > threshold is foreground. JPEG masks (Kvasir-SEG) carry compression noise and
    are binarised; a lossless mask with more than two values is an error, since guessing could be wrong."""
    gray = read_gray(path)
    if Path(path).suffix.lower() not in LOSSY_SUFFIXES:
        values = np.unique(gray)
        if len(values) > 2:
            raise DataError(f"{path}: mask is not binary ({len(values)} distinct values, e.g. "
                            f"{values[:5].tolist()}); expected two values such as 0/255")
    return gray > threshold


def image_size(path: Path) -> tuple:
    """(height, width) without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    return height, width


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """Write a binary mask as a 0/255 PNG, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(tmp, format="PNG")
    tmp.replace(path)
