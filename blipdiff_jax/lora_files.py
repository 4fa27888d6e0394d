"""LoRA files: Stable Diffusion 1.5 LoRAs (diffusers/peft and kohya safetensors) read strictly onto our Flax params,
and the adapters LoRA fine-tuning writes.

Formats read (safetensors only: a pickle, `.bin`/`.pt`/`.ckpt`, can run code when loaded, so it is refused):

    peft / diffusers   unet.<module>.lora_A.weight, .lora_B.weight       (save_lora_weights, get_peft_model_state_dict)
                       unet.<module>.lora.down.weight, .lora.up.weight   (convert_state_dict_to_diffusers)
                       text_encoder.<module>.lora_linear_layer.down/up.weight, old attn-procs `processor.to_q_lora.down`
                       alpha: per-module `<module>.alpha` tensors, else the `lora_adapter_metadata` diffusers writes
                       (lora_alpha, alpha_pattern, use_rslora), else the rank (scale 1)
    kohya              lora_unet_<module_with_underscores>.lora_down.weight, .lora_up.weight, .alpha; lora_te_ / lora_te1_

`<module>` is the PyTorch module name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`); keys with no
`unet.`/`text_encoder.` prefix at all are the UNet's (diffusers' `save_attn_procs`). Every key must be used: one
that names no module, a factor without its partner, a shape that does not fit the module's kernel, an unknown
kind (DoRA, LoHa, SDXL's second text encoder) is a `LoraFileError` that lists the keys, before anything is merged.

A LoRA fine-tuning output directory holds the adapter (`pytorch_lora_weights.safetensors`, peft keys and
diffusers' metadata, so diffusers' `load_lora_weights` reads it too), `subject_embeddings.npy` and `lora.json`,
the manifest naming the base model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a directory
MANIFEST = "lora.json"
EMBEDDINGS = "subject_embeddings.npy"
MANIFEST_CLASS = "BlipDiffusionLoRA"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (LoraConfig per component)
COMPONENTS = ("unet", "text_encoder")

_PREFIXES = (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("lora_unet_", "unet"), ("lora_te_", "text_encoder"),
             ("lora_te1_", "text_encoder"))
_UNSUPPORTED_PREFIXES = {"text_encoder_2.": "SDXL's second text encoder", "lora_te2_": "SDXL's second text encoder"}
# (key suffix, factor): peft, diffusers, diffusers' text-encoder layers, kohya; "alpha" per module.
_SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"), (".lora.up.weight", "B"),
             (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
             (".lora_down.weight", "A"), (".lora_up.weight", "B"), ("_lora.down.weight", "A_old"),
             ("_lora.up.weight", "B_old"), (".alpha", "alpha"))
# diffusers' attn-procs names (`attn1.processor.to_q_lora`) -> the module they adapt.
_OLD_NAMES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


class LoraFileError(ValueError):
    """A LoRA file does not fit the model: lists the keys that name no module, lack a partner or do not fit."""


@dataclasses.dataclass
class LoraFile:
    """A LoRA read onto a model: per component, the factors (Flax orientation, `blipdiff_jax.models.lora`) and each
    module's alpha / rank; the learned subject embeddings when it is a LoRA fine-tuning directory."""

    path: str
    factors: dict
    scales: dict
    subject_embeddings: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------- paths


def is_lora_directory(path) -> bool:
    """`path` is a LoRA fine-tuning output (holds the manifest)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST))


def lora_file_path(path, argname: str = "path") -> str:
    """The safetensors file `path` names (a directory: its pytorch_lora_weights.safetensors). Pickles and other
    files are refused before they are opened."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argname} must be a LoRA file path, not {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, WEIGHT_NAME)
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"{argname}: the directory {path} holds no {WEIGHT_NAME}")
        return inner
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{argname}: no LoRA file {path!r}")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraFileError(f"{argname}: {path} refused: pickle files can run code when loaded; only .safetensors "
                            "LoRA files are read (convert it with safetensors' tools first)")
    if not path.lower().endswith(".safetensors"):
        raise LoraFileError(f"{argname}: {path} is not a .safetensors file; only .safetensors LoRA files are read")
    return path


