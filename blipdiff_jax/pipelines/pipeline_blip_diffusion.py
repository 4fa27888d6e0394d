"""Zero-shot subject-driven generation: `FlaxBlipDiffusionPipeline`, a drop-in for diffusers'
`BlipDiffusionPipeline` (same arguments, defaults and meaning) that runs as one compiled program.

    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained("converted-dir")
    out = pipeline("swimming underwater", "dog.png", "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0))
    out.images[0].save("dog.png")
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from functools import partial

import diffusers
import jax
import jax.numpy as jnp
import numpy as np

from .. import compilation, components
from ..checkpoint import ConvertedModel, is_converted_directory, load_converted
from ..hub import is_hub_id, resolve_hub_model
from ..image_processing import numpy_to_pil, preprocess_reference
from ..lora_files import is_lora_directory
from ..models.attention import resolve_implementation
from ..models.context_clip import encode_contexts
from ..runtime import Runtime
from ..runtime.quiet import quiet_flax_notices
from . import placement
from .denoise import check_finite, decode_latents, denoise
from .editing import Editor
from .inputs import as_list as _as_list
from .inputs import as_prng_key, check_common
from .inputs import broadcast as _broadcast
from .outputs import FlaxBlipDiffusionPipelineOutput
from .progress import Progress
from .request import EditRequest, GenerationRequest, ProgramInputs

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def caller_stacklevel() -> int:
    """The `stacklevel` for `warnings.warn`, called by the function that calls this one, that points at the
    first line outside this package: the user's call, however deep inside the package the warning is made."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def scheduler_from_config(config: dict):
    """The diffusers Flax scheduler named by a PyTorch `scheduler_config.json` (`PNDMScheduler` -> `FlaxPNDMScheduler`)."""
    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name if name.startswith("Flax") else "Flax" + name, None)
    if cls is None:
        raise ValueError(f"scheduler: no Flax scheduler for {name!r}")
    with quiet_flax_notices():
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


# diffusers' Flax LMS step integrates its coefficients with scipy and grows its state every step: it
# cannot run inside a compiled loop.
UNSUPPORTED_SCHEDULERS = {"FlaxLMSDiscreteScheduler": "its step calls scipy.integrate and grows its state, so it cannot be traced"}


def check_scheduler(scheduler):
    reason = UNSUPPORTED_SCHEDULERS.get(type(scheduler).__name__)
    if type(scheduler).__name__ == "FlaxDDPMScheduler" and scheduler.config.variance_type in ("fixed_small", "fixed_small_log"):
        reason = (f"with variance_type={scheduler.config.variance_type!r} diffusers 0.39's Flax DDPM step calls "
                  "jnp.clip(a_min=...), which jax 0.10 removed; use variance_type='fixed_large'")
    if reason:
        raise ValueError(f"scheduler: {type(scheduler).__name__} is not supported ({reason}); use PNDM, DDIM, "
                         "DPM-Solver multistep, Euler or DDPM")


def _advise_memory_aware_scheduler(dtype) -> None:
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if low_precision and jax.default_backend() == "cpu" and not compilation.memory_aware_cpu_scheduler():
        warnings.warn(
            f"{jnp.dtype(dtype).name} params on CPU: XLA's default scheduler converts every weight to fp32 up front "
            f"(an fp32 model copy in memory); call blipdiff_jax.prefer_memory_on_cpu() before JAX starts, or set "
            f"XLA_FLAGS='{compilation.RECOMMENDED_XLA_FLAGS}'", stacklevel=caller_stacklevel())


