"""blipdiff-jax: BLIP-Diffusion (subject-driven generation and editing) in JAX/Flax."""

from ._quiet import silence_flax_deprecation
from .compilation import prefer_memory_on_cpu

silence_flax_deprecation()

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import blipdiff_jax` stays cheap and the CLI starts fast.
    if name in ("FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput", "FlaxBlipDiffusionControlNetPipeline"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(name)


__all__ = ["FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput", "FlaxBlipDiffusionControlNetPipeline", "__version__",
           "prefer_memory_on_cpu"]