def _read_safetensors(path: str, argname: str) -> tuple[dict, dict]:
    """(key -> float32 numpy array, metadata) of a safetensors file (bf16 too, without torch)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="flax") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: np.asarray(f.get_tensor(key), np.float32) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise LoraFileError(f"{argname}: {path} is not a readable safetensors file ({err})") from err
    return tensors, metadata


# ---------------------------------------------------------------------------------------------- reading


def _component(key: str, bare: bool):
    """(component, the key without its prefix, kohya naming?); raises KeyError with the reason for an unsupported key."""
    for prefix, reason in _UNSUPPORTED_PREFIXES.items():
        if key.startswith(prefix):
            raise KeyError(reason)
    for prefix, component in _PREFIXES:
        if key.startswith(prefix):
            return component, key[len(prefix):], prefix.startswith("lora_")
    if bare:
        return "unet", key, False
    raise KeyError("no unet./text_encoder./lora_unet_/lora_te_ prefix")


def _split(rest: str, component: str):
    """(module name, factor) of a key without its component prefix, or None for an unknown kind."""
    for suffix, factor in _SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            module = rest[: -len(suffix)]
            if factor.endswith("_old"):  # attn1.processor.to_q_lora.down.weight
                parent, _, old = module.rpartition(".")
                if old not in _OLD_NAMES[component]:
                    return None
                module = (parent + "." if parent else "") + _OLD_NAMES[component][old]
                factor = factor[0]
            return module.replace(".processor.", ".").removeprefix("processor."), factor
    return None


def _pattern_value(patterns: dict, name: str):
    """peft's rule for alpha_pattern / rank_pattern: the first pattern that matches the name's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def _adapter_configs(metadata: dict, argname: str, file: str) -> dict:
    """Each component's LoraConfig from diffusers' `lora_adapter_metadata` ({} when the file has none); DoRA refused."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as err:
        raise LoraFileError(f"{argname}: {file}: unreadable {METADATA_KEY} ({err})") from err
    configs: dict = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    dora = [component for component, config in configs.items() if config.get("use_dora")]
    if dora:
        raise LoraFileError(f"{argname}: {file}: DoRA adapters ({', '.join(dora)}) are not supported")
    return configs


def _config_scale(config: dict, name: str, rank: int) -> float:
    """alpha / rank of a module from its component's LoraConfig (alpha_pattern, lora_alpha, use_rslora); without
    one, alpha = rank (scale 1), as diffusers assumes."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _to_flax(a: np.ndarray, b: np.ndarray, kernel_shape: tuple):
    """(down, up) in the kernel's layout from PyTorch's lora_A (r, in[, kh, kw]) and lora_B (out, r[, 1, 1]),
    or None when they do not fit the kernel."""
    if a.ndim not in (2, 4) or b.ndim not in (2, 4) or a.shape[0] != b.shape[1]:
        return None
    if b.ndim == 4 and b.shape[2:] != (1, 1):
        return None
    rank, out = a.shape[0], b.shape[0]
    up = b.reshape(out, rank).T
    if len(kernel_shape) == 2:
        if a.ndim == 4 and a.shape[2:] != (1, 1):
            return None
        down = a.reshape(rank, -1).T
        return ((down, up) if down.shape == (kernel_shape[0], rank) and out == kernel_shape[1] else None)
    kh, kw, cin, cout = kernel_shape
    if a.ndim == 2:
        a = a.reshape(a.shape + (1, 1))
    if a.shape[1:] != (cin, kh, kw) or out != cout:
        return None
    return a.transpose(2, 3, 1, 0), up.reshape(1, 1, rank, out)


