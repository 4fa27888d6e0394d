"""The evaluation's metric models, from transformers' PyTorch files to a Flax directory, strictly.

    python -m convert.metrics SRC OUT [--kind clip|dino]

SRC: a transformers folder (config.json and model.safetensors or pytorch_model.bin) of a `CLIPModel`
(CLIP-I, CLIP-T; e.g. openai/clip-vit-base-patch32) or a `ViTModel` (DINO; facebook/dino-vits16), or a Hub
id. Every tensor must fill exactly one Flax param of transformers' `FlaxCLIPModel` / `FlaxViTModel` and every
param be filled (convert/mapping.py), else the error lists the keys. OUT holds `config.json`,
`flax_model.msgpack`, `blipdiff_metric.json` (kind, source, the metric's preprocessing) and, for CLIP, its
tokenizer; `blipdiff_jax.evaluation.metrics.load_metric_model(OUT)` reads it without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from flax.traverse_util import flatten_dict, unflatten_dict

from blipdiff_jax.evaluation.metric_models import METRIC_FILE, PARAMS_FILE, flax_model, param_shapes

from .mapping import map_state_dict
from .state_dict import open_folder_weights

# DINO's evaluation transform (DreamBooth's DINO metric): resize the short side to 256/224 of the crop, bicubic,
# center-crop, ImageNet mean/std.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# OpenAI CLIP's own transform: short side to the input size, bicubic, center-crop, CLIP mean/std.
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
KINDS = {"clip": "clip", "vit": "dino"}  # config.json model_type -> metric


@dataclasses.dataclass
class MetricWeights:
    kind: str  # "clip" or "dino"
    config: object  # transformers CLIPConfig / ViTConfig
    params: dict  # Flax params (numpy)
    preprocessing: dict  # resize, crop, mean, std
    tokenizer: object | None  # CLIPTokenizer for CLIP
    source: str
    add_pooling_layer: bool = False  # ViT only: the checkpoint has ViTModel's pooler


def preprocessing_for(kind: str, config, src: str) -> dict:
    if kind == "dino":
        crop = int(config.image_size)
        return {"resize": round(crop * 256 / 224), "crop": crop, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    crop = int(config.vision_config.image_size)
    mean, std = CLIP_MEAN, CLIP_STD
    processor = os.path.join(src, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            saved = json.load(f)
        mean, std = list(saved.get("image_mean", mean)), list(saved.get("image_std", std))
    return {"resize": crop, "crop": crop, "mean": mean, "std": std}


def read_metric_directory(src: str, kind: str | None = None) -> MetricWeights:
    """Strictly convert a transformers PyTorch folder of a CLIPModel or a ViTModel (kind from its config's
    model_type unless given)."""
    from transformers import AutoConfig

    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src}: no config.json (expected a transformers CLIPModel or ViTModel folder)")
    config = AutoConfig.from_pretrained(src)
    found = KINDS.get(config.model_type)
    if found is None:
        raise ValueError(f"{src}: model_type {config.model_type!r} is neither 'clip' (CLIP-I/CLIP-T) nor 'vit' (DINO)")
    if kind is not None and kind != found:
        raise ValueError(f"{src}: holds a {config.model_type} model, not a {kind} one")
    state, source = open_folder_weights(src)
    pooler = found == "dino" and "pooler.dense.weight" in state
    model = flax_model(found, config, add_pooling_layer=pooler)
    flat = map_state_dict(state, param_shapes(model), component=found, style="transformers", source=source)
    tokenizer = None
    if found == "clip":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(src)
    return MetricWeights(found, config, unflatten_dict(flat), preprocessing_for(found, config, src), tokenizer, source, pooler)


def save_metric_model(weights: MetricWeights, out: str, overwrite: bool = False) -> str:
    """Write `weights` to the folder `out`, which appears complete or not at all (written beside it, then
    renamed); an existing `out` is replaced only with `overwrite`."""
    import shutil
    import tempfile

    import numpy as np
    from flax.serialization import msgpack_serialize

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    try:
        weights.config.save_pretrained(staging)
        params = unflatten_dict({path: np.asarray(leaf, np.float32) for path, leaf in flatten_dict(weights.params).items()})
        with open(os.path.join(staging, PARAMS_FILE), "wb") as f:
            f.write(msgpack_serialize(params))
        if weights.tokenizer is not None:
            weights.tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, METRIC_FILE), "w") as f:
            json.dump({"kind": weights.kind, "source": weights.source, "preprocessing": weights.preprocessing,
                       "add_pooling_layer": weights.add_pooling_layer}, f, indent=2)
        os.chmod(staging, 0o755)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="transformers CLIPModel or ViTModel (DINO) folder, or a Hub id such as facebook/dino-vits16")
    parser.add_argument("out", help="new folder for the Flax metric model")
    parser.add_argument("--kind", choices=("clip", "dino"), default=None, help="check the model is of this kind")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out):
            raise FileExistsError(f"{args.out} already exists; choose a new path")
        from blipdiff_jax.evaluation.metric_models import metric_snapshot

        src = args.src if os.path.isdir(args.src) else metric_snapshot(args.src)
        weights = read_metric_directory(src, args.kind)
        save_metric_model(weights, args.out)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({weights.kind}, {len(flatten_dict(weights.params))} params from {weights.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