class FlaxBlipDiffusionPipeline:
    """Subject-driven generation (`__call__`), subject embeddings (`encode_subject`) and editing (`edit`,
    `invert`, run by the `Editor` it holds). Each entry point checks its arguments on the host, then runs
    compiled programs built once per pipeline through its `Runtime` (blipdiff_jax.runtime)."""

    def __init__(self, model: ConvertedModel, *, dtype=jnp.float32, scheduler=None, attention: str = "auto",
                 cpu_rewrites: bool | None = None):
        self.dtype = dtype
        _advise_memory_aware_scheduler(dtype)
        # How the programs are compiled and traced on this backend, with the attention kernel every UNet/ControlNet
        # attention runs (blipdiff_jax.runtime); fixed at construction because the compiled programs bake it in.
        self.runtime = Runtime.for_backend(attention, cpu_rewrites)
        self.attention = self.runtime.attention
        self.configs = model.configs
        self.tokenizer = model.tokenizer
        self.qformer_tokenizer = model.qformer_tokenizer
        self.ctx_begin_pos = int(model.pipeline_config.get("ctx_begin_pos", 2))
        self.mean = model.pipeline_config.get("mean")
        self.std = model.pipeline_config.get("std")
        self.subject_embeddings = model.subject_embeddings
        self.qformer = components.build_model("qformer", model.configs["qformer"], dtype)
        self.text_encoder = components.build_model("text_encoder", model.configs["text_encoder"], dtype)
        self.unet = components.build_model("unet", model.configs["unet"], dtype)
        self.vae = components.build_model("vae", model.configs["vae"], dtype)
        self.scheduler = scheduler if scheduler is not None else scheduler_from_config(model.configs["scheduler"])
        check_scheduler(self.scheduler)
        qcfg = self.qformer.config
        self.num_query_tokens = qcfg.num_query_tokens
        self.reference_size = self._reference_size(model.configs.get("image_processor", {}), qcfg.vision_config.image_size)
        self.max_text_length = self.text_encoder.config.max_position_embeddings
        # Latent size as the PyTorch pipeline computes it (from the UNet), and what the Flax UNet can divide.
        self.latent_factor = 2 ** (len(self.unet.block_out_channels) - 1)
        self.size_multiple = self.latent_factor * 2 ** (len(self.unet.block_out_channels) - 1)
        jit = self.runtime.jit
        self._encode_subject = jit(self._encode_subject_fn)
        # One program per (shapes, steps, guidance on/off); `batch` leaves are split over devices by pmap.
        self._generate_jit = jit(self._generate, static_argnames=("num_inference_steps", "do_cfg", "progress"))
        self._generate_pmap = self.runtime.pmap(self._generate, in_axes=(0, 0, None, None, None, None, None),
                                                static_broadcasted_argnums=(4, 5, 6))
        # With a progress bar (one device or a mesh): the same generation as three programs without host
        # callbacks, so that JAX's persistent cache stores them: encoding, a chunk of denoising steps (run once
        # per step, the bar advancing in between), decoding.
        self._generate_start_jit = jit(self._generate_start, static_argnames=("num_inference_steps", "do_cfg"))
        self._generate_steps_jit = jit(self._generate_steps, static_argnames=("do_cfg",))
        self._generate_finish_jit = jit(self._generate_finish)
        self.progress = Progress(self.runtime)
        self.editor = Editor(self)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        from_pt: bool = False,
        dtype=jnp.float32,
        scheduler=None,
        qformer_tokenizer: str | None = None,
        attention: str = "auto",
        cpu_rewrites: bool | None = None,
        **kwargs,
    ):
        """Returns `(pipeline, params)`. `path`: a converted directory (`python -m convert`); with
        `from_pt=True` a diffusers-layout PyTorch directory converted on the fly (needs torch only for `.bin`);
        a LoRA fine-tuning output naming its base model (the base loaded, the adapter merged); or a Hub id
        such as "Salesforce/blipdiffusion", downloaded, converted once and cached.
        `attention`: "auto" (blockwise on CPU, cuDNN's fused kernel on GPU, `jax.nn.dot_product_attention`
        on TPU), "blockwise", "cudnn", "dot_product", or "xla" (diffusers' UNet untouched); on CPU every
        `cpu_rewrites`: on CPU, the layer rewrites of `blipdiff_jax.models.cpu_rewrites` and the decoder in
        strips (None: on unless BLIPDIFF_JAX_CPU_REWRITES=0; ignored elsewhere). See `blipdiff_jax.runtime`."""
        resolve_implementation(attention)  # a bad value fails before anything is loaded
        path = cls._resolve(path, qformer_tokenizer)
        if is_lora_directory(path):
            return cls._from_lora_directory(path, dtype=dtype, scheduler=scheduler, qformer_tokenizer=qformer_tokenizer,
                                            attention=attention, cpu_rewrites=cpu_rewrites, **kwargs)
        if from_pt and not is_converted_directory(path):
            from convert.pytorch_dir import read_pytorch_directory

            # Each tensor is cast and placed as soon as it is converted: no host copy of the whole state dict
            # next to the params.
            place = partial(components.cast_params, dtype=dtype)
            model = read_pytorch_directory(path, qformer_tokenizer=qformer_tokenizer, place=place, **kwargs)
        else:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"path: model directory {path!r} does not exist")
            if not is_converted_directory(path) and os.path.isfile(os.path.join(path, "unet", "config.json")):
                raise ValueError(f"path: {path!r} is a PyTorch (diffusers) directory; pass from_pt=True or convert it first")
            model = load_converted(path, dtype=dtype)
        return cls.from_converted(model, dtype=dtype, scheduler=scheduler, attention=attention, cpu_rewrites=cpu_rewrites)

    @staticmethod
    def _resolve(path, qformer_tokenizer=None) -> str:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path or a Hub id, not {type(path).__name__}")
        path = os.fspath(path)
        return resolve_hub_model(path, qformer_tokenizer=qformer_tokenizer) if is_hub_id(path) else path

    @classmethod
    def from_converted(cls, model: ConvertedModel, dtype=jnp.float32, scheduler=None, attention: str = "auto",
                       cpu_rewrites: bool | None = None):
        pipeline = cls(model, dtype=dtype, scheduler=scheduler, attention=attention, cpu_rewrites=cpu_rewrites)
        params = {name: components.cast_params(model.params[name], dtype) for name in ("qformer", "text_encoder", "unet", "vae")}
        params["scheduler"] = pipeline.scheduler.create_state()
        return pipeline, params

    @staticmethod
    def _reference_size(processor_config: dict, image_size: int) -> dict:
        size = processor_config.get("size") or {}
        if "height" in size and "width" in size:
            return {"height": size["height"], "width": size["width"]}
        return {"height": image_size, "width": image_size}

    # ------------------------------------------------------------------ subject embeddings

    def _encode_subject_fn(self, qformer_params, input_ids, attention_mask, pixel_values):
        with self.runtime.tracing():
            return self.qformer.apply({"params": qformer_params}, input_ids, attention_mask, pixel_values)

    def encode_subject(self, reference_image, source_subject_category, params, ratio=None):
        """Subject embeddings `(n, num_query_tokens, hidden)` from reference image(s) and category word(s).

        One image may serve several categories and one category several images. With `ratio` (LAVIS's
        multi-subject blend: one weight per image/category pair, summing to 1) the result is their
        weighted sum, shape `(1, num_query_tokens, hidden)`.
        """
        images = list(reference_image) if isinstance(reference_image, (list, tuple)) else [reference_image]
        if not images:
            raise ValueError("reference_image is an empty list")
        categories = _as_list(source_subject_category, "source_subject_category")
        count = max(len(images), len(categories))
        images = _broadcast(images, count, "reference_image")
        categories = _broadcast(categories, count, "source_subject_category")
        if ratio is not None:
            ratio = np.asarray(ratio, dtype=np.float64).reshape(-1)
            if ratio.shape[0] != count:
                raise ValueError(f"ratio has {ratio.shape[0]} weights for {count} subjects")
            if not np.all(np.isfinite(ratio)) or abs(ratio.sum() - 1.0) > 1e-6:
                raise ValueError(f"ratio must be finite weights that sum to 1, got {ratio.tolist()}")
        pixels = preprocess_reference(images, self.reference_size, self.mean, self.std)
        # Padded to a multiple of 8 so category words of similar length share one compiled program; the extra
        # positions are masked, which leaves the embeddings as diffusers' longest-padding gives them.
        tokens = self.qformer_tokenizer(categories, padding=True, pad_to_multiple_of=8, return_tensors="np")
        qformer_params = params["qformer"] if "qformer" in params else params
        embeddings = self._encode_subject(
            qformer_params, tokens.input_ids.astype(np.int32), tokens.attention_mask.astype(np.int32), jnp.asarray(pixels, self.dtype)
        )
        if not bool(jnp.all(jnp.isfinite(embeddings))):
            raise FloatingPointError("non-finite values in the subject encoder (Q-Former) output (check the qformer weights)")
        if ratio is not None:
            embeddings = jnp.tensordot(jnp.asarray(ratio, embeddings.dtype), embeddings, axes=1)[None]
        return embeddings

    def _given_embeddings(self, subject_embeddings, argname="subject_embeddings"):
        """Subject embeddings passed in (or the model's learned ones) as an array of the pipeline's dtype; NaN
        or inf in them is refused, as in latents."""
        embeddings = jnp.asarray(subject_embeddings, self.dtype)
        if not bool(jnp.all(jnp.isfinite(embeddings))):
            raise ValueError(f"{argname} hold NaN or inf")
        return embeddings

    # ------------------------------------------------------------------ text

    def build_prompts(self, prompts, target_subjects, prompt_strength=1.0, prompt_reps=20):
        """diffusers' prompt amplification: "a {target} {prompt}" repeated int(strength * reps) times."""
        return [
            ", ".join([f"a {target} {prompt.strip()}"] * int(prompt_strength * prompt_reps))
            for prompt, target in zip(prompts, target_subjects)
        ]

    def prepare_inputs(self, prompts: list[str], neg_prompts: list[str]):
        """Token ids: prompts padded/truncated to `77 - num_query_tokens`, negative prompts to 77."""
        budget = self.max_text_length - self.num_query_tokens
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=budget, return_tensors="np").input_ids
        uncond = self.tokenizer(
            neg_prompts, padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="np"
        ).input_ids
        return ids.astype(np.int32), uncond.astype(np.int32)

    def _over_budget(self, first_repetitions: list[str]) -> bool:
        """Warn about prompts whose first repetition alone exceeds the token budget; True if any does."""
        budget = self.max_text_length - self.num_query_tokens
        over = False
        for text in first_repetitions:
            if len(self.tokenizer(text[: 64 * budget]).input_ids) > budget:  # no token spans 64 characters
                over = True
                warnings.warn(
                    f"The prompt {text[:60]!r}... is longer than the {budget}-token budget "
                    f"(77 - {self.num_query_tokens} subject tokens) and is truncated",
                    stacklevel=caller_stacklevel(),
                )
        return over

    # ------------------------------------------------------------------ the compiled programs

    def _generate(self, params, batch, scalars, rng, num_inference_steps, do_cfg, progress=False):
        """The whole generation, traced as one program: text contexts, the denoising loop, the decoder
        (`ProgramInputs` describes batch and scalars). `progress`: the loop tells `self.progress` of each step."""
        with self.runtime.tracing(bf16_products=False):  # no attention control here: blocks traced once
            # bf16 on CPU: the text encoder's and the UNet's products on bf16 operands (models/bf16_matmul.py);
            # not the decoder's, whose compile would take 0.14 GiB more at 512².
            with self.runtime.tracing(repeated_blocks=False):
                context, latents, state = self._prepare(params, batch, num_inference_steps, do_cfg)
                result = self._denoise(params, batch, scalars, rng, context, latents, state, num_inference_steps, do_cfg,
                                       progress=self.progress.on_step if progress else None)
            images = self._decode(params, result.latents)
        return {"images": images, "context_finite": jnp.all(jnp.isfinite(context)),
                "first_nonfinite_step": result.first_nonfinite_step}

    def _prepare(self, params, batch, num_inference_steps, do_cfg):
        """The text contexts, the starting latents (scaled by the init noise sigma) and the scheduler state."""
        text_params = {"params": params["text_encoder"]}
        # (unconditional then) subject prompts, in one pass (see encode_contexts)
        context = encode_contexts(self.text_encoder, text_params, batch["uncond_ids"] if do_cfg else None,
                                  batch["prompt_ids"], batch["subject_embeds"], self.ctx_begin_pos)
        latents = batch["latents"]
        state = self.scheduler.set_timesteps(params["scheduler"], num_inference_steps=num_inference_steps, shape=latents.shape)
        return context, latents * state.init_noise_sigma, state

    def _denoise(self, params, batch, scalars, rng, context, latents, state, num_inference_steps, do_cfg, **kwargs):
        return denoise(
            unet=self.unet,
            unet_params=params["unet"],
            scheduler=self.scheduler,
            scheduler_state=state,
            latents=latents,
            context=context,
            guidance_scale=scalars["guidance_scale"],
            num_inference_steps=num_inference_steps,
            do_classifier_free_guidance=do_cfg,
            rng=rng,
            unet_residuals=self._unet_residuals(params, batch, scalars, context, do_cfg),
            attention=self.runtime.unet_interceptor,
            **kwargs,
        )

    def _decode(self, params, latents):
        return decode_latents(self.vae, params["vae"], latents, in_strips=self.runtime.decode_in_strips)

    def _unet_residuals(self, params, batch, scalars, context, do_cfg):
        """Extra UNet inputs per step; the zero-shot pipeline has none (ControlNet overrides this)."""
        return None

    # The generation in three programs (progress bar without host callbacks; see __init__).

    def _generate_start(self, params, batch, num_inference_steps, do_cfg):
        with self.runtime.tracing():
            context, latents, state = self._prepare(params, batch, num_inference_steps, do_cfg)
        return {"context": context, "latents": latents, "state": state, "first_nonfinite_step": jnp.array(-1, jnp.int32)}

    def _generate_steps(self, params, batch, scalars, rng, carry, start, stop, do_cfg):
        """Denoising steps start..stop-1 (traced: one program for every chunk) from `carry`."""
        with self.runtime.tracing():
            result = self._denoise(params, batch, scalars, rng, carry["context"], carry["latents"], carry["state"], stop,
                                   do_cfg, steps=(start, stop), first_nonfinite_step=carry["first_nonfinite_step"])
        return {**carry, "latents": result.latents, "state": result.scheduler_state,
                "first_nonfinite_step": result.first_nonfinite_step}

    def _generate_finish(self, params, carry):
        with self.runtime.tracing(bf16_products=False):
            images = self._decode(params, carry["latents"])
        return {"images": images, "context_finite": jnp.all(jnp.isfinite(carry["context"])),
                "first_nonfinite_step": carry["first_nonfinite_step"]}

    # ------------------------------------------------------------------ placing params

    def shard_params(self, params, mesh):
        """`params` replicated over `mesh` (a `jax.sharding.Mesh`), for `mesh=` calls. Place them once and pass
        the result to every call: a call that finds them placed transfers nothing (on a multi-host mesh,
        unplaced params go through the host at every call). Returned unchanged when already placed."""
        return placement.shard_params(params, mesh)

    def replicate(self, params):
        """`params` with one copy per local device, for `jit=True` (diffusers' pmap convention; the same as
        `flax.jax_utils.replicate`)."""
        return placement.replicate(params)

    # ------------------------------------------------------------------ LoRA (blipdiff_jax/lora_files.py)

    def load_lora(self, params, path, scale: float = 1.0):
        """New params with the LoRA at `path` merged into the UNet and text encoder kernels:
        `W + scale * alpha / rank * lora_B @ lora_A`. `path`: a `.safetensors` file (diffusers/peft or kohya names) or a
        directory holding `pytorch_lora_weights.safetensors` (a LoRA fine-tuning output: its learned subject
        embeddings become the pipeline's, so `reference_image=None` draws that subject). Calls stack; `params` is
        left as it is, so keeping it is the exact unload (`unload_lora` subtracts instead). The merged params have
        the same shapes and dtypes: the compiled programs are reused and run at the same speed. Bad files raise
        `LoraFileError` listing the keys, before anything is merged."""
        return self._merge_lora(params, path, scale, "load_lora")

    def unload_lora(self, params, path, scale: float = 1.0):
        """`params` with the LoRA at `path` (merged at `scale` by `load_lora`) subtracted again (exact up to
        float rounding; the base params themselves are the exact way back)."""
        return self._merge_lora(params, path, -scale if _is_number(scale) else scale, "unload_lora")

    def _merge_lora(self, params, path, scale, caller: str):
        from ..lora_files import read_lora
        from ..models.lora import merge

        if not _is_number(scale) or not math.isfinite(scale):
            raise TypeError(f"{caller}: scale must be a finite number, not {scale!r}")
        if not isinstance(params, dict) or not {"unet", "text_encoder"} <= set(params):
            raise ValueError(f"{caller}: params must be the pipeline's params (with 'unet' and 'text_encoder')")
        # Params replicated for jit=True: their kernels carry a leading device axis; only the adapted ones are
        # taken from device 0, merged and replicated again.
        replicated = placement.is_replicated(params)
        shapes = {name: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:] if replicated else np.shape(x), x.dtype),
                                               params[name]) for name in ("unet", "text_encoder")}
        lora = read_lora(path, shapes, components.NAMING_STYLE)
        on_kernel = (lambda kernel, merge_one: placement.replicate(merge_one(kernel[0]))) if replicated else None
        merged = dict(params)
        for name, factors in lora.factors.items():
            scales = {module: scale * s for module, s in lora.scales[name].items()}
            merged[name] = merge(params[name], factors, scales, on_kernel=on_kernel)
        if lora.subject_embeddings is not None and caller == "load_lora":
            self.subject_embeddings = np.asarray(lora.subject_embeddings, np.float32)
        return merged

    @classmethod
    def _from_lora_directory(cls, path: str, **kwargs):
        """A LoRA fine-tuning output: the base model its manifest names, loaded, with the adapter merged."""
        from ..lora_files import read_manifest

        base = read_manifest(path).get("base_model")
        if not base:
            raise ValueError(f"path: {path} is a LoRA adapter whose manifest names no base model; load the base with "
                             f"from_pretrained(BASE) and call pipeline.load_lora(params, {path!r})")
        kwargs["from_pt"] = os.path.isdir(base) and not is_converted_directory(base)
        pipeline, params = cls.from_pretrained(base, **kwargs)
        return pipeline, pipeline.load_lora(params, path)

    # ------------------------------------------------------------------ checks

    def _check_common(self, height, width, num_inference_steps, guidance_scale, output_type, scheduler=None):
        check_common(height, width, num_inference_steps, guidance_scale, output_type, self.size_multiple,
                     scheduler or self.scheduler)

    def _latents(self, latents, prng_seed, batch, height, width):
        """The starting noise (batch, channels, h, w): `latents` checked, or drawn from `prng_seed`."""
        shape = (batch, self.unet.in_channels, height // self.latent_factor, width // self.latent_factor)
        if latents is None:
            if prng_seed is None:
                raise ValueError("prng_seed: give a jax.random.key (or pass latents)")
            # Drawn in fp32 and cast, so that a seed gives the same picture in every dtype (as diffusers' Flax
            # pipelines do).
            return jax.random.normal(as_prng_key(prng_seed), shape, dtype=jnp.float32).astype(self.dtype)
        latents = jnp.asarray(latents)
        if latents.shape != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {shape} (batch, channels, height/{self.latent_factor}, width/{self.latent_factor})")
        if not bool(jnp.all(jnp.isfinite(latents))):
            raise ValueError("latents hold NaN or inf")
        return latents.astype(self.dtype)

    def _subject_embeddings(self, request: GenerationRequest, batch: int, params):
        """(batch, num_query_tokens, hidden): given, the model's learned ones, or encoded from the reference."""
        subject_embeddings = request.subject_embeddings
        if subject_embeddings is None and request.reference_image is None:
            if self.subject_embeddings is None:
                raise ValueError("reference_image: required (this model has no learned subject embeddings)")
            subject_embeddings = self._given_embeddings(self.subject_embeddings, "the model's learned subject_embeddings")
        elif subject_embeddings is not None:
            subject_embeddings = self._given_embeddings(subject_embeddings)
        if subject_embeddings is None:
            source = _as_list(request.source_subject_category, "source_subject_category")
            reference = request.reference_image
            images = list(reference) if isinstance(reference, (list, tuple)) else [reference]
            _broadcast(images, batch, "reference_image")
            _broadcast(source, batch, "source_subject_category")
            subject_embeddings = self.encode_subject(images, source, params)
        subject_embeddings = jnp.asarray(subject_embeddings, self.dtype)
        expected = (self.num_query_tokens, self.text_encoder.config.hidden_size)
        if subject_embeddings.ndim != 3 or subject_embeddings.shape[1:] != expected:
            raise ValueError(f"subject_embeddings has shape {tuple(subject_embeddings.shape)}, expected (n, {expected[0]}, {expected[1]})")
        if subject_embeddings.shape[0] not in (1, batch):
            raise ValueError(f"subject_embeddings holds {subject_embeddings.shape[0]} subjects for {batch} prompts")
        return jnp.broadcast_to(subject_embeddings, (batch,) + expected)

    def _extra_inputs(self, request: GenerationRequest, batch: int):
        """A mode's own (batch arrays, scalars), checked before anything compiles; none for zero-shot
        (ControlNet adds its control map)."""
        return {}, {}

    def _inputs(self, request: GenerationRequest) -> ProgramInputs:
        """Checks `request` and encodes it as the program's inputs (host side: tokens, subject embeddings, noise)."""
        if request.params is None:
            raise ValueError("params: pass the params returned by from_pretrained")
        prompts = _as_list(request.prompt, "prompt")
        batch = len(prompts)
        targets = _broadcast(_as_list(request.target_subject_category, "target_subject_category"), batch, "target_subject_category")
        neg_prompt = request.neg_prompt if request.neg_prompt is not None else ""
        neg_prompts = _broadcast(_as_list(neg_prompt, "neg_prompt"), batch, "neg_prompt")
        guidance_scale, prompt_strength, prompt_reps = request.guidance_scale, request.prompt_strength, request.prompt_reps
        self._check_common(request.height, request.width, request.num_inference_steps, guidance_scale, request.output_type)
        if isinstance(prompt_strength, bool) or not isinstance(prompt_strength, (int, float, np.integer, np.floating)):
            raise TypeError(f"prompt_strength must be a number, not {type(prompt_strength).__name__}")
        if not math.isfinite(prompt_strength) or prompt_strength < 0:
            raise ValueError(f"prompt_strength={prompt_strength} must be a finite number >= 0")
        if isinstance(prompt_reps, bool) or not isinstance(prompt_reps, (int, np.integer)):
            raise TypeError(f"prompt_reps must be an int, not {type(prompt_reps).__name__}")
        if prompt_reps < 0:
            raise ValueError(f"prompt_reps={prompt_reps} must be >= 0")
        if request.jit and request.mesh is not None:
            raise ValueError("jit and mesh: choose one multi-device path")
        devices = jax.local_device_count() if request.jit else (request.mesh.devices.size if request.mesh is not None else 1)
        if batch % devices:
            raise ValueError(f"prompt: {batch} prompts cannot be split evenly over {devices} devices")
        base_params = placement.unreplicated(request.params) if request.jit else request.params
        extra_batch, extra_scalars = self._extra_inputs(request, batch)

        prng_seed = as_prng_key(request.prng_seed) if request.prng_seed is not None else None
        subject_embeddings = self._subject_embeddings(request, batch, base_params)
        if self._over_budget([f"a {t} {p.strip()}" for p, t in zip(prompts, targets)]):
            prompt_reps, prompt_strength = 1, 1.0  # repeating cannot change what is kept: skip tokenizing copies
        prompt_ids, uncond_ids = self.prepare_inputs(self.build_prompts(prompts, targets, prompt_strength, prompt_reps), neg_prompts)
        batch_arrays = {
            "prompt_ids": prompt_ids,
            "uncond_ids": uncond_ids,
            "subject_embeds": subject_embeddings,
            "latents": self._latents(request.latents, prng_seed, batch, request.height, request.width),
            **extra_batch,
        }
        scalars = {"guidance_scale": jnp.asarray(guidance_scale, jnp.float32), **extra_scalars}
        rng = jax.random.PRNGKey(0) if prng_seed is None else prng_seed
        return ProgramInputs(batch_arrays, scalars, rng, int(request.num_inference_steps), guidance_scale > 1.0, devices)

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        prompt,
        reference_image,
        source_subject_category,
        target_subject_category,
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
        progress: bool = False,
    ):
        """Generate images of the reference subject. Arguments as diffusers' `BlipDiffusionPipeline.__call__`,
        plus `params`, `prng_seed`, `jit` (pmap over all devices, params replicated: diffusers' Flax
        convention, see `replicate`), `mesh` (a `jax.sharding.Mesh`: the batch is sharded over its first axis,
        the params replicated; place them once with `shard_params`), `subject_embeddings` (from
        `encode_subject`, instead of a reference image) and `progress` (a progress bar over the denoising
        steps)."""
        return self._run(GenerationRequest(
            prompt=prompt, reference_image=reference_image, source_subject_category=source_subject_category,
            target_subject_category=target_subject_category, params=params, prng_seed=prng_seed, latents=latents,
            guidance_scale=guidance_scale, height=height, width=width, num_inference_steps=num_inference_steps,
            neg_prompt=neg_prompt, prompt_strength=prompt_strength, prompt_reps=prompt_reps, output_type=output_type,
            jit=jit, subject_embeddings=subject_embeddings, mesh=mesh, progress=progress))

    def _run(self, request: GenerationRequest) -> FlaxBlipDiffusionPipelineOutput:
        """Checks and encodes `request`, then runs its compiled program: one program (`_generate_jit`), or
        pmapped (`jit=True`), or sharded over a mesh (params placed unless they already are), or, with a
        progress bar, as three programs without host callbacks (`_run_in_chunks`)."""
        inputs = self._inputs(request)
        params, batch, mesh, steps = request.params, inputs.batch, request.mesh, inputs.num_inference_steps
        with self.progress.showing(bool(request.progress), steps, "denoising"):
            if request.jit:
                result = self._generate_pmap(params, placement.split_over_devices(batch, inputs.devices), inputs.scalars,
                                             inputs.rng, steps, inputs.do_cfg, bool(request.progress))
                result["images"] = result["images"].reshape((-1,) + result["images"].shape[2:])
            else:
                if mesh is not None:
                    batch, params = placement.shard_batch(batch, mesh), placement.shard_params(params, mesh)
                if request.progress:
                    result = self._run_in_chunks(params, dataclasses.replace(inputs, batch=batch))
                else:
                    result = self._generate_jit(params, batch, inputs.scalars, inputs.rng, num_inference_steps=steps,
                                                do_cfg=inputs.do_cfg)
                if mesh is not None:
                    result = placement.gathered(result, mesh)
            result = jax.device_get(result)
            jax.effects_barrier()  # every progress callback has run
            images = np.asarray(result["images"], dtype=np.float32)
            check_finite(result, steps)
        return FlaxBlipDiffusionPipelineOutput(images=images if request.output_type == "np" else numpy_to_pil(images))

    def _run_in_chunks(self, params, inputs: ProgramInputs):
        """The generation with a progress bar: start, one step per call, decoding (see __init__)."""
        batch, scalars, rng, do_cfg = inputs.batch, inputs.scalars, inputs.rng, inputs.do_cfg
        carry = self._generate_start_jit(params, batch, num_inference_steps=inputs.num_inference_steps, do_cfg=do_cfg)
        steps, finish = self._generate_steps_jit, self._generate_finish_jit
        carry = self.progress.queued_steps(lambda c, i, j: steps(params, batch, scalars, rng, c, i, j, do_cfg=do_cfg),
                                           carry, inputs.num_inference_steps,
                                           before_clock=lambda c: finish.lower(params, c).compile())
        return finish(params, carry)

    # ------------------------------------------------------------------ editing (pipelines/editing.py)

    def control_pixels(self, height: int, width: int) -> int:
        """Spatial size of the lowest-resolution down block with cross-attention (LAVIS: 16x16 at 512x512)."""
        return self.editor.control_pixels(height, width)

    def invert(self, image, prompt, params=None, num_inference_steps: int = 50, height: int = 512, width: int = 512,
               progress: bool = False):
        """DDIM-invert a real image with `prompt` (no subject embeddings, guidance 1): latents (1, 4, h, w).
        `progress`: a progress bar over the inversion steps."""
        return self.editor.invert(image, prompt, params, num_inference_steps, height, width, progress)

    def edit(
        self,
        prompt,
        reference_image,
        source_subject_category,
        target_subject_category,
        original_subject,
        image=None,
        params=None,
        prng_seed=None,
        latents=None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        num_inversion_steps: int = 50,
        cross_replace_steps=0.8,
        self_replace_steps=0.4,
        lb_threshold: float = 0.3,
        neg_prompt: str = "",
        height: int = 512,
        width: int = 512,
        output_type: str = "pil",
        jit: bool = False,
        subject_embeddings=None,
        local_blend: bool = True,
        controller: str = "refine",
        equalizer: dict | None = None,
        progress: bool = False,
        placeholder_tokens: bool = True,
    ):
        """Edit `original_subject` into the reference subject. `image=None`: synthetic editing (both branches
        generated from the same noise); `image` given: real-image editing (DDIM inversion, then DDIM).
        `out.images` holds the source (generated or reconstructed) image, then the edited one.
        `local_blend=False` turns LocalBlend off (the edited branch is not masked). `controller`: "refine"
        (AttentionRefine, default) or "replace" (AttentionReplace: a same-length word swap); `equalizer`
        ({word: scale} in the edited prompt) adds AttentionReweight on top.
        `placeholder_tokens=True` (default) encodes the edited prompt as LAVIS does ("a" + "sks" x
        num_query_tokens + target + prompt, with the subject embeddings spliced after "a" as well) and computes
        the token mapper and word positions from the prompts as written, as LAVIS does; `False` encodes
        "a {target} {prompt}" with the embeddings spliced and aligns the mapper on that sequence (see
        `Editor.edit_tokens`)."""
        return self.editor.edit(EditRequest(
            prompt=prompt, reference_image=reference_image, source_subject_category=source_subject_category,
            target_subject_category=target_subject_category, original_subject=original_subject, image=image,
            params=params, prng_seed=prng_seed, latents=latents, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, num_inversion_steps=num_inversion_steps,
            cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, lb_threshold=lb_threshold,
            neg_prompt=neg_prompt, height=height, width=width, output_type=output_type, jit=jit,
            subject_embeddings=subject_embeddings, local_blend=local_blend, controller=controller, equalizer=equalizer,
            progress=progress, placeholder_tokens=placeholder_tokens))
