from .pipeline_blip_diffusion import FlaxBlipDiffusionPipeline, FlaxBlipDiffusionPipelineOutput

__all__ = ["FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput"]
