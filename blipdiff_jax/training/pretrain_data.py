"""Stage-2 pre-training data ("prompted context generation"): sources of (subject, context) pairs and the
grain pipeline that turns them into batches.

An example is {"reference": PIL, "target": PIL, "category": str, "caption": str}: the subject alone on a
random background (the subject encoder's input) and the subject in context (the image to generate).

Sources:
- `ToyWorldSource`: pairs of the toy world (`blipdiff_jax.toyworld`), rendered on the fly.
- `FolderSource`: real data. `DATA` is a JSONL manifest, or a folder holding `metadata.jsonl`; each line
  `{"file_name": "img.jpg", "category": "dog", "caption": "sitting on a beach", "mask": "img.mask.png"}`
  (paths relative to the manifest; `mask` optional when the image has an alpha channel). The image is the
  target; the subject, cut out by its mask, is pasted at a random place, scale and flip on a random image
  of the `backgrounds` folder to make the reference.

Example `i` of a run is a pure function of `(seed, i)`; global batch `step` holds examples
`[step * B, (step+1) * B)`, of which each process reads (by random access into a `grain.MapDataset`) the rows
its devices hold, `[step * B + start, step * B + stop)`. So a resumed run reads exactly what an uninterrupted
one would, and the global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
from PIL import Image

from .. import toyworld
from ..image_processing import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, salt])


class ToyWorldSource:
    """Training pairs of the toy world (never a `HELD_OUT` subject)."""

    def __init__(self, size: int = toyworld.IMAGE_SIZE):
        self.size = size

    def example(self, seed: int, index: int) -> dict:
        pair = toyworld.training_pair(seed, index, self.size)
        return {k: pair[k] for k in ("reference", "target", "category", "caption")}


class FolderSource:
    """Real subjects (manifest above) composited onto the images of `backgrounds`."""

    def __init__(self, data: str, backgrounds: str, argnames=("data", "backgrounds")):
        manifest = os.path.join(data, "metadata.jsonl") if os.path.isdir(data) else data
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{argnames[0]}: no manifest at {manifest!r} (a JSONL file, or a folder with metadata.jsonl)")
        root = os.path.dirname(os.path.abspath(manifest))
        self.entries = []
        with open(manifest) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{argnames[0]}: {manifest}:{number} is not JSON ({err})") from err
                missing = [k for k in ("file_name", "category", "caption") if not isinstance(entry.get(k), str)]
                if missing:
                    raise ValueError(f"{argnames[0]}: {manifest}:{number} lacks {', '.join(missing)}")
                entry = dict(entry, file_name=os.path.join(root, entry["file_name"]))
                if entry.get("mask"):
                    entry["mask"] = os.path.join(root, entry["mask"])
                self.entries.append(entry)
        if not self.entries:
            raise ValueError(f"{argnames[0]}: {manifest} lists no examples")
        if not isinstance(backgrounds, (str, os.PathLike)) or not os.path.isdir(backgrounds):
            raise FileNotFoundError(f"{argnames[1]}: no folder {backgrounds!r}")
        self.backgrounds = sorted(os.path.join(backgrounds, n) for n in os.listdir(backgrounds)
                                  if n.lower().endswith(IMAGE_EXTENSIONS))
        if not self.backgrounds:
            raise ValueError(f"{argnames[1]}: no images in {backgrounds!r}")

    def _subject(self, entry) -> tuple[Image.Image, Image.Image]:
        image = Image.open(entry["file_name"])
        if entry.get("mask"):
            mask = Image.open(entry["mask"]).convert("L")
        elif image.mode in ("RGBA", "LA") or "transparency" in image.info:
            mask = image.convert("RGBA").getchannel("A")
        else:
            raise ValueError(f"data: {entry['file_name']} has no alpha channel and no mask")
        return image.convert("RGB"), mask

    def example(self, seed: int, index: int) -> dict:
        rng = _rng(seed, index, 3)
        entry = self.entries[rng.integers(len(self.entries))]
        image, mask = self._subject(entry)
        box = mask.point(lambda v: 255 if v > 127 else 0).getbbox() or (0, 0, image.width, image.height)
        subject, alpha = image.crop(box), mask.crop(box)
        background = load_image(self.backgrounds[rng.integers(len(self.backgrounds))], "backgrounds")
        side = min(background.size)
        scale = rng.uniform(0.4, 0.9) * side / max(subject.size)
        size = (max(1, int(subject.width * scale)), max(1, int(subject.height * scale)))
        subject, alpha = subject.resize(size, Image.BICUBIC), alpha.resize(size, Image.BILINEAR)
        if rng.integers(2):
            subject, alpha = subject.transpose(Image.FLIP_LEFT_RIGHT), alpha.transpose(Image.FLIP_LEFT_RIGHT)
        position = (int(rng.integers(0, max(1, background.width - size[0] + 1))),
                    int(rng.integers(0, max(1, background.height - size[1] + 1))))
        reference = background.copy()
        reference.paste(subject, position, alpha)
        return {"reference": reference, "target": image, "category": entry["category"], "caption": entry["caption"]}


class PretrainBatches:
    """Batches of arrays for the pre-training step, by random access: `batches[step]`.

    reference (B, 3, R, R) normalised as the subject encoder expects; target (B, 3, S, S) in [-1, 1];
    prompt_ids (B, 77 - Q) of "a {category} {caption}" built as generation builds it (`build_prompts`);
    qformer_ids/qformer_mask (B, 16) of the category word."""

    QFORMER_LENGTH = 16

    def __init__(self, source, pipeline, resolution: int, batch_size: int, seed: int, prompt_reps: int,
                 rows: tuple[int, int] | None = None):
        import grain

        from .data import target_image

        self.source, self.pipeline = source, pipeline
        self.resolution, self.prompt_reps, self.seed = resolution, prompt_reps, seed
        self.batch_size = batch_size
        self.rows = (0, batch_size) if rows is None else tuple(rows)  # this process's rows of a global batch
        self._target_image = target_image
        self.examples = grain.MapDataset.range(0, 2**40).map(self._example)  # by global example id
        # Captions and categories repeat across a dataset (the toy world has 16 pairs of them): tokenizing
        # each once keeps the host's share of a step small.
        self._token_ids = functools.lru_cache(maxsize=2**16)(self._tokenize)

    def _tokenize(self, caption: str, category: str) -> tuple:
        pipe = self.pipeline
        prompt = pipe.build_prompts([caption], [category], 1.0, self.prompt_reps)
        prompt_ids, _ = pipe.prepare_inputs(prompt, [""])
        tokens = pipe.qformer_tokenizer([category], padding="max_length", truncation=True,
                                        max_length=self.QFORMER_LENGTH, return_tensors="np")
        return prompt_ids[0], tokens.input_ids[0].astype(np.int32), tokens.attention_mask[0].astype(np.int32)

    def _example(self, index: int) -> dict:
        from ..image_processing import preprocess_reference

        example = self.source.example(self.seed, int(index))
        pipe = self.pipeline
        prompt_ids, qformer_ids, qformer_mask = self._token_ids(example["caption"], example["category"])
        return {
            "reference": preprocess_reference([example["reference"]], pipe.reference_size, pipe.mean, pipe.std)[0],
            "target": self._target_image(example["target"], self.resolution),
            "prompt_ids": prompt_ids.copy(),
            "qformer_ids": qformer_ids.copy(),
            "qformer_mask": qformer_mask.copy(),
        }

    @staticmethod
    def _collate(examples) -> dict:
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def __getitem__(self, step: int) -> dict:
        first = int(step) * self.batch_size
        return self._collate([self.examples[first + row] for row in range(*self.rows)])
