"""ControlNet-guided generation and stylization: `FlaxBlipDiffusionControlNetPipeline`, a drop-in for
diffusers' `BlipDiffusionControlNetPipeline`. The same compiled program as zero-shot generation: the
ControlNet only adds UNet residuals through the shared denoising core's hook.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from .. import components
from ..checkpoint import is_converted_directory, load_converted
from ..image_processing import preprocess_conditioning
from ..lora_files import is_lora_directory
from ..models.attention import resolve_implementation
from .inputs import give, prompts
from .pipeline_blip_diffusion import FlaxBlipDiffusionPipeline
from .request import ControlNetRequest


_NO_CONTROLNET_EDITING = ("{}: ControlNet-guided editing is not supported; load the model with "
                          "FlaxBlipDiffusionPipeline.from_pretrained and call its {} (without the ControlNet)")


class FlaxBlipDiffusionControlNetPipeline(FlaxBlipDiffusionPipeline):
    def __init__(self, model, *, dtype=jnp.float32, scheduler=None, attention: str = "auto",
                 cpu_rewrites: bool | None = None):
        if "controlnet" not in model.params:
            raise ValueError("controlnet: this model has no controlnet/ component; pass controlnet=PATH "
                             "(an SD 1.5 ControlNet directory)")
        super().__init__(model, dtype=dtype, scheduler=scheduler, attention=attention, cpu_rewrites=cpu_rewrites)
        self.controlnet = components.build_model("controlnet", model.configs["controlnet"], dtype)

    @classmethod
    def from_pretrained(cls, path, from_pt: bool = False, dtype=jnp.float32, scheduler=None,
                        qformer_tokenizer=None, controlnet: str | None = None, attention: str = "auto",
                        cpu_rewrites: bool | None = None, **kwargs):
        """`path` with a `controlnet/` folder (like the Hub's `Salesforce/blipdiffusion-controlnet`), or a base
        model plus `controlnet=PATH`, any SD 1.5 ControlNet directory in diffusers' PyTorch layout."""
        resolve_implementation(attention)
        path = cls._resolve(path, qformer_tokenizer)
        if is_lora_directory(path):  # a LoRA fine-tuning output: its base model, the adapter merged
            return cls._from_lora_directory(path, dtype=dtype, scheduler=scheduler, qformer_tokenizer=qformer_tokenizer,
                                            controlnet=controlnet, attention=attention, cpu_rewrites=cpu_rewrites, **kwargs)
        if from_pt and not is_converted_directory(path):
            return super().from_pretrained(path, from_pt=True, dtype=dtype, scheduler=scheduler,
                                           qformer_tokenizer=qformer_tokenizer, controlnet=controlnet,
                                           attention=attention, cpu_rewrites=cpu_rewrites, **kwargs)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: model directory {path!r} does not exist")
        model = load_converted(os.fspath(path), dtype=dtype)
        if controlnet is not None:
            from convert.pytorch_dir import read_controlnet

            model.configs["controlnet"], model.params["controlnet"] = read_controlnet(controlnet)
        return cls.from_converted(model, dtype=dtype, scheduler=scheduler, attention=attention, cpu_rewrites=cpu_rewrites)

    @classmethod
    def from_converted(cls, model, dtype=jnp.float32, scheduler=None, attention: str = "auto",
                       cpu_rewrites: bool | None = None):
        pipeline, params = super().from_converted(model, dtype=dtype, scheduler=scheduler, attention=attention,
                                                  cpu_rewrites=cpu_rewrites)
        params["controlnet"] = components.cast_params(model.params["controlnet"], dtype)
        return pipeline, params

    def edit(self, *args, **kwargs):
        """Not supported: ControlNet-guided editing. Edit with `FlaxBlipDiffusionPipeline` (the same model
        directory loads there; its ControlNet is not used)."""
        raise NotImplementedError(_NO_CONTROLNET_EDITING.format("edit", "edit"))

    def invert(self, *args, **kwargs):
        """Not supported here (see `edit`); `FlaxBlipDiffusionPipeline.invert` inverts without a ControlNet."""
        raise NotImplementedError(_NO_CONTROLNET_EDITING.format("invert", "invert"))

    def _unet_residuals(self, params, batch, scalars, context, do_cfg):
        control = batch["control_image"].astype(self.dtype)
        if do_cfg:
            control = jnp.concatenate([control, control])
        controlnet_params = {"params": params["controlnet"]}

        def residuals(latent_input, timestep, step):
            down, mid = self.controlnet.apply(controlnet_params, latent_input, timestep, context, control,
                                              conditioning_scale=scalars["control_scale"], return_dict=False)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return residuals

    def __call__(
        self,
        prompt,
        reference_image,
        conditioning_image=None,
        source_subject_category=None,
        target_subject_category=None,
        params=None,
        prng_seed=None,
        latents=None,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        neg_prompt: str = "",
        prompt_strength: float = 1.0,
        prompt_reps: int = 20,
        output_type: str = "pil",
        jit: bool = False,
        subject_embeddings=None,
        mesh=None,
        controlnet_conditioning_scale: float = 1.0,
        condtioning_image=None,
        progress: bool = False,
    ):
        """As `FlaxBlipDiffusionPipeline.__call__`, plus `conditioning_image` (one map for the batch or one per
        prompt; diffusers' spelling `condtioning_image` is accepted too) and `controlnet_conditioning_scale`."""
        if condtioning_image is not None:
            if conditioning_image is not None:
                raise ValueError("conditioning_image: given twice (also as condtioning_image)")
            conditioning_image = condtioning_image
        if conditioning_image is None:
            raise ValueError("conditioning_image: required (a ControlNet map such as a canny edge image)")
        scale = controlnet_conditioning_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or not math.isfinite(scale):
            raise ValueError(f"controlnet_conditioning_scale must be a finite number, got {scale!r}")
        return self._run(ControlNetRequest(
            prompt=prompt, reference_image=reference_image, source_subject_category=source_subject_category,
            target_subject_category=target_subject_category, params=params, prng_seed=prng_seed, latents=latents,
            guidance_scale=guidance_scale, height=height, width=width, num_inference_steps=num_inference_steps,
            neg_prompt=neg_prompt, prompt_strength=prompt_strength, prompt_reps=prompt_reps, output_type=output_type,
            jit=jit, subject_embeddings=subject_embeddings, mesh=mesh, progress=progress,
            conditioning_image=conditioning_image, controlnet_conditioning_scale=scale))

    def _extra_inputs(self, request: ControlNetRequest, batch: int):
        """The control map(s), preprocessed and broadcast to the batch, and the conditioning scale."""
        image = request.conditioning_image
        maps = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(maps) not in (1, batch):
            raise ValueError(f"conditioning_image has {len(maps)} images for {prompts(batch)} ({give(batch)})")
        control = preprocess_conditioning(maps, request.height, request.width)
        control = np.broadcast_to(control, (batch,) + control.shape[1:])
        return {"control_image": control}, {"control_scale": jnp.asarray(request.controlnet_conditioning_scale, jnp.float32)}
