"""The one denoising core every mode shares: UNet + guidance + scheduler step inside `lax.fori_loop`.

Modes differ only in what they feed it: extra UNet residuals (ControlNet), a latents hook, a scheduler.
Everything here is traced once per shape; nothing is Python state.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..models.attention import intercept_attention
from ..models.vae_decode import decode_in_strips
from .attention_control import CONTROL_COLLECTION


def _accepts_key(scheduler) -> bool:
    return "key" in inspect.signature(scheduler.step).parameters


def denoise(
    *,
    unet,
    unet_params,
    scheduler,
    scheduler_state,
    latents,
    context,
    guidance_scale,
    num_inference_steps: int,
    do_classifier_free_guidance: bool,
    rng=None,
    unet_residuals: Callable | None = None,
    attention_control: Callable | None = None,
    attention: Callable | None = None,
    combine_guidance: Callable | None = None,
    after_step: Callable | None = None,
    aux=None,
    progress: Callable | None = None,
    steps=None,
    first_nonfinite_step=None,
):
    """Run the reverse diffusion from `latents` (B, C, h, w), already scaled by the init noise sigma.

    context: (2B, L, D) as [unconditional; conditional] when guiding, else (B, L, D).
    unet_residuals(latent_input, timestep, step) -> dict of extra UNet kwargs (ControlNet residuals).
    attention_control(step) -> a `flax.linen.intercept_methods` interceptor for the UNet's attentions; the
        collections it sows are handed to `after_step`.
    attention: the interceptor the UNet's and ControlNet's layers run (`Runtime.unet_interceptor`: the
        attention kernel and, on CPU, the layer rewrites); attention layers the controller leaves alone fall
        through to it.
    combine_guidance(uncond, cond, guidance_scale) -> noise, replacing plain classifier-free guidance.
    after_step(latents, aux, collections, step) -> (latents, aux): a latents hook (LocalBlend), with a carry.
    progress(step): a host function told of each finished step (`jax.debug.callback`, unordered, so the
        loop is not serialised on it), and with step -1 that the program has started running. A program with
        it cannot be stored in JAX's persistent cache: `steps` is the other way to show progress.
    steps: (start, stop), traced or not: run only those steps, continuing from an earlier call's
        `Denoised` (its latents, scheduler_state, aux and first_nonfinite_step passed back in), so that the
        host can run the loop in chunks with one compiled program.
    Returns `Denoised(latents, aux, first_nonfinite_step, scheduler_state)`: the step at which the latents
    first held NaN or inf (-1 when none did), so a broken model is reported instead of decoding to a black
    image.
    """
    stochastic = _accepts_key(scheduler)
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def predict(latent_input, timestep, step):
        variables = {"params": unet_params}
        # flax runs the outermost interceptor first: the controller takes the layers it controls and hands
        # the rest on to the attention kernel.
        with intercept_attention(attention):
            extra = unet_residuals(latent_input, timestep, step) if unet_residuals is not None else {}
            if attention_control is None:
                return unet.apply(variables, latent_input, timestep, context, **extra).sample, {}
        with nn.intercept_methods(attention_control(step)), intercept_attention(attention):
            out, collections = unet.apply(variables, latent_input, timestep, context, mutable=[CONTROL_COLLECTION], **extra)
        return out.sample, collections

    def body(step, carry):
        latents, state, aux, bad_step = carry
        t = state.timesteps[step]
        latent_input = jnp.concatenate([latents, latents]) if do_classifier_free_guidance else latents
        latent_input = scheduler.scale_model_input(state, latent_input, t)
        timestep = jnp.broadcast_to(t, (latent_input.shape[0],)).astype(jnp.int32)
        noise, collections = predict(latent_input, timestep, step)
        if do_classifier_free_guidance:
            uncond, cond = jnp.split(noise, 2)
            combine = combine_guidance or (lambda u, c, g: u + g * (c - u))
            noise = combine(uncond, cond, guidance_scale)
        kwargs = {"key": jax.random.fold_in(rng, step)} if stochastic else {}
        latents, state = scheduler.step(state, noise.astype(latents.dtype), t, latents, **kwargs).to_tuple()
        if after_step is not None:
            latents, aux = after_step(latents, aux, collections, step)
        if progress is not None:
            jax.debug.callback(progress, step)
        bad_step = jnp.where((bad_step < 0) & ~jnp.all(jnp.isfinite(latents)), step, bad_step)
        return latents, state, aux, bad_step

    bad_step = jnp.array(-1, jnp.int32) if first_nonfinite_step is None else first_nonfinite_step
    if progress is not None:
        bad_step = started(progress, bad_step)  # before the first step: the loop's carry starts from it
    carry = (latents, scheduler_state, aux, bad_step)
    start, stop = (0, num_inference_steps) if steps is None else steps
    latents, state, aux, bad_step = lax.fori_loop(start, stop, body, carry)
    return Denoised(latents, aux, bad_step, state)


def started(progress, value):
    """`value` (an int32 scalar) passed through a host call that tells `progress(-1)`: the program has started
    running (compiling is over). What consumes the result runs after that call."""

    def tell(value):
        progress(-1)
        return np.asarray(value, np.int32)

    return jax.pure_callback(tell, jax.ShapeDtypeStruct((), jnp.int32), value)


class Denoised(NamedTuple):
    latents: jax.Array
    aux: object
    first_nonfinite_step: jax.Array
    scheduler_state: object = None


def check_finite(result: dict, num_steps: int) -> None:
    """Raise `FloatingPointError` naming the component (and step) whose output held NaN or inf.
    `result`: a compiled program's host output with images, context_finite and first_nonfinite_step."""
    if not bool(np.all(result["context_finite"])):
        raise FloatingPointError("non-finite values in the text encoder output (check the text encoder weights)")
    steps = np.asarray(result["first_nonfinite_step"]).reshape(-1)
    bad = steps[steps >= 0]
    if bad.size:
        raise FloatingPointError(
            f"non-finite latents after denoising step {int(bad.min()) + 1} of {num_steps} (UNet or scheduler output; "
            f"with bf16/fp16 weights try float32)"
        )
    if not bool(np.all(np.isfinite(np.asarray(result["images"])))):
        raise FloatingPointError("non-finite values in the VAE decoder output")


def decode_latents(vae, vae_params, latents, in_strips: bool):
    """VAE latents (B, C, h, w) -> images (B, H, W, 3) in [0, 1].

    in_strips: run the full-resolution layers in row strips (`models/vae_decode.py`: the same image with
    40% of the temporaries); `Runtime.decode_in_strips` says when (a CPU rewrite: there the decoder set the
    peak memory of a generation)."""
    latents = latents / vae.config.scaling_factor
    if in_strips:
        image = decode_in_strips(vae, vae_params, latents)
    else:
        image = vae.apply({"params": vae_params}, latents, method=vae.decode).sample.transpose(0, 2, 3, 1)
    return jnp.clip(image / 2 + 0.5, 0, 1)
