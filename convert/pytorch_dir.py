"""Convert a diffusers-layout BLIP-Diffusion PyTorch directory into a `ConvertedModel`.

Reads what `BlipDiffusionPipeline.save_pretrained` writes and what the Hub's `Salesforce/blipdiffusion`
(and `-controlnet`) hold. Components are read by folder, so `model_index.json` may name the custom classes
under any library.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from flax.traverse_util import flatten_dict, unflatten_dict

from blipdiff_jax import components
from blipdiff_jax.checkpoint import ConvertedModel
from blipdiff_jax.host_memory import returning_large_blocks

from .mapping import map_state_dict
from .state_dict import open_folder_weights

REQUIRED = ("qformer", "text_encoder", "unet", "vae", "scheduler", "tokenizer")
DEFAULT_MEAN = [0.48145466, 0.4578275, 0.40821073]
DEFAULT_STD = [0.26862954, 0.26130258, 0.27577711]


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def convert_component(name: str, state_dict, config: dict, source: str = "", place=None) -> dict:
    """Strictly map one component's PyTorch state dict (a dict or a `LazyStateDict`) onto its Flax params;
    each converted leaf goes through `place` (see `map_state_dict`) as soon as it is read."""
    module = components.build_model(name, config)
    shapes = components.param_shapes(name, module)
    flat = map_state_dict(state_dict, shapes, component=name, style=components.NAMING_STYLE[name], source=source,
                          place=place)
    return unflatten_dict(flat)


def load_qformer_tokenizer(src: str, config: dict, qformer_tokenizer: str | None = None):
    """The Q-Former's BERT tokenizer: an explicit path, one saved beside the checkpoint, a local path named
    in `qformer/config.json`, or the Hub id named there (from the local cache, else downloaded)."""
    from transformers import BertTokenizer

    named = config.get("tokenizer") or "bert-base-uncased"
    candidates = [qformer_tokenizer, os.path.join(src, "qformer_tokenizer"), os.path.join(src, "qformer", "tokenizer")]
    if os.path.isdir(named):
        candidates.append(named)
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "vocab.txt")):
            tokenizer = BertTokenizer.from_pretrained(path, truncation_side="right")
            break
        if path and path == qformer_tokenizer:
            raise FileNotFoundError(f"qformer_tokenizer: {path} holds no BERT vocab.txt")
    else:
        tokenizer = _hub_bert(named, local_files_only=True) or _hub_bert(named)
        if tokenizer is None:
            raise FileNotFoundError(
                f"The Q-Former's BERT tokenizer {named!r} (named in qformer/config.json) is not in {src} and "
                f"could not be downloaded; pass a local copy with --qformer-tokenizer PATH "
                f"(Python: qformer_tokenizer=PATH)."
            )
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as diffusers' Blip2QFormerModel does
    return tokenizer


def _controlnet_folder(path: str) -> str:
    return path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "controlnet")


def read_component(name: str, folder: str, state_dict: dict | None = None, source: str = "",
                   place=None) -> tuple[dict, dict, str]:
    """(config, Flax params, weights source) of one component folder; `state_dict` replaces its weights files.
    The files are read one tensor at a time, each leaf passed through `place` (see `map_state_dict`)."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{name}: no config.json in {folder}")
    config = _read_json(config_file)
    if state_dict is None:
        state_dict, source = open_folder_weights(folder)
    return config, convert_component(name, state_dict, config, source=source, place=place), source


def read_controlnet(path: str) -> tuple[dict, dict]:
    """(config, Flax params) of an SD 1.5 ControlNet directory (diffusers' PyTorch layout, or a pipeline
    directory with a controlnet/ folder)."""
    config, params, _ = read_component("controlnet", _controlnet_folder(path))
    return config, params


def _hub_bert(name: str, **kwargs):
    from transformers import BertTokenizer

    try:
        return BertTokenizer.from_pretrained(name, truncation_side="right", **kwargs)
    except (OSError, TypeError, ValueError):  # transformers raises TypeError when no vocab file was found
        return None


# The files of LAVIS's released BLIP-Diffusion folder, and the module prefix each one's keys take.
LAVIS_FILES = (
    ("blip_model/blip_weight.pt", "blip."),
    ("proj_layer/proj_weight.pt", "proj_layer."),
    ("text_encoder/pytorch_model.bin", "text_encoder."),
    ("unet/diffusion_pytorch_model.bin", "unet."),
    ("vae/diffusion_pytorch_model.bin", "vae."),
)


