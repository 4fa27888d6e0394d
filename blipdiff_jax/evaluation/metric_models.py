"""The metric models of the evaluation (DINO's ViT, CLIP) as transformers' Flax classes, and the folder format
`python -m convert.metrics` writes: `config.json`, `flax_model.msgpack` (the params), `blipdiff_metric.json`
(kind, source, preprocessing) and, for CLIP, the tokenizer. Reading it needs no torch; features run in chunks
of a fixed size (one compiled program per model) at full fp32 matmul precision, so an image's features do not
depend on the batch it came in or on the backend's default precision (bf16 passes on TPU)."""

from __future__ import annotations

import json
import os

import numpy as np

METRIC_FILE = "blipdiff_metric.json"
PARAMS_FILE = "flax_model.msgpack"
CHUNK = 16  # images (or prompts) per compiled call; shorter chunks are padded


def preprocess(images, resize: int, crop: int, mean, std) -> np.ndarray:
    """(n, 3, crop, crop) float32, torchvision's eval transform: Resize(resize) on the short side (bicubic,
    long side truncated as torchvision does), CenterCrop(crop) (offsets rounded as torchvision does), /255,
    Normalize(mean, std). `images`: PIL images or paths."""
    from PIL import Image

    from ..image_processing import resize_and_center_crop

    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        image = resize_and_center_crop(image.convert("RGB"), resize, crop)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(array.transpose(2, 0, 1))
    return np.stack(out) if out else np.zeros((0, 3, crop, crop), np.float32)


def _chunked(fn, inputs: np.ndarray, dim: int) -> np.ndarray:
    """fn over `inputs` in chunks of CHUNK rows, the last padded with copies of its first row."""
    out = []
    for start in range(0, len(inputs), CHUNK):
        part = inputs[start:start + CHUNK]
        padded = np.concatenate([part, np.repeat(part[:1], CHUNK - len(part), axis=0)]) if len(part) < CHUNK else part
        out.append(np.asarray(fn(padded))[:len(part)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def flax_model(kind: str, config, add_pooling_layer: bool = False):
    """transformers' Flax class for a metric `kind` ("clip": FlaxCLIPModel, "dino": FlaxViTModel), no params."""
    from ..runtime.quiet import quiet_flax_notices

    with quiet_flax_notices():
        if kind == "clip":
            from transformers import FlaxCLIPModel

            return FlaxCLIPModel(config, _do_init=False)
        from transformers import FlaxViTModel

        return FlaxViTModel(config, _do_init=False, add_pooling_layer=add_pooling_layer)


def param_shapes(model) -> dict[tuple, tuple]:
    """Flat Flax path -> shape of a transformers Flax model's params, without allocating them."""
    import jax
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    from ..runtime.quiet import quiet_flax_notices

    with quiet_flax_notices():
        shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(unfreeze(shapes)).items()}


class MetricModel:
    """A metric model: `image_features(images)` (DINO: the [CLS] feature; CLIP: the projected image
    embedding) and, for CLIP, `text_features(texts)`, as float32 numpy arrays. `name`: what it was loaded from."""

    def __init__(self, kind: str, config, params: dict, preprocessing: dict, tokenizer=None, name: str = "",
                 add_pooling_layer: bool = False):
        import jax

        if kind not in ("clip", "dino"):
            raise ValueError(f"kind: 'clip' or 'dino', not {kind!r}")
        if kind == "clip" and tokenizer is None:
            raise ValueError("tokenizer: CLIP-T needs the CLIP model's tokenizer")
        self.kind, self.config, self.preprocessing, self.tokenizer, self.name = kind, config, preprocessing, tokenizer, name
        self.model = flax_model(kind, config, add_pooling_layer)
        self.params = jax.device_put(params)
        model = self.model

        def image(params, pixels):
            with jax.default_matmul_precision("float32"):
                if kind == "clip":
                    return model.get_image_features(pixels, params=params)
                return model(pixels, params=params).last_hidden_state[:, 0]

        def text(params, ids, mask):
            with jax.default_matmul_precision("float32"):
                return model.get_text_features(ids, attention_mask=mask, params=params)

        self._image, self._text = jax.jit(image), jax.jit(text)

    @property
    def dim(self) -> int:
        return int(self.config.projection_dim if self.kind == "clip" else self.config.hidden_size)

    def pixels(self, images) -> np.ndarray:
        p = self.preprocessing
        return preprocess(images, p["resize"], p["crop"], p["mean"], p["std"])

    def image_features(self, images) -> np.ndarray:
        return self.pixel_features(self.pixels(images))

    def pixel_features(self, pixels: np.ndarray) -> np.ndarray:
        return _chunked(lambda x: self._image(self.params, x), np.asarray(pixels, np.float32), self.dim)

    def text_features(self, texts) -> np.ndarray:
        if self.kind != "clip":
            raise ValueError("text_features: only the CLIP model has a text tower")
        length = int(self.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="np")
        both = np.concatenate([tokens.input_ids, tokens.attention_mask], axis=1).astype(np.int32)
        return _chunked(lambda x: self._text(self.params, x[:, :length], x[:, length:]), both, self.dim)


def is_metric_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METRIC_FILE)) and os.path.isfile(os.path.join(path, PARAMS_FILE))


def read_metric_model(path: str, name: str | None = None) -> MetricModel:
    """A folder written by `python -m convert.metrics` (no torch); its params must match the model's exactly."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict
    from transformers import AutoConfig, CLIPTokenizer

    with open(os.path.join(path, METRIC_FILE)) as f:
        meta = json.load(f)
    config = AutoConfig.from_pretrained(path)
    model = flax_model(meta["kind"], config, meta.get("add_pooling_layer", False))
    with open(os.path.join(path, PARAMS_FILE), "rb") as f:
        params = msgpack_restore(f.read())
    expected = param_shapes(model)
    found = {p: tuple(np.shape(x)) for p, x in flatten_dict(params).items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:5]
        raise ValueError(f"{path}: its params do not fit its config ({', '.join('/'.join(p) for p, _ in wrong)} ...); "
                         f"convert it again with python -m convert.metrics")
    tokenizer = CLIPTokenizer.from_pretrained(path) if meta["kind"] == "clip" else None
    return MetricModel(meta["kind"], config, params, meta["preprocessing"], tokenizer, name or path,
                       meta.get("add_pooling_layer", False))


def metric_snapshot(repo_id: str) -> str:
    """A local snapshot of a Hub metric model: configs, tokenizer and one weights file (safetensors if the
    repository has it, else pytorch_model.bin), from the Hugging Face cache or downloaded."""
    from huggingface_hub import snapshot_download

    small = ["*.json", "*.txt"]
    for weights in ("model.safetensors", "pytorch_model.bin"):
        for local in (True, False):
            try:
                path = snapshot_download(repo_id, allow_patterns=small + [weights], local_files_only=local)
            except Exception:  # not cached / offline / no such repository: huggingface_hub raises several types
                continue
            if os.path.isfile(os.path.join(path, weights)):
                return path
    raise FileNotFoundError(f"{repo_id}: not in the Hugging Face cache and could not be downloaded (offline?); "
                            f"download it where there is network and pass its folder")


