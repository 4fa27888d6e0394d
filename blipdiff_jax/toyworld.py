"""A toy world small enough to pre-train BLIP-Diffusion on a CPU, and an analyser that reads its pictures.

A subject is a (shape, colour, pattern): a circle, square, triangle or star, in one of eight colours, solid
or striped. A training pair (the paper's "prompted context generation") is

    reference  the subject at a random place, scale and flip on a random cluttered grey-ish background
    target     the same subject at another place and scale on a named background colour
    category   the shape word            prompt  "on a {background} background"

No text ever names the colour or the pattern: only the reference image carries them, so a model that
draws them right has carried the subject from the reference into the new image. `HELD_OUT` subjects never
appear in training; the transfer benchmark (`benchmarks/toy_transfer.py`) generates them.

`analyse(image)` reads colour, pattern, shape and background back from a picture by nearest-palette
classification of its pixels and template matching of the subject's mask: deterministic, no learning.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 225, 20),
    "green": (30, 170, 50),
    "cyan": (20, 205, 215),
    "blue": (30, 60, 225),
    "purple": (145, 40, 200),
    "pink": (250, 110, 200),
}
PATTERNS = ("solid", "striped")
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 205, 160),
    "brown": (105, 65, 35),
}
STRIPE = (250, 250, 250)  # the second colour of a striped subject
IMAGE_SIZE = 32  # pixels of the toy model's images

ALL_SUBJECTS = tuple(itertools.product(SHAPES, COLOURS, PATTERNS))
# Every 5th subject (13 of 64, 20%): each shape, colour and pattern still appears in training.
HELD_OUT = tuple(ALL_SUBJECTS[i] for i in range(2, len(ALL_SUBJECTS), 5))
TRAIN_SUBJECTS = tuple(s for s in ALL_SUBJECTS if s not in HELD_OUT)

_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel centres of an n x n grid as fractions of the image (read-only, shared by every render)."""
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _check(shape: str, colour: str, pattern: str, background) -> None:
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}: choose one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r}: choose one of {tuple(COLOURS)}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}: choose one of {PATTERNS}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}: choose one of {tuple(BACKGROUNDS)} or None")


def shape_mask(shape: str, size: int, centre=(0.5, 0.5), scale: float = 0.5, flip: bool = False) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of `shape` with its bounding box `scale * size` wide around
    `centre` (fractions of the image), anti-aliased by supersampling."""
    y, x = _grid(size * _SUPERSAMPLE)
    u = (x - centre[0]) / (scale / 2)  # [-1, 1] across the bounding box
    v = (y - centre[1]) / (scale / 2)
    if flip:
        v = -v
    if shape == "circle":
        inside = u**2 + v**2 <= 1.0
    elif shape == "square":
        inside = (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
    elif shape == "triangle":
        inside = (v <= 1.0) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    else:  # a five-pointed star, point up
        radius = np.hypot(u, v)
        angle = np.arctan2(u, -v)  # 0 at the top
        sector = (angle % (2 * math.pi / 5)) - math.pi / 5
        inner, outer = 0.45, 1.0
        # the star's edge between an outer point (sector edge at 0) and an inner corner
        t = np.abs(sector) / (math.pi / 5)
        edge = 1.0 / (t / inner + (1 - t) / outer)
        inside = radius <= edge
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _stripes(size: int, scale: float, centre) -> np.ndarray:
    """(size, size) 1 where a horizontal stripe of the second colour lies (4 stripes across the subject)."""
    y, _ = _grid(size * _SUPERSAMPLE)
    phase = (y - (centre[1] - scale / 2)) / (scale / 4)
    stripe = (np.floor(phase) % 2 == 1).astype(np.float32)
    return stripe.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random low-saturation background: a gradient and a few grey-ish blobs (what a photo's would be)."""
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    grey = lambda c: 0.75 * c.mean() + 0.25 * c  # noqa: E731  (keep backgrounds desaturated)
    direction = rng.uniform(0, 1)
    t = (direction * x + (1 - direction) * y)[..., None]
    image = grey(a) * (1 - t) + grey(b) * t
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        blob = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None]
        image = np.where(blob, grey(rng.uniform(30, 230, 3)), image)
    return image + rng.normal(0, 4, image.shape)


def render_subject(shape: str, colour: str, pattern: str, background: str | None = None, size: int = IMAGE_SIZE,
                   seed: int = 0, centre=None, scale=None, flip=None) -> Image.Image:
    """The subject on a named `background` (None: a random cluttered one, as a reference photo would have).
    Place, scale and flip are drawn from `seed` unless given; the same arguments give the same image."""
    _check(shape, colour, pattern, background)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
    scale = float(rng.uniform(0.45, 0.7) if scale is None else scale)
    if centre is None:
        centre = tuple(rng.uniform(scale / 2 + 0.02, 1 - scale / 2 - 0.02, 2))
    flip = bool(rng.integers(2)) if flip is None else bool(flip)
    if shape in ("circle", "square"):
        flip = False  # symmetric: a flip would change nothing but the random stream
    if background is None:
        image = _clutter(rng, size)
    else:
        image = np.broadcast_to(np.asarray(BACKGROUNDS[background], np.float64), (size, size, 3))
    fill = np.broadcast_to(np.asarray(COLOURS[colour], np.float64), (size, size, 3))
    if pattern == "striped":
        stripe = _stripes(size, scale, centre)[..., None]
        fill = fill * (1 - stripe) + np.asarray(STRIPE, np.float64) * stripe
    mask = shape_mask(shape, size, centre, scale, flip)[..., None]
    image = image * (1 - mask) + fill * mask
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))


