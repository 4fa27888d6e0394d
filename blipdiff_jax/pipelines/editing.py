"""Subject-driven editing (LAVIS `generate_then_edit`, `edit`, `_ddim_inverse`) on the shared denoising core.

Synthetic editing: a source branch "a {original_subject} {prompt}" and an edited branch
"a <subject embeddings> sks ... sks {target_subject_category} {prompt}" (LAVIS's text: "sks" once per query
token, the embeddings spliced after "a" on top; `placeholder_tokens=False` drops the "sks" words and aligns
the token mapper on the spliced sequence) start from the same noise; prompt-to-prompt
control (attention_control.py) keeps the edited image's layout, LocalBlend keeps everything outside the
subject. Real-image editing: the image is VAE-encoded (posterior mean; LAVIS samples it unseeded, so its
runs are not reproducible), DDIM-inverted with the source prompt at guidance 1, then edited with DDIM; the
source branch follows its unguided conditional noise so that it reconstructs the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from diffusers import FlaxDDIMScheduler
from jax import lax
from PIL import Image

from ..image_processing import load_image, numpy_to_pil
from ..models.context_clip import encode_contexts
from ..runtime.quiet import quiet_flax_notices
from .attention_control import (
    PLACEHOLDER,
    EditStatic,
    collected_blend_map,
    lavis_word_positions,
    local_blend,
    make_interceptor,
    refinement_mapper,
    replacement_mapper,
    schedule_arrays,
)
from .denoise import check_finite, denoise
from .inputs import as_list, as_prng_key, check_common, check_steps
from .outputs import FlaxBlipDiffusionPipelineOutput
from .request import EditRequest

# LAVIS builds its DDIM scheduler (inversion, real-image edits) from Stable Diffusion 1.5's scheduler config.
# The noise schedule's keys are taken from the model's own scheduler (the same values for Stable Diffusion
# 1.5; a model trained on another schedule, as the toy model, is inverted and edited on the one it learned).
NOISE_SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas", "prediction_type")
LAVIS_DDIM_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}


def edit_ddim_config(scheduler_config) -> dict:
    """The DDIM config of inversion and real-image edits: LAVIS's, on the noise schedule of the model's own
    scheduler (`scheduler_config`)."""
    own = {k: scheduler_config[k] for k in NOISE_SCHEDULE_KEYS if scheduler_config.get(k) is not None}
    return {**LAVIS_DDIM_CONFIG, **own}


def _single(value, argname):
    values = as_list(value, argname)
    if len(values) != 1:
        raise ValueError(f"{argname}: editing takes one prompt at a time, got {len(values)}")
    return values[0]


def _fraction(value, argname):
    pair = value if isinstance(value, (tuple, list)) else (0.0, value)
    try:
        pair = tuple(float(v) for v in pair)
    except (TypeError, ValueError):
        raise TypeError(f"{argname} must be a fraction or a (start, end) pair, not {value!r}") from None
    if len(pair) != 2 or not all(0.0 <= v <= 1.0 for v in pair) or pair[0] > pair[1]:
        raise ValueError(f"{argname}={value!r}: fractions must lie in [0, 1] with start <= end")
    return pair


def prepare_real_image(image, height: int, width: int, argname: str = "image") -> np.ndarray:
    """Resize the short side (bicubic) and center-crop to height x width; (1, 3, H, W) in [-1, 1]."""
    image = load_image(image, argname)
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return array.transpose(2, 0, 1)[None]


class Editor:
    """`edit` and `invert` for the `FlaxBlipDiffusionPipeline` that holds it (`pipeline.editor`).

    It runs the pipeline's own parts, so that an edit encodes, denoises and decodes as generation does: the
    models (`text_encoder`, `unet`, `vae`), `tokenizer` and text geometry (`max_text_length`, `num_query_tokens`,
    `ctx_begin_pos`), `scheduler`, `runtime`, `progress`, `dtype`, `latent_factor`, `size_multiple`, and
    `encode_subject`, `_given_embeddings`, `_latents` (the starting noise), `_decode`. Its own state: LAVIS's
    DDIM scheduler and its compiled programs, both made on first use."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._lavis_ddim = None
        self._programs = {}

    # ---------------------------------------------------------------- host-side preparation

    def _edit_ddim(self):
        if self._lavis_ddim is None:
            with quiet_flax_notices():
                self._lavis_ddim = FlaxDDIMScheduler.from_config(edit_ddim_config(self.pipeline.scheduler.config))
        return self._lavis_ddim

    def control_pixels(self, height: int, width: int) -> int:
        """Spatial size of the lowest-resolution down block with cross-attention (LAVIS: 16x16 at 512x512)."""
        levels = [i for i, kind in enumerate(self.pipeline.unet.down_block_types) if "CrossAttn" in kind]
        if not levels:
            raise ValueError("this UNet has no cross-attention: editing needs it")
        step, factor = 2 ** levels[-1], self.pipeline.latent_factor
        return (height // factor // step) * (width // factor // step)

    def _word_positions(self, ids: list[int], word: str, argname: str) -> np.ndarray:
        """0/1 over 77 positions: every occurrence of `word`'s tokens in `ids`."""
        pipeline = self.pipeline
        tokens = pipeline.tokenizer(word, add_special_tokens=False).input_ids
        if not tokens:
            raise ValueError(f"{argname}: {word!r} tokenizes to nothing")
        found = np.zeros(pipeline.max_text_length, np.float32)
        for start in range(1, len(ids) - len(tokens) + 1):
            if ids[start:start + len(tokens)] == tokens:
                found[start:start + len(tokens)] = 1.0
        return found

    def edit_tokens(self, prompt, original_subject, target_subject, controller="refine", equalizer=None,
                     placeholder_tokens=True):
        """Token ids of both branches, the token mapper, LocalBlend's words and the reweighting equalizer.

        `placeholder_tokens=True` (default) is LAVIS's `_build_prompts_edit`: the edited branch reads
        "a {"sks" x num_query_tokens} {target} {prompt}", tokenized with the query budget, and the subject
        embeddings are spliced at ctx_begin_pos on top (so the encoder sees the embeddings, then the "sks"
        tokens). The mapper, the equalizer's and LocalBlend's word positions come from the tokens of the two
        prompts as written (LAVIS's ptp_utils), which hold the "sks" tokens but not the spliced embeddings.
        `False`: the edited branch reads "a {target} {prompt}" with the embeddings spliced, and the mapper is
        aligned on the sequence the encoder sees (placeholders at the embeddings' positions)."""
        pipeline, tokenizer = self.pipeline, self.pipeline.tokenizer
        full, nq, pos = pipeline.max_text_length, pipeline.num_query_tokens, pipeline.ctx_begin_pos
        budget = full - nq
        tokenize = lambda text, n: tokenizer(text, truncation=True, max_length=n).input_ids  # noqa: E731
        if placeholder_tokens:
            placeholder = " ".join(["sks"] * nq)
            source = f"a {original_subject} {prompt}"
            target = f"a {placeholder} {target_subject} {prompt}"
            source_ids, target_ids = tokenize(source, full), tokenize(target, budget)
            written = tokenize(target, full)  # LAVIS's mapper reads the edited prompt untruncated (<= 77)
            lead = 1 + len(tokenizer("a", add_special_tokens=False).input_ids)
            held = range(lead, min(lead + len(tokenizer(placeholder, add_special_tokens=False).input_ids), len(written)))
            # AttentionReplace (no LAVIS counterpart here: ptp_utils refuses prompts of different word counts)
            # pairs the source's tokens with the edited prompt's other tokens; the "sks" positions keep their maps.
            for_replace = [PLACEHOLDER if j in held else t for j, t in enumerate(written)]

            def words(text, ids, word, argname):
                found = np.zeros(full, np.float32)
                found[lavis_word_positions(text, word, tokenizer, full)] = 1.0
                # A word LAVIS's whole-word rule cannot find (several words, glued to punctuation): its tokens.
                return found if found.any() else self._word_positions(ids, word, argname)
        else:
            source = f"a {original_subject} {prompt.strip()}"
            target = f"a {target_subject} {prompt.strip()}"
            source_ids, target_ids = tokenize(source, full), tokenize(target, budget)
            # The edited branch's sequence as the text encoder sees it: subject embeddings spliced at ctx_begin_pos.
            written = for_replace = target_ids[:pos] + [PLACEHOLDER] * nq + target_ids[pos:]

            def words(text, ids, word, argname):
                return self._word_positions(ids, word, argname)
        if controller == "refine":
            mapper, alphas = refinement_mapper(source_ids, written, full)
        elif controller == "replace":
            mapper, alphas = replacement_mapper(source_ids, for_replace, full)
        else:
            raise ValueError(f"controller={controller!r} is not one of 'refine', 'replace'")
        blend_words = words(source, source_ids, original_subject, "original_subject")
        if not blend_words.any():
            raise ValueError(f"original_subject={original_subject!r} does not occur in the tokens of {source!r}")
        scales = None
        if equalizer is not None:
            if not isinstance(equalizer, dict) or not all(isinstance(k, str) for k in equalizer):
                raise TypeError("equalizer must be a dict {word: scale} (AttentionReweight)")
            scales = np.ones(full, np.float32)
            for word, value in equalizer.items():
                where = words(target, written, word, "equalizer")
                if not where.any() or not np.isfinite(value):
                    raise ValueError(f"equalizer: {word!r} is not in the edited prompt {target!r} or its scale is not finite")
                scales[where > 0] = float(value)
        pad = lambda ids, n: tokenizer.pad({"input_ids": [ids]}, padding="max_length", max_length=n)["input_ids"]  # noqa: E731
        return {
            "source": np.asarray(pad(source_ids, full), np.int32),
            "target": np.asarray(pad(target_ids, budget), np.int32),
            "mapper": mapper, "alphas": alphas, "blend_words": blend_words, "equalizer": scales,
        }

    # ---------------------------------------------------------------- compiled programs
    # Without a progress bar, edit and invert are one program each. With one, each runs as programs without host
    # callbacks, which JAX's persistent cache stores: a start, one step (called once per step, all queued at once,
    # the bar advancing as each finishes) and, for edit, decoding. The steps are the same either way.

    def _edit_program(self, params, scheduler_state, tokens, subject_embeds, latents, arrays, guidance_scale,
                      num_inference_steps, do_cfg, static, real_image):
        # bf16 on CPU: the text encoder's products on bf16 operands (models/bf16_matmul.py); the decoder as in
        # generation (see FlaxBlipDiffusionPipeline._generate). No block traces: the controller sees each
        # attention in place.
        with self.pipeline.runtime.tracing(repeated_blocks=False):
            carry = self._edit_start_traced(params, scheduler_state, tokens, subject_embeds, latents, num_inference_steps,
                                            do_cfg, real_image, static.control_pixels)
            carry = self._edit_steps_traced(params, arrays, guidance_scale, carry, 0, carry["state"].timesteps.shape[0],
                                            do_cfg, static, real_image)
        return self._edit_finish_program(params, carry)

    def _edit_start_program(self, params, scheduler_state, tokens, subject_embeds, latents, num_inference_steps, do_cfg,
                            real_image, control_pixels):
        with self.pipeline.runtime.tracing(repeated_blocks=False):
            return self._edit_start_traced(params, scheduler_state, tokens, subject_embeds, latents, num_inference_steps,
                                           do_cfg, real_image, control_pixels)

    def _edit_steps_program(self, params, arrays, guidance_scale, carry, start, stop, do_cfg, static, real_image):
        with self.pipeline.runtime.tracing(repeated_blocks=False):
            return self._edit_steps_traced(params, arrays, guidance_scale, carry, start, stop, do_cfg, static, real_image)

    def _edit_finish_program(self, params, carry):
        return {"context_finite": jnp.all(jnp.isfinite(carry["context"])),
                "first_nonfinite_step": carry["first_nonfinite_step"],
                "images": self.pipeline._decode(params, carry["latents"])}

    def _edit_start_traced(self, params, scheduler_state, tokens, subject_embeds, latents, num_inference_steps, do_cfg,
                           real_image, control_pixels):
        scheduler = self._edit_ddim() if real_image else self.pipeline.scheduler
        text = {"params": params["text_encoder"]}
        # (unconditional,) source and target prompts in one pass (models/context_clip.encode_contexts)
        plain = jnp.concatenate([tokens["uncond"], tokens["source"]]) if do_cfg else tokens["source"]
        context = encode_contexts(self.pipeline.text_encoder, text, plain, tokens["target"], subject_embeds,
                                  self.pipeline.ctx_begin_pos)
        if do_cfg:
            context = jnp.concatenate([context[:1], context])  # the unconditional context, for both branches
        state = scheduler.set_timesteps(scheduler_state, num_inference_steps=num_inference_steps, shape=latents.shape)
        latents = latents * state.init_noise_sigma
        return {"context": context, "latents": latents, "state": state, "aux": jnp.zeros((control_pixels,), latents.dtype),
                "first_nonfinite_step": jnp.array(-1, jnp.int32)}

    def _edit_steps_traced(self, params, arrays, guidance_scale, carry, start, stop, do_cfg, static, real_image):
        """Steps start..stop-1 of the edit loop, from `carry`. The loop runs every timestep the scheduler lists:
        PNDM lists one more than asked (its last step is a no-op on the latents), and LAVIS's controller and
        LocalBlend run at each of them."""
        scheduler = self._edit_ddim() if real_image else self.pipeline.scheduler

        def combine(uncond, cond, g):
            guided = uncond + g * (cond - uncond)
            # Real images: the source branch follows its unguided noise, so that it reconstructs the image.
            return jnp.concatenate([cond[:1], guided[1:]]) if real_image else guided

        def after_step(latents, blend_sum, collections, step):
            if not static.use_local_blend:
                return latents, blend_sum
            blend_sum = blend_sum + collected_blend_map(collections)
            return local_blend(latents, blend_sum, static, arrays["lb_threshold"]), blend_sum

        result = denoise(
            unet=self.pipeline.unet, unet_params=params["unet"], scheduler=scheduler, scheduler_state=carry["state"],
            latents=carry["latents"], context=carry["context"], guidance_scale=guidance_scale,
            num_inference_steps=carry["state"].timesteps.shape[0], do_classifier_free_guidance=do_cfg,
            attention_control=lambda step: make_interceptor(static, arrays, step, guided=do_cfg),
            attention=self.pipeline.runtime.unet_interceptor,
            combine_guidance=combine, after_step=after_step, aux=carry["aux"],
            steps=(start, stop), first_nonfinite_step=carry["first_nonfinite_step"],
        )
        return {**carry, "latents": result.latents, "state": result.scheduler_state, "aux": result.aux,
                "first_nonfinite_step": result.first_nonfinite_step}

    def _invert_program(self, params, scheduler_state, image, ids, num_inference_steps):
        """VAE posterior mean of `image`, then DDIM inversion (LAVIS `_ddim_inverse`, guidance 1)."""
        with self.pipeline.runtime.tracing():  # no attention control in the inversion: blocks traced once
            carry = self._invert_start_traced(params, scheduler_state, image, ids, num_inference_steps)
            return self._invert_steps_traced(params, carry, 0, num_inference_steps, num_inference_steps)["latents"]

    def _invert_start_program(self, params, scheduler_state, image, ids, num_inference_steps):
        with self.pipeline.runtime.tracing():
            return self._invert_start_traced(params, scheduler_state, image, ids, num_inference_steps)

    def _invert_steps_program(self, params, carry, start, stop, num_inference_steps):
        with self.pipeline.runtime.tracing():
            return self._invert_steps_traced(params, carry, start, stop, num_inference_steps)

    def _invert_start_traced(self, params, scheduler_state, image, ids, num_inference_steps):
        vae = self.pipeline.vae
        posterior = vae.apply({"params": params["vae"]}, image, method=vae.encode).latent_dist
        latents = posterior.mean.transpose(0, 3, 1, 2) * vae.config.scaling_factor
        context = self.pipeline.text_encoder.apply({"params": params["text_encoder"]}, ids)[0]
        state = self._edit_ddim().set_timesteps(scheduler_state, num_inference_steps=num_inference_steps, shape=latents.shape)
        return {"latents": latents, "context": context, "state": state}

    def _invert_steps_traced(self, params, carry, start, stop, num_inference_steps):
        scheduler = self._edit_ddim()
        state, context = carry["state"], carry["context"]
        alphas = state.common.alphas_cumprod
        stride = scheduler.config.num_train_timesteps // num_inference_steps
        timesteps = state.timesteps[::-1]

        runtime, unet = self.pipeline.runtime, self.pipeline.unet

        def body(i, x):
            t = timesteps[i]
            with runtime.unet_layers():
                eps = unet.apply({"params": params["unet"]}, x, jnp.broadcast_to(t, (x.shape[0],)), context).sample
            prev = t - stride
            a_from = jnp.where(prev >= 0, alphas[jnp.maximum(prev, 0)], state.final_alpha_cumprod)
            a_to = alphas[t]
            if scheduler.config.prediction_type == "v_prediction":  # the noise the velocity implies at x
                eps = a_to**0.5 * eps + (1 - a_to) ** 0.5 * x
            # x_t from x_{t-1}: the DDIM update run backwards (noise to more noise).
            return a_to**0.5 * ((a_from**-0.5 - a_to**-0.5) * x + ((1 / a_to - 1) ** 0.5 - (1 / a_from - 1) ** 0.5) * eps) + x

        return {**carry, "latents": lax.fori_loop(start, stop, body, carry["latents"])}

    # Each program's function and static arguments, jitted on first use.
    _PROGRAMS = {
        "edit": ("_edit_program", ("num_inference_steps", "do_cfg", "static", "real_image")),
        "edit_start": ("_edit_start_program", ("num_inference_steps", "do_cfg", "real_image", "control_pixels")),
        "edit_steps": ("_edit_steps_program", ("do_cfg", "static", "real_image")),
        "edit_finish": ("_edit_finish_program", ()),
        "invert": ("_invert_program", ("num_inference_steps",)),
        "invert_start": ("_invert_start_program", ("num_inference_steps",)),
        "invert_steps": ("_invert_steps_program", ("num_inference_steps",)),
    }

    def _jitted(self, name):
        if name not in self._programs:
            function, static = self._PROGRAMS[name]
            self._programs[name] = self.pipeline.runtime.jit(getattr(self, function), static_argnames=static)
        return self._programs[name]

    # ---------------------------------------------------------------- entry points

    def _check_common(self, height, width, num_inference_steps, guidance_scale, output_type, scheduler=None):
        check_common(height, width, num_inference_steps, guidance_scale, output_type, self.pipeline.size_multiple,
                     scheduler or self.pipeline.scheduler)

    def invert(self, image, prompt, params, num_inference_steps, height, width, progress):
        """`FlaxBlipDiffusionPipeline.invert`: DDIM-inverted latents (1, 4, h, w) of a real image."""
        if params is None:
            raise ValueError("params: pass the params returned by from_pretrained")
        prompt = _single(prompt, "prompt")
        self._check_common(height, width, num_inference_steps, 1.0, "np", scheduler=self._edit_ddim())
        return self._invert_pixels(prepare_real_image(image, height, width), prompt, params, num_inference_steps, progress)

    def _invert_pixels(self, pixels, prompt, params, num_inference_steps, progress=False):
        pipeline = self.pipeline
        ids = pipeline.tokenizer([prompt], padding="max_length", truncation=True, max_length=pipeline.max_text_length,
                                 return_tensors="np").input_ids.astype(np.int32)
        state = self._edit_ddim().create_state()
        n, pixels = int(num_inference_steps), jnp.asarray(pixels, pipeline.dtype)
        if not progress:
            return self._jitted("invert")(params, state, pixels, ids, num_inference_steps=n)
        with pipeline.progress.showing(True, n, "inverting"):
            carry = self._jitted("invert_start")(params, state, pixels, ids, num_inference_steps=n)
            steps = self._jitted("invert_steps")
            carry = pipeline.progress.queued_steps(lambda c, i, j: steps(params, c, i, j, num_inference_steps=n), carry, n)
        return carry["latents"]

    def edit(self, request: EditRequest) -> FlaxBlipDiffusionPipelineOutput:
        """`FlaxBlipDiffusionPipeline.edit`: the source image, then the edited one."""
        r, pipeline = request, self.pipeline
        params, height, width = r.params, r.height, r.width
        if params is None:
            raise ValueError("params: pass the params returned by from_pretrained")
        if r.jit:
            raise ValueError("jit: editing runs one (source, edited) pair on one device; pass jit=False")
        prompt = _single(r.prompt, "prompt")
        original_subject = _single(r.original_subject, "original_subject")
        target = _single(r.target_subject_category, "target_subject_category")
        neg = _single(r.neg_prompt if r.neg_prompt is not None else "", "neg_prompt")
        real_image = r.image is not None
        self._check_common(height, width, r.num_inference_steps, r.guidance_scale, r.output_type,
                           scheduler=self._edit_ddim() if real_image else None)
        if real_image:
            check_steps(r.num_inversion_steps, "num_inversion_steps", self._edit_ddim())
        cross = _fraction(r.cross_replace_steps, "cross_replace_steps")
        self_steps = _fraction(r.self_replace_steps, "self_replace_steps")
        lb_threshold = r.lb_threshold
        if isinstance(lb_threshold, bool) or not isinstance(lb_threshold, (int, float)) or not np.isfinite(lb_threshold):
            raise ValueError(f"lb_threshold must be a finite number, got {lb_threshold!r}")
        pixels = prepare_real_image(r.image, height, width) if real_image else None
        prng_seed = as_prng_key(r.prng_seed) if r.prng_seed is not None else None
        edit_tokens = self.edit_tokens(prompt, original_subject, target, r.controller, r.equalizer, bool(r.placeholder_tokens))
        subject_embeddings = r.subject_embeddings
        if subject_embeddings is None:
            if r.reference_image is None:
                raise ValueError("reference_image: required (or pass subject_embeddings)")
            subject_embeddings = pipeline.encode_subject(
                r.reference_image, _single(r.source_subject_category, "source_subject_category"), params)
        else:
            subject_embeddings = pipeline._given_embeddings(subject_embeddings)
        subject_embeddings = jnp.asarray(subject_embeddings, pipeline.dtype)[:1]

        if real_image:
            start = self._invert_pixels(pixels, f"a {original_subject} {prompt.strip()}", params, r.num_inversion_steps,
                                        r.progress)
        else:
            start = pipeline._latents(r.latents, prng_seed, 1, height, width)
        start = jnp.broadcast_to(start, (2,) + start.shape[1:])
        tokens = {"source": edit_tokens["source"], "target": edit_tokens["target"],
                  "uncond": pipeline.tokenizer([neg], padding="max_length", truncation=True,
                                               max_length=pipeline.max_text_length, return_tensors="np").input_ids.astype(np.int32)}
        arrays = schedule_arrays(r.num_inference_steps, cross, self_steps, edit_tokens["mapper"], edit_tokens["alphas"],
                                 edit_tokens["blend_words"], float(lb_threshold), edit_tokens["equalizer"])
        static = EditStatic(control_pixels=self.control_pixels(height, width), use_local_blend=bool(r.local_blend),
                            mode=r.controller)
        scheduler = self._edit_ddim() if real_image else pipeline.scheduler
        guidance, do_cfg, n = jnp.asarray(r.guidance_scale, jnp.float32), r.guidance_scale > 1.0, int(r.num_inference_steps)
        if not r.progress:
            result = self._jitted("edit")(params, scheduler.create_state(), tokens, subject_embeddings, start, arrays, guidance,
                                          num_inference_steps=n, do_cfg=do_cfg, static=static, real_image=real_image)
        else:
            carry = self._jitted("edit_start")(params, scheduler.create_state(), tokens, subject_embeddings, start,
                                               num_inference_steps=n, do_cfg=do_cfg, real_image=real_image,
                                               control_pixels=static.control_pixels)
            total = int(carry["state"].timesteps.shape[0])  # every timestep the scheduler lists (PNDM: one more)
            steps, finish = self._jitted("edit_steps"), self._jitted("edit_finish")
            with pipeline.progress.showing(True, total, "editing"):
                carry = pipeline.progress.queued_steps(
                    lambda c, i, j: steps(params, arrays, guidance, c, i, j, do_cfg=do_cfg, static=static, real_image=real_image),
                    carry, total, before_clock=lambda c: finish.lower(params, c).compile())
            result = finish(params, carry)
        result = jax.device_get(result)
        images = np.asarray(result["images"], dtype=np.float32)
        check_finite(result, int(r.num_inference_steps))
        return FlaxBlipDiffusionPipelineOutput(images=images if r.output_type == "np" else numpy_to_pil(images))