def read_lavis_weights(path: str) -> dict[str, dict]:
    """A LAVIS BLIP-Diffusion checkpoint (one state-dict file, or LAVIS's released folder) as diffusers-named
    state dicts per component."""
    from .lavis import lavis_to_diffusers
    from .state_dict import read_weights_file

    if os.path.isfile(path):
        state = read_weights_file(path)
    elif os.path.isdir(path):
        state = {}
        for relative, prefix in LAVIS_FILES:
            file = os.path.join(path, relative)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"lavis: {path} lacks {relative}")
            state.update({prefix + k: v for k, v in read_weights_file(file).items()})
    else:
        raise FileNotFoundError(f"lavis: no checkpoint at {path}")
    return lavis_to_diffusers(state)


def _progress_bar(folders: dict, enabled: bool):
    """A bar over the components (the UNet's read dominates on the real model), disabled when not asked for."""
    from tqdm.auto import tqdm

    return tqdm(total=len(folders), desc="converting", unit="component", disable=not enabled, dynamic_ncols=True)


def read_pytorch_directory(
    src: str,
    *,
    qformer_tokenizer: str | None = None,
    controlnet: str | None = None,
    lavis_weights: str | None = None,
    log: Callable[[str], None] = lambda line: None,
    progress: bool = False,
    place: Callable | None = None,
) -> ConvertedModel:
    """Convert every component of `src` (and an optional separate ControlNet directory) to Flax params.

    With `lavis_weights`, the weights come from that LAVIS checkpoint instead, and `src` supplies the
    configs, scheduler and tokenizers (e.g. the Hub's `Salesforce/blipdiffusion` layout).
    Params are numpy arrays, or what `place` makes of each leaf: tensors are read, converted and placed one
    at a time, so the peak is the placed params plus one tensor, not a state dict next to them."""
    from transformers import CLIPTokenizer

    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory {src} does not exist")
    missing = [name for name in REQUIRED if not os.path.isdir(os.path.join(src, name))]
    if missing:
        raise FileNotFoundError(f"{src} is not a diffusers BLIP-Diffusion directory: no {', '.join(missing)}/ folder")
    index_path = os.path.join(src, "model_index.json")
    index = _read_json(index_path) if os.path.isfile(index_path) else {}
    pipeline_config = {
        "ctx_begin_pos": int(index.get("ctx_begin_pos", 2)),
        "mean": list(index.get("mean") or DEFAULT_MEAN),
        "std": list(index.get("std") or DEFAULT_STD),
    }
    folders = {name: os.path.join(src, name) for name in ("qformer", "text_encoder", "unet", "vae")}
    if controlnet is not None:
        if not os.path.isdir(controlnet):
            raise FileNotFoundError(f"controlnet: no directory {controlnet}")
        folders["controlnet"] = _controlnet_folder(controlnet)
    elif os.path.isdir(os.path.join(src, "controlnet")):
        folders["controlnet"] = os.path.join(src, "controlnet")

    lavis = read_lavis_weights(lavis_weights) if lavis_weights else None
    if lavis is not None and "controlnet" in lavis:
        folders.setdefault("controlnet", os.path.join(src, "controlnet"))
    configs, params = {}, {}
    bar = _progress_bar(folders, progress)
    with returning_large_blocks():  # the readers' freed buffers go back to the OS (blipdiff_jax/host_memory.py)
        for name, folder in folders.items():
            bar.set_postfix_str(name)
            state = lavis.get(name) if lavis is not None else None
            configs[name], params[name], weights_file = read_component(name, folder, state, f"{lavis_weights} ({name})",
                                                                       place=place)
            tensors = len(flatten_dict(params[name]))
            line = f"{name}: {tensors} params from {os.path.relpath(weights_file, src) if weights_file.startswith(src) else weights_file}"
            with bar.external_write_mode():  # the caller's log prints above the bar, not through it
                log(line)
            bar.update(1)
    bar.close()
    configs["scheduler"] = _read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    processor_file = os.path.join(src, "image_processor", "preprocessor_config.json")
    configs["image_processor"] = _read_json(processor_file) if os.path.isfile(processor_file) else {}
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    bert = load_qformer_tokenizer(src, configs["qformer"], qformer_tokenizer)
    log(f"tokenizers: CLIP ({len(tokenizer)} tokens), Q-Former BERT ({len(bert)} tokens)")
    return ConvertedModel(pipeline_config, configs, params, tokenizer, bert)