def read_lora(path, params: dict, styles: dict, argname: str = "path") -> LoraFile:
    """Read the LoRA at `path` onto `params` ({"unet": tree, "text_encoder": tree}; `styles`: each component's
    naming style, components.NAMING_STYLE). Strict: every key used, every factor fitting its module."""
    from flax.traverse_util import unflatten_dict

    from .models.lora import module_index

    file = lora_file_path(path, argname)
    tensors, metadata = _read_safetensors(file, argname)
    if not tensors:
        raise LoraFileError(f"{argname}: {file} holds no tensors")
    configs = _adapter_configs(metadata, argname, file)
    # PyTorch module name (dotted, or kohya's underscored) -> (dotted name, Flax path, kernel shape), per component.
    indexes = {}
    for component in COMPONENTS:
        if component in params:
            dotted = {name: (name,) + entry for name, entry in module_index(params[component], styles[component]).items()}
            indexes[component, False] = dotted
            indexes[component, True] = {name.replace(".", "_"): entry for name, entry in dotted.items()}
    known = tuple(p for p, _ in _PREFIXES) + tuple(_UNSUPPORTED_PREFIXES)
    bare = not any(key.startswith(known) for key in tensors)
    found: dict[tuple, dict] = {}
    unexpected, unsupported, duplicate = [], [], []
    for key in sorted(tensors):
        try:
            component, rest, kohya = _component(key, bare)
        except KeyError as reason:
            unsupported.append(f"{key} ({reason.args[0]})")
            continue
        split = _split(rest, component)
        if split is None:
            unexpected.append(f"{key} (not a LoRA factor or alpha of a known kind)")
            continue
        name, factor = split
        entry = indexes.get((component, kohya), {}).get(name)
        if entry is None:
            unexpected.append(f"{key} (no {component} module {name})")
            continue
        keys = found.setdefault((component,) + entry[:2], {})
        if factor in keys:
            duplicate.append(f"{key} and {keys[factor]}")
            continue
        keys[factor] = key
    incomplete, wrong_shape = [], []
    flat = {c: {} for c, _ in indexes}
    scales = {c: {} for c, _ in indexes}
    for (component, name, module_path), keys in found.items():
        if "A" not in keys or "B" not in keys:
            lacking = "up (lora_B)" if "A" in keys else "down (lora_A)"
            incomplete.append(f"{', '.join(sorted(keys.values()))} (no {lacking} factor)")
            continue
        kernel_shape = indexes[component, False][name][2]
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        pair = _to_flax(a, b, kernel_shape)
        if pair is None:
            wrong_shape.append(f"{keys['A']} {a.shape} and {keys['B']} {b.shape} do not fit the kernel "
                               f"{kernel_shape} of {component} {'/'.join(module_path)}")
            continue
        rank = a.shape[0]
        if "alpha" in keys:
            alpha = tensors[keys["alpha"]]
            if alpha.size != 1:
                wrong_shape.append(f"{keys['alpha']}: an alpha is one number, found shape {alpha.shape}")
                continue
            scale = float(alpha.reshape(())) / rank
        else:
            scale = _config_scale(configs.get(component, {}), name, rank)
        flat[component][module_path + ("down",)], flat[component][module_path + ("up",)] = pair
        scales[component][module_path] = scale
    problems = []
    where = f"{argname}: {file}"
    for label, items in (("keys that name no module or are not LoRA factors", unexpected),
                         ("unsupported keys", unsupported), ("factors without their partner", incomplete),
                         ("factors that do not fit", wrong_shape), ("keys that fill the same factor", duplicate)):
        if items:
            problems.append(f"{label}: {'; '.join(items)}")
    if problems:
        raise LoraFileError(f"{where}: " + " | ".join(problems))
    factors = {c: unflatten_dict(f) for c, f in flat.items() if f}
    embeddings = None
    folder = os.path.dirname(file)
    if os.path.isfile(os.path.join(folder, MANIFEST)) and os.path.isfile(os.path.join(folder, EMBEDDINGS)):
        embeddings = np.load(os.path.join(folder, EMBEDDINGS))
    return LoraFile(file, factors, {c: s for c, s in scales.items() if s}, embeddings)


# ---------------------------------------------------------------------------------------------- writing


def _to_torch(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's (lora_A, lora_B) weights of Flax-oriented factors."""
    if down.ndim == 2:
        return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
    return np.ascontiguousarray(down.transpose(3, 2, 0, 1)), np.ascontiguousarray(up.transpose(3, 2, 0, 1))


def write_lora(path: str, factors: dict, configs: dict, styles: dict) -> str:
    """Write `factors` ({component: LoRA}) as diffusers' `save_lora_weights` does with peft layers: keys
    `<component>.<module>.lora_A.weight` / `lora_B.weight` (float32) and `lora_adapter_metadata` with each
    component's `configs` entry ({"r", "lora_alpha", "target_modules"}). Written to a temporary name, then renamed."""
    from safetensors.numpy import save_file

    from .models.lora import module_name, modules_of

    tensors, packed = {}, {}
    for component, tree in factors.items():
        for module_path, pair in modules_of(tree).items():
            a, b = _to_torch(np.asarray(pair["down"], np.float32), np.asarray(pair["up"], np.float32))
            name = f"{component}.{module_name(module_path, styles[component])}"
            tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = a, b
        config = {"peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "use_dora": False, "use_rslora": False,
                  "alpha_pattern": {}, "rank_pattern": {}, "init_lora_weights": True, **configs[component]}
        config["target_modules"] = list(config["target_modules"])
        packed.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("_class_name") != MANIFEST_CLASS:
        raise ValueError(f"path: {os.path.join(path, MANIFEST)} is not a {MANIFEST_CLASS} manifest")
    return manifest


def write_lora_directory(out: str, factors: dict, configs: dict, styles: dict, subject_embeddings, base_model,
                         extra: dict | None = None) -> str:
    """OUT as LoRA fine-tuning leaves it: the adapter, the subject embeddings, then the manifest (written last, so
    a directory with a manifest is complete)."""
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    write_lora(os.path.join(out, WEIGHT_NAME), factors, configs, styles)
    np.save(os.path.join(out, EMBEDDINGS + ".tmp.npy"), np.asarray(subject_embeddings, np.float32))
    os.replace(os.path.join(out, EMBEDDINGS + ".tmp.npy"), os.path.join(out, EMBEDDINGS))
    manifest = {"_class_name": MANIFEST_CLASS, "base_model": base_model, "weight_name": WEIGHT_NAME,
                "subject_embeddings": EMBEDDINGS, **(extra or {})}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(manifest_path + ".tmp", manifest_path)
    return out
