"""LoRA as a param-tree transform on the reused Flax modules: `W + scale * down @ up`, no module forked.

A LoRA of one module is a pair of factors in Flax's orientation (the kernel's):

    Dense kernel (in, out):          down (in, r),         up (r, out)        delta = down @ up
    Conv kernel  (kh, kw, in, out):  down (kh, kw, in, r), up (1, 1, r, out)  delta[h, w] = down[h, w] @ up[0, 0]

(PyTorch's `lora_A.weight` is `down` transposed, `lora_B.weight` is `up` transposed: see `blipdiff_jax.lora_files`.)
A component's LoRA is a nested dict shaped like its params, with `{"down", "up"}` in place of `{"kernel", "bias"}`
at each adapted module. `merge` adds the updates to the kernels and returns new params (the input is left as it is,
untouched leaves are shared): the same program then runs at the same speed. Inside a jitted loss, merging from frozen
params and trained factors differentiates the factors only, which is how LoRA fine-tuning trains.

Modules are named as PyTorch names them (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_model.encoder.layers.0.self_attn.q_proj`): LoRA files and peft's `target_modules` use those names.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

# peft's / diffusers' training defaults: the UNet's attention projections, the CLIP text encoder's.
DEFAULT_TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
# PyTorch ModuleLists of diffusers' UNet: `down_blocks.0` there is `down_blocks_0` in the Flax tree. Every other
# `name_N` (`time_embedding.linear_1`) is the PyTorch name itself.
_DIFFUSERS_LISTS = ("down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "downsamplers",
                    "upsamplers", "to_out", "net", "controlnet_down_blocks")
_LIST_ITEM = re.compile(r"^(%s)_(\d+)$" % "|".join(_DIFFUSERS_LISTS))


def module_name(path: tuple, style: str) -> str:
    """PyTorch module name of a Flax module path (`style`: "diffusers" or "transformers", components.NAMING_STYLE)."""
    if style == "diffusers":
        return ".".join(_LIST_ITEM.sub(r"\1.\2", part) for part in path)
    return ".".join(path)


def module_index(params, style: str) -> dict[str, tuple[tuple, tuple]]:
    """PyTorch module name -> (Flax path, kernel shape) of every module with a kernel (Dense and Conv) in `params`."""
    index = {}
    for path, leaf in flatten_dict(params).items():
        if path[-1] == "kernel":
            index[module_name(path[:-1], style)] = (path[:-1], tuple(np.shape(leaf)))
    return index


def target_modules(params, style: str, targets) -> dict[str, tuple[tuple, tuple]]:
    """The modules of `params` that `targets` names, as peft matches `target_modules`: a module whose name is a
    target or ends with "." + a target. A target that matches nothing is a ValueError naming it."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {targets!r}")
    index = module_index(params, style)
    chosen, unmatched = {}, []
    for target in targets:
        found = {name: entry for name, entry in index.items() if name == target or name.endswith("." + target)}
        if not found:
            unmatched.append(target)
        chosen.update(found)
    if unmatched:
        raise ValueError(f"target_modules: {', '.join(unmatched)} match no module with a kernel (module names as "
                         f"in PyTorch, e.g. {next(iter(sorted(index)), '')})")
    return dict(sorted(chosen.items()))


def init_factors(modules: dict[str, tuple[tuple, tuple]], rank: int, seed: int) -> dict:
    """Host (numpy float32) factors as peft initialises them: `down` (PyTorch's lora_A) uniform in
    +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5)), `up` (lora_B) zero, so the model starts unchanged."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")
    rng = np.random.default_rng(seed)
    flat = {}
    for _, (path, shape) in modules.items():
        down_shape, up_shape = factor_shapes(shape, rank)
        bound = 1.0 / math.sqrt(int(np.prod(down_shape[:-1])))
        flat[path + ("down",)] = rng.uniform(-bound, bound, down_shape).astype(np.float32)
        flat[path + ("up",)] = np.zeros(up_shape, np.float32)
    return unflatten_dict(flat)


def factor_shapes(kernel_shape: tuple, rank: int) -> tuple[tuple, tuple]:
    """(down, up) shapes of a rank-`rank` LoRA of a kernel of `kernel_shape` (Dense 2-D or Conv 4-D)."""
    if len(kernel_shape) == 2:
        return (kernel_shape[0], rank), (rank, kernel_shape[1])
    if len(kernel_shape) == 4:
        return tuple(kernel_shape[:3]) + (rank,), (1, 1, rank, kernel_shape[3])
    raise ValueError(f"no LoRA for a kernel of shape {kernel_shape}")


def kernel_delta(down, up, kernel_shape):
    """down @ up in the kernel's layout (computed in float32)."""
    down, up = jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32)
    rank = down.shape[-1]
    return jnp.tensordot(down, up.reshape(rank, -1), axes=1).reshape(kernel_shape)


def modules_of(factors) -> dict[tuple, dict]:
    """Flax module path -> {"down", "up"} of a component's LoRA."""
    grouped: dict[tuple, dict] = {}
    for path, leaf in flatten_dict(factors).items():
        grouped.setdefault(path[:-1], {})[path[-1]] = leaf
    return grouped


@jax.jit
def merged_kernel(kernel, down, up, scale):
    """kernel + scale * down @ up, computed in float32 and cast back to the kernel's dtype (one small program per
    shape when called eagerly; inlined when traced)."""
    delta = kernel_delta(down, up, kernel.shape)
    return (kernel.astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * delta).astype(kernel.dtype)


def merge(params, factors, scale=1.0, on_kernel=None):
    """`params` with `scale * down @ up` added to each adapted kernel (`merged_kernel`). `scale`: one number
    (traced values too), or a dict Flax module path -> number. `on_kernel(kernel, merge_one)`, if given, returns
    the new kernel (e.g. for kernels replicated over devices). Returns new nested dicts; the leaves not adapted
    are the input's own arrays."""
    flat = flatten_dict(params)
    for path, pair in modules_of(factors).items():
        key = path + ("kernel",)
        if key not in flat:
            raise ValueError(f"LoRA for {'/'.join(path)}: the params have no such kernel")
        factor = scale[path] if isinstance(scale, dict) else scale

        def merge_one(kernel, pair=pair, factor=factor):
            return merged_kernel(kernel, pair["down"], pair["up"], factor)

        flat[key] = merge_one(flat[key]) if on_kernel is None else on_kernel(flat[key], merge_one)
    return unflatten_dict(flat)


def parameter_count(factors) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(factors)))
