"""blipdiff-jax: BLIP-Diffusion (subject-driven generation and editing) in JAX/Flax."""

from .compilation import prefer_memory_on_cpu
from .host_memory import tune_host_memory

__version__ = "0.1.0"

import os as _os

# The toy model pre-trained on the toy world (`blipdiff_jax.toyworld`), shipped with the package:
# `FlaxBlipDiffusionPipeline.from_pretrained(TOY_MODEL)`. Made by `blipdiff-jax pretrain --toy`.
TOY_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets", "toy-model")
# Its classifier-free guidance scale: the best of those measured (benchmarks/results-toy.md).
TOY_GUIDANCE = 3.0


def __getattr__(name):
    # Lazy, so `import blipdiff_jax` stays cheap and the CLI starts fast.
    if name in ("FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput", "FlaxBlipDiffusionControlNetPipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(name)


__all__ = ["TOY_MODEL", "TOY_GUIDANCE", "FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput", "FlaxBlipDiffusionControlNetPipeline", "__version__",
           "prefer_memory_on_cpu", "tune_host_memory"]
