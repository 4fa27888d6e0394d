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
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image, argname)
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image, argname: str) -> Image.Image:
    """16/32-bit integer and float images to 8-bit grey (PIL's own conversion clips them at 255)."""
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{argname}: the image holds NaN or inf")
    if image.mode == "F" and array.max(initial=0) <= 1.0 and array.min(initial=0) >= 0.0:
        array = array * 255.0  # float images in [0, 1]
    elif image.mode != "F" or array.max(initial=0) > 255.0:
        array = array / 257.0  # 16-bit range (65535 -> 255)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


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


def resize_and_center_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """torchvision's `Resize(resize)` (bicubic, the short side to `resize`, the long side truncated) then
    `CenterCrop(crop)` (offsets rounded as torchvision rounds them): LAVIS's training targets and the
    DreamBench metrics' preprocessing."""
    width, height = image.size
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    image = image.resize(size, Image.BICUBIC)
    if min(size) < crop:
        raise ValueError(f"image of {size} after resizing is smaller than the {crop} crop")
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil`)."""
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in np.asarray(images)]


def preprocess_conditioning(images, height: int, width: int, argname: str = "conditioning_image") -> np.ndarray:
    """ControlNet maps -> (N, 3, height, width) in [0, 1]: bicubic resize, no crop, no normalisation
    (as diffusers' BlipDiffusionControlNetPipeline.prepare_control_image)."""
    batch = []
    for image in images:
        image = load_image(image, argname).resize((width, height), Image.BICUBIC)
        batch.append((np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def canny(image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edge map as an RGB image (edges 255), like `controlnet_aux.CannyDetector()(img, low, high)`.

    Gaussian blur, Sobel gradients, non-maximum suppression, double threshold and hysteresis, in numpy.
    Thresholds are on the gradient magnitude of the 0..255 grey image, as OpenCV's L1 Sobel magnitude.
    """
    from scipy import ndimage

    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low_threshold}, {high_threshold}")
    grey = np.asarray(load_image(image, "image").convert("L"), dtype=np.float64)
    grey = ndimage.gaussian_filter(grey, sigma=1.0)
    gx = ndimage.sobel(grey, axis=1)
    gy = ndimage.sobel(grey, axis=0)
    magnitude = np.abs(gx) + np.abs(gy)
    # Non-maximum suppression along the gradient direction, quantised to 4 directions.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = ((angle + 22.5) // 45).astype(int) % 4  # 0: horizontal, 1: 45deg, 2: vertical, 3: 135deg
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    keep = np.zeros_like(magnitude, dtype=bool)
    for d, (dy, dx) in offsets.items():
        ahead = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        behind = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    thin = np.where(keep, magnitude, 0.0)
    strong = thin > high_threshold
    weak = thin > low_threshold
    # Hysteresis: keep weak edges connected (8-neighbourhood) to a strong one.
    labels, count = ndimage.label(weak, structure=np.ones((3, 3)))
    connected = np.zeros(count + 1, dtype=bool)
    connected[np.unique(labels[strong])] = True
    connected[0] = False
    edges = connected[labels]
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1))


def image_grid(images, rows: int = 1, cols: int | None = None) -> Image.Image:
    """Paste same-sized images into a rows x cols grid (cols derived from the count when not given)."""
    images = list(images)
    if not images:
        raise ValueError("images: nothing to put in a grid")
    cols = cols or -(-len(images) // rows)
    if rows * cols < len(images):
        raise ValueError(f"a {rows}x{cols} grid cannot hold {len(images)} images")
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid
