"""The fine-tuning loss of LAVIS's `BlipDiffusion.forward`, as pure JAX functions.

    latents = VAE(target).latent_dist.sample() * scaling_factor
    noisy   = DDPM.add_noise(latents, noise, t)           t ~ U[0, num_train_timesteps), noise ~ N(0, 1)
    context = ContextCLIP("a {subject}", subject embeddings at ctx_begin_pos)
    loss    = mean((UNet(noisy, t, context) - noise) ** 2)

`DiffusionLoss.__call__` takes latents, noise and timesteps explicitly (what the parity test feeds to
both sides); `sample_inputs` draws them from one key inside the compiled step.
"""

from __future__ import annotations

import contextlib
import inspect

import jax
import jax.numpy as jnp

from .. import components
from ..runtime import Runtime
from ..runtime.quiet import quiet_flax_notices
from ..runtime.remat import remat_unet_blocks


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddpm_scheduler(config: dict, dtype=jnp.float32):
    """The training noise schedule: a diffusers `FlaxDDPMScheduler` from the checkpoint's scheduler config
    (LAVIS: `DDPMScheduler.from_config(<sd>/scheduler)`; the PNDM-only keys are dropped)."""
    from diffusers import FlaxDDPMScheduler

    accepted = set(inspect.signature(FlaxDDPMScheduler.__init__).parameters) - {"self", "dtype"}
    with quiet_flax_notices():
        return FlaxDDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted}, dtype=dtype)


class DiffusionLoss:
    """Pure loss over `trainable` = {"unet", "subject_embeddings", ["text_encoder"]} and `frozen` = {"vae",
    ["text_encoder"]}. Modules compute in `compute_dtype` (fp32 master weights are cast by Flax inside).
    `runtime`: how its step is compiled and traced (blipdiff_jax.runtime): blockwise attention on CPU keeps no
    (queries x keys) activations."""

    def __init__(self, configs: dict, ctx_begin_pos: int, compute_dtype=jnp.float32, remat: bool = False,
                 attention: str = "auto", cpu_rewrites: bool | None = None):
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.loss_dtype = jnp.promote_types(self.compute_dtype, jnp.float32)  # noise, schedule and loss: >= fp32
        self.unet = components.build_model("unet", configs["unet"], self.compute_dtype)
        self.text_encoder = components.build_model("text_encoder", configs["text_encoder"], self.compute_dtype)
        self.vae = components.build_model("vae", configs["vae"], self.compute_dtype)
        self.scheduler = ddpm_scheduler(configs["scheduler"], self.loss_dtype)
        self.scheduler_state = self.scheduler.create_state()
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type={self.prediction_type!r}: choose one of {PREDICTION_TYPES}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.ctx_begin_pos = int(ctx_begin_pos)
        self.remat = bool(remat)
        self.runtime = Runtime.for_backend(attention, cpu_rewrites)

    def _unet(self, params, noisy, timesteps, context):
        def apply(params, noisy, timesteps, context):
            return self.unet.apply({"params": params}, noisy, timesteps, context).sample

        with self.runtime.unet_layers(), remat_unet_blocks() if self.remat else contextlib.nullcontext():
            return apply(params, noisy, timesteps, context)

    def text_embeddings(self, text_params, input_ids, subject_embeddings, batch: int):
        ids = jnp.broadcast_to(input_ids, (batch, input_ids.shape[-1]))
        ctx = jnp.broadcast_to(subject_embeddings, (batch,) + subject_embeddings.shape[1:])
        positions = jnp.full((batch,), self.ctx_begin_pos, jnp.int32)
        return self.text_encoder.apply({"params": text_params}, ids, ctx.astype(self.compute_dtype), positions)[0]

    def __call__(self, trainable, frozen, latents, noise, timesteps, input_ids):
        """latents, noise: (B, C, h, w); timesteps: (B,) ints; input_ids: (1 or B, L) caption tokens (not padded)."""
        batch = latents.shape[0]
        text_params = trainable["text_encoder"] if "text_encoder" in trainable else frozen["text_encoder"]
        noise = noise.astype(self.loss_dtype)
        noisy = self.scheduler.add_noise(self.scheduler_state, latents.astype(self.loss_dtype), noise, timesteps)
        context = self.text_embeddings(text_params, input_ids, trainable["subject_embeddings"], batch)
        prediction = self._unet(trainable["unet"], noisy.astype(self.compute_dtype), timesteps, context)
        return jnp.mean((prediction.astype(self.loss_dtype) - self.target(latents, noise, timesteps)) ** 2)

    def target(self, latents, noise, timesteps):
        """What the UNet learns to predict, by the scheduler's `prediction_type` (diffusers' training scripts'
        rule): the noise (LAVIS, Stable Diffusion 1.5), the velocity, or the clean latents."""
        if self.prediction_type == "epsilon":
            return noise
        latents = latents.astype(self.loss_dtype)
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(self.scheduler_state, latents, noise, timesteps)
        return latents

    def latents(self, vae_params, pixels, key):
        """VAE posterior sample (LAVIS: `latent_dist.sample()`) of (B, 3, H, W) pixels in [-1, 1], times the
        scaling factor, as (B, C, H/f, W/f) in the loss dtype (float32)."""
        posterior = self.vae.apply({"params": vae_params}, pixels.astype(self.compute_dtype), method=self.vae.encode).latent_dist
        mean, std = posterior.mean.astype(self.loss_dtype), posterior.std.astype(self.loss_dtype)
        sample = mean + std * jax.random.normal(key, mean.shape, self.loss_dtype)
        return jax.lax.stop_gradient(jnp.transpose(sample, (0, 3, 1, 2)) * self.scaling_factor)

    def sample_inputs(self, vae_params, pixels, key):
        """(latents, noise, timesteps) of one training step, all drawn from `key`."""
        vae_key, noise_key, t_key = jax.random.split(key, 3)
        latents = self.latents(vae_params, pixels, vae_key)
        noise = jax.random.normal(noise_key, latents.shape, self.loss_dtype)
        timesteps = jax.random.randint(t_key, (latents.shape[0],), 0, self.num_train_timesteps)
        return latents, noise, timesteps
