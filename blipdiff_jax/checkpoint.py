"""A converted BLIP-Diffusion directory: configs, tokenizers and orbax params, written atomically.

Layout (self-contained, loads without torch):

    model_index.json            {"_class_name": "FlaxBlipDiffusionPipeline", "ctx_begin_pos", "mean", "std", ...}
    qformer/config.json         transformers Blip2Config
    text_encoder/config.json    transformers CLIPTextConfig
    unet/ vae/ [controlnet/]    diffusers config.json
    scheduler/scheduler_config.json
    image_processor/preprocessor_config.json
    tokenizer/                  CLIP tokenizer
    qformer_tokenizer/          the Q-Former's BERT tokenizer (with the "[DEC]" token added)
    params/                     orbax-checkpoint of {"qformer": ..., "text_encoder": ..., "unet": ..., ...}
    [subject_embeddings.npy]    learned subject embeddings (fine-tuned models)
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import time

import numpy as np

from .host_memory import returning_large_blocks

FORMAT_NAME = "FlaxBlipDiffusionPipeline"
PARAMS_DIR = "params"


@dataclasses.dataclass
class ConvertedModel:
    """Everything a pipeline is built from, wherever it was read from."""

    pipeline_config: dict  # ctx_begin_pos, mean, std
    configs: dict  # component name -> config dict (qformer, text_encoder, unet, vae, scheduler, image_processor, [controlnet])
    params: dict  # component name -> Flax param tree
    tokenizer: object  # CLIPTokenizer
    qformer_tokenizer: object  # BertTokenizer
    subject_embeddings: np.ndarray | None = None

    @property
    def components(self) -> list[str]:
        return sorted(self.params)


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _config_path(root: str, name: str) -> str:
    if name == "scheduler":
        return os.path.join(root, "scheduler", "scheduler_config.json")
    if name == "image_processor":
        return os.path.join(root, "image_processor", "preprocessor_config.json")
    return os.path.join(root, name, "config.json")


def _new_folder(prefix: str) -> str:
    """A new folder `prefix` + a random suffix, made with the umask's permissions (mkdtemp's are 0700, which
    would leave the renamed output unreadable to other users)."""
    for _ in range(100):
        path = prefix + secrets.token_hex(4)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a new folder next to {prefix}")


def save_converted(model: ConvertedModel, out: str, *, overwrite: bool = False) -> str:
    """Write `model` to `out`. The directory appears complete or not at all: everything is written to a
    sibling temporary directory that is renamed into place last. An existing `out` is never touched unless
    `overwrite=True` (then it is replaced only after the new one is complete)."""
    import orbax.checkpoint as ocp

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"output directory {out} already exists; choose a new path or pass overwrite=True")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = _new_folder(os.path.join(parent, os.path.basename(out) + ".incomplete-"))
    checkpointer = ocp.StandardCheckpointer()
    try:
        index = {"_class_name": FORMAT_NAME, "components": model.components, **model.pipeline_config}
        _write_json(os.path.join(staging, "model_index.json"), index)
        for name, config in model.configs.items():
            _write_json(_config_path(staging, name), config)
        model.tokenizer.save_pretrained(os.path.join(staging, "tokenizer"))
        model.qformer_tokenizer.save_pretrained(os.path.join(staging, "qformer_tokenizer"))
        if model.subject_embeddings is not None:
            np.save(os.path.join(staging, "subject_embeddings.npy"), np.asarray(model.subject_embeddings))
        checkpointer.save(os.path.join(staging, PARAMS_DIR), model.params)
        checkpointer.wait_until_finished()
        if os.path.exists(out):
            backup = staging + ".old"
            os.rename(out, backup)
            os.rename(staging, out)
            shutil.rmtree(backup)
        else:
            os.rename(staging, out)
    except BaseException:
        checkpointer.close()
        for _ in range(10):  # orbax may still be writing metadata from a background thread
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.exists(staging):
                break
            time.sleep(0.2)
        raise
    checkpointer.close()
    return out


def is_converted_directory(path: str) -> bool:
    index = os.path.join(path, "model_index.json")
    if not (os.path.isfile(index) and os.path.isdir(os.path.join(path, PARAMS_DIR))):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") == FORMAT_NAME


def _restore_params(directory: str, dtype=None):
    """Host numpy arrays as stored; with `dtype`, device arrays whose floating leaves orbax reads straight into
    `dtype` (no numpy copy next to the device copy: half the peak memory of loading a real model)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    if dtype is None:
        return checkpointer.restore(directory)
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    metadata = checkpointer.metadata(directory)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = SingleDeviceSharding(jax.local_devices()[0])

    def abstract(leaf):
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype if floating else leaf.dtype, sharding=device)

    target = jax.tree_util.tree_map(abstract, tree)
    casting = any(leaf.dtype != want.dtype for leaf, want in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(target)))
    if not casting:
        return checkpointer.restore(directory, target)
    # Casting (fp32 files into bf16): each leaf is read at its stored precision and then cast, so read at most
    # 0.1 GB at a time. Measured on the real-size model: bf16 load peak 5.7 GB with orbax's default (96 GB),
    # 4.9 GB with 1, 4.3 GB with 0.1, same time. Not when nothing is cast: an fp32 load peaked at 8.0 GB with 1
    # against 7.0 GB with the default.
    reader = ocp.Checkpointer(ocp.StandardCheckpointHandler(restore_concurrent_gb=0.1))
    return reader.restore(directory, args=ocp.args.StandardRestore(target))


def load_converted(path: str, dtype=None) -> ConvertedModel:
    """Read a directory written by `save_converted` (no torch needed). Params are host numpy arrays, or with
    `dtype` device arrays of that dtype (floating leaves), as the pipelines' `from_pretrained` uses them."""
    from transformers import BertTokenizer, CLIPTokenizer

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not is_converted_directory(path):
        raise ValueError(
            f"{path} is not a converted blipdiff-jax directory (no model_index.json naming {FORMAT_NAME} and "
            f"no {PARAMS_DIR}/); for a diffusers PyTorch directory pass from_pt=True or run `python -m convert`"
        )
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    components = index.pop("components")
    index.pop("_class_name")
    configs = {}
    for name in list(components) + ["scheduler", "image_processor"]:
        with open(_config_path(path, name)) as f:
            configs[name] = json.load(f)
    with returning_large_blocks():  # the read buffers go back to the OS (host_memory.py)
        params = _restore_params(os.path.join(path, PARAMS_DIR), dtype)
    missing = set(components) - set(params)
    if missing:
        raise ValueError(f"{path}/{PARAMS_DIR} lacks the params of {sorted(missing)}")
    embeddings_file = os.path.join(path, "subject_embeddings.npy")
    return ConvertedModel(
        pipeline_config=index,
        configs=configs,
        params=params,
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        qformer_tokenizer=BertTokenizer.from_pretrained(os.path.join(path, "qformer_tokenizer")),
        subject_embeddings=np.load(embeddings_file) if os.path.exists(embeddings_file) else None,
    )
