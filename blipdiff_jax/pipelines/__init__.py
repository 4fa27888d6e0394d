from .outputs import FlaxBlipDiffusionPipelineOutput
from .pipeline_blip_diffusion import FlaxBlipDiffusionPipeline
from .pipeline_blip_diffusion_controlnet import FlaxBlipDiffusionControlNetPipeline

__all__ = ["FlaxBlipDiffusionPipeline", "FlaxBlipDiffusionPipelineOutput", "FlaxBlipDiffusionControlNetPipeline"]