def subjects(held_out: bool = False) -> tuple:
    return HELD_OUT if held_out else TRAIN_SUBJECTS


def prompt_for(background: str) -> str:
    return f"on a {background} background"


def training_pair(seed: int, index: int, size: int = IMAGE_SIZE, held_out: bool = False) -> dict:
    """Pair `index` of the stream `seed`: {"reference", "target" (PIL), "category", "caption", "subject",
    "background"}. A pure function of its arguments."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 11])
    pool = subjects(held_out)
    shape, colour, pattern = pool[rng.integers(len(pool))]
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    ref_seed, tgt_seed = (int(s) for s in rng.integers(0, 2**31, 2))
    # The target varies less than the reference (near the middle, a moderate size): what a model learns
    # from few steps is the subject and the scene, not where the subject happens to stand.
    scale = float(rng.uniform(0.5, 0.65))
    centre = tuple(0.5 + rng.uniform(-0.1, 0.1, 2))
    return {
        "reference": render_subject(shape, colour, pattern, None, size, ref_seed),
        "target": render_subject(shape, colour, pattern, background, size, tgt_seed, centre=centre, scale=scale),
        "category": shape,
        "caption": prompt_for(background),
        "subject": (shape, colour, pattern),
        "background": background,
    }


# ----------------------------------------------------------------------------------------------- analyser

_PALETTE_NAMES = [("background", b) for b in BACKGROUNDS] + [("colour", c) for c in COLOURS] + [("stripe", "stripe")]
_PALETTE = np.array([BACKGROUNDS[n] if k == "background" else COLOURS[n] if k == "colour" else STRIPE
                     for k, n in _PALETTE_NAMES], np.float64)


def _pixel_classes(image: np.ndarray) -> np.ndarray:
    distance = ((image[..., None, :].astype(np.float64) - _PALETTE) ** 2).sum(-1)
    return distance.argmin(-1)


def _nearest(pixels: np.ndarray, palette: dict) -> np.ndarray:
    colours = np.array(list(palette.values()), np.float64)
    return ((pixels[:, None, :].astype(np.float64) - colours) ** 2).sum(-1).argmin(-1)


def analyse(image) -> dict:
    """{"colour", "pattern", "shape", "background"} read from a toy picture (PIL image or (H, W, 3) uint8).

    - background: the named background nearest to most pixels of the 2-pixel border (where no subject stands);
    - subject pixels: those nearer to a subject colour or the stripe white than to any background colour;
    - colour: the subject colour nearest to most *saturated* subject pixels (HSV saturation and value both
      at least 0.45), so a background drawn murky cannot outvote the subject;
    - pattern: "striped" when stripe white covers over 20% of the subject pixels;
    - shape: the template with the best overlap with the subject's mask in its bounding box.
    A reading with no pixel to go on is None."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    result = {"colour": None, "pattern": None, "shape": None, "background": None}
    border = np.concatenate([array[:2].reshape(-1, 3), array[-2:].reshape(-1, 3), array[2:-2, :2].reshape(-1, 3),
                             array[2:-2, -2:].reshape(-1, 3)])
    names = list(BACKGROUNDS)
    result["background"] = names[int(np.bincount(_nearest(border, BACKGROUNDS), minlength=len(names)).argmax())]
    classes = _pixel_classes(array)
    kind = np.array([k for k, _ in _PALETTE_NAMES])[classes]
    subject = kind != "background"
    if not subject.any():
        return result
    rgb = array.astype(np.float64) / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    saturated = subject & (high >= 0.45) & ((high - low) / np.maximum(high, 1e-6) >= 0.45)
    if saturated.any():
        colours = list(COLOURS)
        votes = np.bincount(_nearest(array[saturated], COLOURS), minlength=len(colours))
        result["colour"] = colours[int(votes.argmax())]
    result["pattern"] = "striped" if (kind == "stripe").sum() > 0.2 * subject.sum() else "solid"
    result["shape"] = _match_shape(subject)
    return result


_TEMPLATES: dict = {}


def _template(shape: str, flip: bool) -> np.ndarray:
    """The shape's coverage cropped to its own bounding box (64 px template, cached)."""
    if (shape, flip) not in _TEMPLATES:
        full = shape_mask(shape, 64, (0.5, 0.5), 0.9, flip)
        rows, cols = np.nonzero(full > 0.5)
        _TEMPLATES[shape, flip] = full[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    return _TEMPLATES[shape, flip]


def _match_shape(mask: np.ndarray) -> str:
    """The shape whose template, stretched to the mask's bounding box, overlaps the mask best (IoU)."""
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for flip in ((False, True) if shape in ("triangle", "star") else (False,)):
            template = Image.fromarray((_template(shape, flip) * 255).astype(np.uint8))
            resized = np.asarray(template.resize((crop.shape[1], crop.shape[0]), Image.BILINEAR)) > 127
            iou = (resized & crop).sum() / max(1, (resized | crop).sum())
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def analyser_accuracy(count: int = 400, seed: int = 12345) -> dict:
    """Fraction of `count` rendered targets (half of them held-out subjects) whose colour, pattern, shape and
    background `analyse` reads right: the analyser's own accuracy, stated next to any result it scores."""
    hits = {"colour": 0, "pattern": 0, "shape": 0, "background": 0}
    for index in range(count):
        pair = training_pair(seed, index, held_out=index % 2 == 0)
        found = analyse(pair["target"])
        shape, colour, pattern = pair["subject"]
        hits["colour"] += found["colour"] == colour
        hits["pattern"] += found["pattern"] == pattern
        hits["shape"] += found["shape"] == shape
        hits["background"] += found["background"] == pair["background"]
    return {k: v / count for k, v in hits.items()}
