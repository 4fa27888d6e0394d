"""Read a component's PyTorch weights as numpy: safetensors, or `.bin` through `torch.load(weights_only=True)`.

`open_folder_weights` / `open_weights_file` give a `LazyStateDict`: names and shapes up front, each tensor
read from disk only when asked for, so that a converter can read, convert and place one tensor at a time
(the whole state dict next to the converted params doubled the peak memory of `from_pt=True` loads).
`read_folder_weights` / `read_weights_file` read everything at once, as a plain dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Callable

import numpy as np

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
# safetensors dtypes numpy reads; a file with any other (bf16, fp8) is read through torch, every tensor as fp32.
NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "C64"}


class LazyStateDict(Mapping):
    """A read-only state dict whose tensors are read when indexed (every time: nothing is kept). `shape(key)`
    needs no read."""

    def __init__(self, shapes: dict[str, tuple], read: Callable[[str], np.ndarray]):
        self._shapes, self._read = shapes, read

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    @classmethod
    def of(cls, state: dict) -> LazyStateDict:
        """A state dict already in memory, behind the same interface."""
        return cls({k: tuple(np.shape(v)) for k, v in state.items()}, state.__getitem__)

    @classmethod
    def merged(cls, parts: list[LazyStateDict]) -> LazyStateDict:
        """Shards as one state dict; a name in several shards is read from the last, as `dict.update` does."""
        owner = {key: part for part in parts for key in part}
        return cls({key: part.shape(key) for key, part in owner.items()}, lambda key: owner[key][key])


def _safe_open(path: str, framework: str):
    """safetensors' reader with positioned reads where the installed version has them: a memory map would keep
    every page it read resident until the file is closed."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework=framework, backend="pread")
    except TypeError:  # safetensors without the `backend` argument
        return safe_open(path, framework=framework)


def _open_safetensors(path: str) -> LazyStateDict:
    from safetensors import SafetensorError

    try:
        with _safe_open(path, "np") as f:
            info = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    shapes = {k: shape for k, (_, shape) in info.items()}
    if all(dtype in NUMPY_DTYPES for dtype, _ in info.values()):

        def read(key: str) -> np.ndarray:
            with _safe_open(path, "np") as f:
                return f.get_tensor(key)
    else:  # bf16 tensors cannot be read as numpy: go through torch

        def read(key: str) -> np.ndarray:
            with _safe_open(path, "pt") as f:
                return f.get_tensor(key).float().numpy()

    return LazyStateDict(shapes, read)


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


def open_weights_file(path: str) -> LazyStateDict:
    """One weights file as a `LazyStateDict` (a `.bin` pickle is read whole: it has no index to read by)."""
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    return LazyStateDict.of(_read_bin(path))


def read_weights_file(path: str) -> dict[str, np.ndarray]:
    return dict(open_weights_file(path))


def open_folder_weights(folder: str) -> tuple[LazyStateDict, str]:
    """The state dict of one component folder as a `LazyStateDict`, and the file(s) it comes from (sharded
    indexes too)."""
    for name in WEIGHT_NAMES:
        index = os.path.join(folder, name + ".index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return LazyStateDict.merged([open_weights_file(os.path.join(folder, shard)) for shard in shards]), index
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return open_weights_file(path), path
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)})")


def read_folder_weights(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """The state dict of one component folder, and the file(s) it came from (sharded indexes too)."""
    state, source = open_folder_weights(folder)
    return dict(state), source
