"""Gradient checkpointing of diffusers' Flax UNet blocks, which diffusers' Flax UNet does not offer itself.

`FlaxUNet2DConditionModel.setup` builds its blocks from the classes its module names (`FlaxDownBlock2D`, ...).
`remat_unet_blocks()` rebinds those names to their `nn.remat` versions while our training step is traced, so
each block's activations are recomputed in the backward pass instead of kept (the parameter tree is the
same), and binds the originals back on leaving. The code it relies on is pinned (runtime/pinned.py).
"""

from __future__ import annotations

import contextlib
import threading

import flax.linen as nn

# The UNet blocks wrapped in `nn.remat` (diffusers' PyTorch gradient checkpointing granularity).
UNET_BLOCKS = ("FlaxCrossAttnDownBlock2D", "FlaxDownBlock2D", "FlaxUNetMidBlock2DCrossAttn",
               "FlaxCrossAttnUpBlock2D", "FlaxUpBlock2D")
_lock = threading.RLock()  # one tracing at a time rebinds the names


@contextlib.contextmanager
def remat_unet_blocks():
    """While inside, UNets set up (inside `apply`, so while tracing) build `nn.remat` blocks."""
    from diffusers.models.unets import unet_2d_condition_flax as module

    with _lock:
        saved = {name: getattr(module, name) for name in UNET_BLOCKS}
        try:
            for name, cls in saved.items():
                setattr(module, name, nn.remat(cls))
            yield
        finally:
            for name, cls in saved.items():
                setattr(module, name, cls)
