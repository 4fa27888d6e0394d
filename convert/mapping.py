"""Strict PyTorch-name -> Flax-path mapping for one component's state dict.

Every PyTorch tensor must be used exactly once and every Flax leaf filled with a matching shape; a
known non-parameter buffer is skipped only if it is on the component's explicit list. Anything else is a
`ConversionError` that lists the offending keys. Pure numpy: no torch needed here.
"""

from __future__ import annotations

import re

import numpy as np

# Buffers PyTorch saves that are not parameters, per component (exact names, no patterns).
KNOWN_BUFFERS = {
    "qformer": ("embeddings.position_ids",),
    "text_encoder": ("text_model.embeddings.position_ids",),
    "unet": (),
    "vae": (),
    "controlnet": (),
    # The evaluation's metric models (convert/metrics.py); older CLIP files saved the position ids.
    "clip": ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"),
    "dino": (),
}

# diffusers' Flax attention modules name their projections differently from PyTorch's.
_DIFFUSERS_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}


class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""


def _diffusers_path(pt_key: str) -> list[list[str]]:
    # diffusers' Flax modules name list items `down_blocks_0`, not `down_blocks/0`.
    key = re.sub(r"(\w+)\.(\d+)(?=\.|$)", r"\1_\2", pt_key)
    key = re.sub(r"(\w+)\.(\d+)(?=\.|$)", r"\1_\2", key)  # a second pass catches `a.0.b.1`
    parts = key.split(".")
    variants = [parts]
    # The VAE's Flax attention says query/key/value/proj_attn, the UNet's keeps to_q/... : try both.
    if len(parts) > 1 and parts[-2] in _DIFFUSERS_ATTENTION_NAMES:
        variants.append(parts[:-2] + [_DIFFUSERS_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return variants


def _candidates(pt_key: str, style: str):
    """Possible Flax paths for a PyTorch key, with the transform each implies."""
    variants = _diffusers_path(pt_key) if style == "diffusers" else [pt_key.split(".")]
    out = []
    for parts in variants:
        prefix, leaf = tuple(parts[:-1]), parts[-1]
        if leaf == "weight":
            out += [(prefix + ("kernel",), "kernel"), (prefix + ("scale",), "copy"), (prefix + ("embedding",), "copy")]
        else:
            out.append((prefix + (leaf,), "copy"))
    return out


def _transform(array: np.ndarray, how: str) -> np.ndarray:
    if how == "kernel" and array.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        return array.T
    if how == "kernel" and array.ndim == 4:  # Conv (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def _transformed_shape(shape: tuple, how: str) -> tuple:
    """The shape `_transform` gives an array of `shape`, without the array."""
    if how == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if how == "kernel" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(shape)


def plan_state_dict(
    shapes: dict[str, tuple],
    expected: dict[tuple, tuple],
    *,
    component: str,
    style: str,
    source: str = "",
) -> dict[tuple, tuple[str, str]]:
    """Flat Flax path -> (PyTorch key, transform) for the checkpoint tensors of `shapes` (key -> shape, in the
    state dict's order), checked before any tensor is read: raises `ConversionError` as `map_state_dict` does."""
    skip = set(KNOWN_BUFFERS.get(component, ()))
    plan: dict[tuple, tuple[str, str]] = {}
    unexpected, wrong_shape, duplicate = [], [], []
    mis_shaped: set[tuple] = set()
    for pt_key, shape in shapes.items():
        if pt_key in skip:
            continue
        for path, how in _candidates(pt_key, style):
            if path in expected:
                break
        else:
            unexpected.append(pt_key)
            continue
        if _transformed_shape(tuple(shape), how) != tuple(expected[path]):
            wrong_shape.append(f"{pt_key}: checkpoint {tuple(shape)}, model expects {tuple(expected[path])}")
            mis_shaped.add(path)  # reported once, as a wrong shape, not again as missing
            continue
        if path in plan:
            duplicate.append(f"{pt_key} and {plan[path][0]}")
            continue
        plan[path] = (pt_key, how)
    missing = [".".join(p) for p in expected if p not in plan and p not in mis_shaped]
    problems = []
    where = f" in {source}" if source else ""
    if missing:
        problems.append(f"missing tensors{where} for Flax params: {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors{where} (used by no param): {', '.join(sorted(unexpected))}")
    if wrong_shape:
        problems.append(f"wrong shapes{where}: {'; '.join(wrong_shape)}")
    if duplicate:
        problems.append(f"tensors{where} that fill the same param: {'; '.join(duplicate)}")
    if problems:
        raise ConversionError(f"{component}: " + " | ".join(problems))
    return plan


def map_state_dict(
    state_dict,
    expected: dict[tuple, tuple],
    *,
    component: str,
    style: str,
    source: str = "",
    place=None,
) -> dict[tuple, np.ndarray]:
    """Map `state_dict` onto the flat Flax leaves `expected` (path -> shape). Returns flat path -> array.

    style: "transformers" (list items are path elements: `layers/0`) or "diffusers" (`down_blocks_0`).
    `state_dict`: a dict, or a mapping with `shape(key)` (`convert.state_dict.LazyStateDict`), checked from the
    shapes before any tensor is read. Tensors are then read one at a time, each converted and passed through
    `place` (e.g. onto a device, cast) before the next is read, so no second copy of the whole state dict is
    ever held.
    """
    shape_of = getattr(state_dict, "shape", None) or (lambda key: np.shape(state_dict[key]))
    shapes = {key: tuple(shape_of(key)) for key in state_dict}
    plan = plan_state_dict(shapes, expected, component=component, style=style, source=source)
    filled: dict[tuple, np.ndarray] = {}
    for path, (pt_key, how) in plan.items():
        array = _transform(np.asarray(state_dict[pt_key]), how)
        filled[path] = array if place is None else place(array)
        del array  # freed before the next tensor is read
    return filled
