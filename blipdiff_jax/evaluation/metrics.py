"""DreamBench's metrics: DINO, CLIP-I and CLIP-T, computed in JAX (metric_models.py).

- DINO: cosine similarity of ViT-S/16 DINO [CLS] features (the last layer, normalised) between a generated
  image and each real photo of the subject, averaged over the photos. Preprocessing: short side to 256
  (bicubic), center crop 224, ImageNet mean/std.
- CLIP-I: the same with CLIP image embeddings. CLIP-T: cosine similarity of the image embedding with the
  prompt's text embedding (the prompt with the class word, no unique token). CLIP's own preprocessing.

The models are converted strictly from their PyTorch files (convert/metrics.py), once: a Hub id is
downloaded and its conversion kept under $BLIPDIFF_JAX_CACHE/converted-metrics/.
"""

from __future__ import annotations

import os

import numpy as np

from .metric_models import MetricModel, is_metric_directory, metric_snapshot, read_metric_model

CLIP_BACKBONES = {"ViT-B-32": "openai/clip-vit-base-patch32", "ViT-L-14": "openai/clip-vit-large-patch14"}
DEFAULT_DINO = "facebook/dino-vits16"


def cosine(a, b) -> np.ndarray:
    """(len(a), len(b)) cosine similarities, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def subject_scores(dino: MetricModel, clip: MetricModel, generated, texts, real) -> np.ndarray:
    """(len(generated), 3) float64: DINO, CLIP-I and CLIP-T of each generated image of one subject, against
    `real` (the subject's photos) and its prompt `texts[i]`."""
    if len(generated) != len(texts):
        raise ValueError(f"texts: {len(texts)} prompts for {len(generated)} images")
    generated = list(generated)
    unique = sorted(set(texts))
    text_features = clip.text_features(unique)
    clip_generated = clip.image_features(generated)
    scores = np.empty((len(generated), 3))
    scores[:, 0] = cosine(dino.image_features(generated), dino.image_features(real)).mean(axis=1)
    scores[:, 1] = cosine(clip_generated, clip.image_features(real)).mean(axis=1)
    scores[:, 2] = cosine(clip_generated, text_features)[np.arange(len(texts)), [unique.index(t) for t in texts]]
    return scores


def real_image_scores(subjects, dino: MetricModel, clip: MetricModel) -> dict:
    """The benchmark's upper bound: each subject's photos scored against the subject's other photos (DINO,
    CLIP-I; no prompt, so no CLIP-T), averaged per photo, then over every photo. `subjects`: lists of photos."""
    per_photo = {"dino": [], "clip_i": []}
    for photos in subjects:
        if len(photos) < 2:
            continue
        for metric, model in (("dino", dino), ("clip_i", clip)):
            features = model.image_features(photos)
            sims = cosine(features, features)
            per_photo[metric] += ((sims.sum(axis=1) - np.diag(sims)) / (len(photos) - 1)).tolist()
    count = len(per_photo["dino"])
    return {"dino": float(np.mean(per_photo["dino"])) if count else None,
            "clip_i": float(np.mean(per_photo["clip_i"])) if count else None, "clip_t": None, "images": count}


def load_metric_model(spec: str, kind: str) -> MetricModel:
    """The metric model `spec` names: for CLIP a backbone name (ViT-B-32, ViT-L-14: OpenAI's CLIP on the Hub),
    or a folder converted by `python -m convert.metrics`, a transformers PyTorch folder (converted in memory),
    or a Hub id (converted once, kept in the cache)."""
    from ..hub import cache_root, is_hub_id

    repo = CLIP_BACKBONES.get(spec, spec) if kind == "clip" else spec
    if os.path.isdir(repo) and is_metric_directory(repo):
        model = read_metric_model(repo, spec)
    elif os.path.isdir(repo):
        from convert.metrics import read_metric_directory

        weights = read_metric_directory(repo, kind)
        model = MetricModel(weights.kind, weights.config, weights.params, weights.preprocessing, weights.tokenizer, spec,
                            weights.add_pooling_layer)
    elif is_hub_id(repo):
        cached = os.path.join(cache_root(), "converted-metrics", repo.replace("/", "--"))
        if not is_metric_directory(cached):
            from convert.metrics import read_metric_directory, save_metric_model

            print(f"converting {repo} once into {cached}")
            save_metric_model(read_metric_directory(metric_snapshot(repo), kind), cached, overwrite=True)
        model = read_metric_model(cached, spec)
    else:
        choices = f" (or {', '.join(CLIP_BACKBONES)})" if kind == "clip" else ""
        raise FileNotFoundError(f"--{kind}: {spec!r} is no folder and no Hub id{choices}")
    if model.kind != kind:
        raise ValueError(f"--{kind}: {spec} holds a {model.kind} model")
    return model
