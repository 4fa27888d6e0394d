"""Subject images for fine-tuning: listing, target preprocessing, captions, and the data order.

Follows LAVIS's `SubjectDrivenTextToImageDataset`: every image of the folder shows the subject, the caption
is "a {subject}" for all of them, and the target image is a bicubic resize of the short side, a center crop
and a normalisation to [-1, 1].
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from ..image_processing import load_image, resize_and_center_crop


def list_images(directory: str, argname: str = "images") -> list[str]:
    """Sorted paths of the image files in `directory` (not recursive), each decoded once here, so a broken
    file is found before training starts. Any other file, and any image that does not decode whole (a cut-off
    JPEG), is skipped with a warning; a folder with no image is a ValueError naming `argname`."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{argname} must be a directory path, not {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{argname}: no directory {directory!r}")
    paths = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            continue
        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:  # verify() does not decode: a cut-off JPEG passes it
                image.load()
        except Exception as err:  # PIL raises many types for non-images and broken files
            warnings.warn(f"{argname}: skipping {path!r}, not a readable image ({type(err).__name__}: {err})", stacklevel=2)
            continue
        paths.append(os.path.abspath(path))
    if not paths:
        raise ValueError(f"{argname}: no image files in {directory!r}")
    return paths


def target_image(image, resolution: int, argname: str = "images") -> np.ndarray:
    """(3, R, R) float32 in [-1, 1]: bicubic resize of the short side to R, center crop (torchvision's
    `Resize(R)`, `CenterCrop(R)`, `Normalize(0.5, 0.5)` as LAVIS's target processor)."""
    image = resize_and_center_crop(load_image(image, argname), resolution, resolution)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return ((array - 0.5) / 0.5).transpose(2, 0, 1)


def load_targets(paths: list, resolution: int, argname: str = "images") -> np.ndarray:
    """(N, 3, R, R) float32 target images."""
    return np.stack([target_image(path, resolution, argname) for path in paths])


def normalize_subject(subject: str, argname: str = "subject") -> str:
    """Lower case with single spaces (LAVIS lower-cases the subject and cleans it with its caption processor)."""
    if not isinstance(subject, str):
        raise TypeError(f"{argname} must be a string, not {type(subject).__name__}")
    words = subject.lower().split()
    if not words:
        raise ValueError(f"{argname} is empty")
    return " ".join(words)


def caption(subject: str) -> str:
    """The one training caption LAVIS uses for every image."""
    return f"a {subject}"


def batch_indices(seed: int, step: int, batch_size: int, count: int) -> np.ndarray:
    """Which images form the batch of training step `step` (0-based): a pure function of its arguments.

    The images are read in epochs, each a fresh permutation drawn from (seed, epoch), and batches run on
    across epoch boundaries, so every image is seen equally often and a resumed run sees the same data.
    """
    flat = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(flat, count)
    perms = {int(e): np.random.default_rng([int(seed) & 0xFFFFFFFF, int(e)]).permutation(count) for e in np.unique(epochs)}
    return np.array([perms[int(e)][o] for e, o in zip(epochs, offsets)], dtype=np.int64)
