"""The arguments of one call, as one value: what a pipeline's `__call__` or `edit` was given (a request), and what
its compiled program takes once the request is checked and encoded (`ProgramInputs`). Frozen, so nothing on
the way to the program changes what the caller asked for."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """`FlaxBlipDiffusionPipeline.__call__`'s arguments, as given (see its docstring for each)."""

    prompt: object
    reference_image: object
    source_subject_category: object
    target_subject_category: object
    params: object
    prng_seed: object
    latents: object
    guidance_scale: float
    height: int
    width: int
    num_inference_steps: int
    neg_prompt: object
    prompt_strength: float
    prompt_reps: int
    output_type: str
    jit: bool
    subject_embeddings: object
    mesh: object
    progress: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlNetRequest(GenerationRequest):
    """`FlaxBlipDiffusionControlNetPipeline.__call__`'s arguments: a generation request plus the control map."""

    conditioning_image: object
    controlnet_conditioning_scale: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditRequest:
    """`FlaxBlipDiffusionPipeline.edit`'s arguments, as given (see its docstring for each)."""

    prompt: object
    reference_image: object
    source_subject_category: object
    target_subject_category: object
    original_subject: object
    image: object
    params: object
    prng_seed: object
    latents: object
    guidance_scale: float
    num_inference_steps: int
    num_inversion_steps: int
    cross_replace_steps: object
    self_replace_steps: object
    lb_threshold: float
    neg_prompt: object
    height: int
    width: int
    output_type: str
    jit: bool
    subject_embeddings: object
    local_blend: bool
    controller: str
    equalizer: object
    progress: bool
    placeholder_tokens: bool


@dataclasses.dataclass(frozen=True)
class ProgramInputs:
    """A checked request as the generation program takes it. batch: per-example arrays (split over devices):
    prompt_ids, uncond_ids, subject_embeds, latents and, for ControlNet, control_image (B, 3, H, W). scalars:
    guidance_scale (and control_scale). devices: how many devices the batch is split over."""

    batch: dict
    scalars: dict
    rng: object
    num_inference_steps: int
    do_cfg: bool
    devices: int
