"""Generated test images: random pixels, and shapes with clear edges for ControlNet's canny maps."""

import os

import numpy as np
from PIL import Image, ImageDraw


def make_image(seed: int, size=(40, 56), mode="RGB"):
    array = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def edge_picture(seed=0, size=(60, 44)):
    """A synthetic structure source: a few filled shapes, whose canny map has clear edges."""
    image = Image.new("RGB", size, (20, 20, 20))
    draw = ImageDraw.Draw(image)
    rng = np.random.RandomState(seed)
    for _ in range(3):
        x0, y0 = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
        draw.ellipse([x0, y0, x0 + size[0] // 2, y0 + size[1] // 2], fill=tuple(int(v) for v in rng.randint(80, 255, 3)))
    return image


def write_subject_images(path) -> str:
    """Three images of a fine-tuning subject, of different sizes and aspect ratios, into folder `path`."""
    for i, size in enumerate([(40, 56), (56, 40), (32, 32)]):
        make_image(30 + i, size).save(os.path.join(path, f"{i:02d}.png"))
    return str(path)
