"""Reference-image loading and preprocessing (as diffusers' `BlipImageProcessor`), and output conversion."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# Refuse images above this many pixels before decoding them fully (a decompression-bomb guard).
MAX_IMAGE_PIXELS = 64_000_000


def load_image(image, argname: str) -> Image.Image:
    """A PIL image, a numpy array (H, W[, C], uint8 or floats in [0, 1]) or a file path -> RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{argname}: no image file at {path!r}")
        try:
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"{argname}: {path!r} is {opened.width}x{opened.height}, above the {MAX_IMAGE_PIXELS} pixel limit"
                    )
                opened.load()
                image = ImageOps.exif_transpose(opened)  # respect the camera's orientation tag
        except (OSError, Image.DecompressionBombError, SyntaxError) as err:
            raise ValueError(f"{argname}: cannot read an image from {path!r} ({err})") from err
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, argname)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{argname} must be a PIL image, a numpy array or a file path, not {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{argname}: the image is empty ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray, argname: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{argname}: expected an array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ValueError(f"{argname}: the array holds NaN or inf")
        # Floats are taken as [0, 1] (as transformers does), anything else as 0..255.
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(np.round(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def preprocess_reference(images, size: dict, mean, std, argname: str = "reference_image") -> np.ndarray:
    """Images -> (N, 3, H, W) float32: bicubic resize to `size`, center crop, rescale to [0, 1], normalise."""
    height, width = int(size["height"]), int(size["width"])
    batch = []
    for image in images:
        image = load_image(image, argname).resize((width, height), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        batch.append(array.transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil`)."""
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in np.asarray(images)]
