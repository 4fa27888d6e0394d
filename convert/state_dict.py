"""Read a component's PyTorch weights as numpy: safetensors, or `.bin` through `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import os

import numpy as np

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    except Exception as err:  # bf16 tensors cannot be read as numpy: go through torch
        if "bfloat16" not in str(err) and "dtype" not in str(err):
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(path).items()}


def _read_bin(path: str) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused, the pickle needs code to load (only plain tensors are accepted): {err}") from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_weights_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_bin(path)


def read_folder_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """The state dict of one component folder, and the file(s) it came from (sharded indexes too)."""
    for name in WEIGHT_NAMES:
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(read_weights_file(os.path.join(folder, shard)))
            return state, index
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_weights_file(path), path
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")
