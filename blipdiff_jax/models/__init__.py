"""What BLIP-Diffusion adds to Stable Diffusion: the subject encoder and the context CLIP text encoder."""

from .context_clip import FlaxContextCLIPTextModel, splice_subject_embeddings
from .subject_encoder import FlaxBlip2QFormerModel, FlaxBlip2VisionModel

__all__ = [
    "FlaxBlip2QFormerModel",
    "FlaxBlip2VisionModel",
    "FlaxContextCLIPTextModel",
    "splice_subject_embeddings",
]
