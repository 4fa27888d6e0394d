"""Subject representation pre-training, the paper's stage 2 ("prompted context generation"), which LAVIS
never released. The loss is LAVIS's `BlipDiffusion.forward` with `qformer_train`, `proj_train` and
`sd_train_text_encoder` on:

    subject  = ProjLayer(Q-Former(ViT(reference), category))       reference: the subject on a random background
    context  = ContextCLIP(build_prompts("a {category} {caption}"), subject spliced at ctx_begin_pos)
    latents  = VAE(target).latent_dist.sample() * scaling_factor    target: the subject in context
    loss     = mean((UNet(DDPM.add_noise(latents, noise, t), t, context) - noise) ** 2)   (or the velocity, for
               a scheduler with prediction_type "v_prediction", as the toy model's)

The text is built and tokenized as generation builds it (prompt repetition, padding), so training and
inference see the same sequence. With probability `subject_dropout` an example's subject embeddings are
zeros; with probability `caption_dropout` its whole context is the unconditional one (the empty prompt, no
subject: what classifier-free guidance's other branch sees), so guidance works for a model trained from
scratch. Trained groups (`train`): "qformer" (Q-Former, query tokens, projection), "text_encoder", "unet",
and optionally "vision" (the ViT); the VAE is always frozen.

    trainer = SubjectPretrainer(model, PretrainConfig(out="run", data="subjects/", backgrounds="bg/"))
    trainer.train()        # then FlaxBlipDiffusionPipeline.from_pretrained("run")

The loop, checkpoints and exact resume are `trainer.Trainer`'s, shared with fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..checkpoint import ConvertedModel
from ..models.context_clip import encode_contexts
from .config import check_ints
from .export import write_converted_into
from .loss import DiffusionLoss
from . import sharding
from .memory_plan import MemoryPlan
from .pretrain_data import FolderSource, PretrainBatches, ToyWorldSource
from .trainer import Trainer, barrier, cached_step

GROUPS = ("qformer", "text_encoder", "unet", "vision")
DEFAULT_GROUPS = ("qformer", "text_encoder", "unet")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass
class PretrainConfig:
    out: str
    data: str | None = None  # manifest or folder (FolderSource); None with toy=True
    backgrounds: str | None = None
    toy: bool = False  # the toy world's pairs instead of `data`
    steps: int = 10000
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_steps: int = 500
    schedule: str = "cosine"  # after warm-up: cosine decay to 10% of the rate, or constant
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA; else the exported weights are the EMA's
    train: tuple = DEFAULT_GROUPS
    caption_dropout: float = 0.1
    subject_dropout: float = 0.1
    prompt_reps: int = 20  # as generation's default, so training sees the text generation builds
    resolution: int = 512
    compute_dtype: object = jnp.float32  # jnp.bfloat16: bf16 compute, fp32 master weights
    remat: bool = False
    devices: int | None = None
    mesh: str | None = None  # "data=D,fsdp=F" (sharding.py); None: `devices` (or as many as divide the batch) on data
    grad_accum: int = 1  # microbatches per step (gradients summed in the step: less activation memory)
    shard_min_size: int = sharding.DEFAULT_MIN_SIZE  # leaves of at least this many elements are split over fsdp
    device_memory_gib: float | None = None  # the per-device budget of the memory plan (None: the device's own)
    checkpoint_every: int = 0
    resume: bool = False
    seed: int = 0
    preview_every: int = 0
    preview_steps: int = 25
    progress: bool = True

    def validate(self, names: dict | None = None) -> None:
        name = lambda field: (names or {}).get(field, field)  # noqa: E731
        if not isinstance(self.out, (str, os.PathLike)):
            raise TypeError(f"{name('out')} must be a path, not {type(self.out).__name__}")
        if self.toy == (self.data is not None):
            raise ValueError(f"give either {name('data')} (with {name('backgrounds')}) or {name('toy')}")
        if self.data is not None and self.backgrounds is None:
            raise ValueError(f"{name('backgrounds')}: a folder of background images is required with {name('data')}")
        check_ints(self, {"steps": 1, "batch_size": 1, "warmup_steps": 0, "prompt_reps": 1, "resolution": 8,
                          "checkpoint_every": 0, "seed": 0, "preview_every": 0, "preview_steps": 1, "grad_accum": 1,
                          "shard_min_size": 1}, name)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"{name('grad_accum')}={self.grad_accum} must divide {name('batch_size')}={self.batch_size}")
        if self.mesh is not None:  # checked here, before the toy recipe's VAE or any model is built
            sizes = sharding.parse_mesh(self.mesh, len(jax.devices()), name("mesh"))
            if self.batch_size % (sizes[sharding.DATA] * sizes[sharding.FSDP]):
                raise ValueError(f"{name('batch_size')}={self.batch_size} cannot be split evenly over the "
                                 f"{sizes[sharding.DATA] * sizes[sharding.FSDP]} devices of {name('mesh')}={self.mesh!r}")
            if self.devices is not None:
                raise ValueError(f"{name('devices')}: give {name('devices')} or {name('mesh')}, not both")
        if self.device_memory_gib is not None and (isinstance(self.device_memory_gib, bool) or not isinstance(
                self.device_memory_gib, (int, float)) or not 0 < self.device_memory_gib < math.inf):
            raise ValueError(f"{name('device_memory_gib')}={self.device_memory_gib!r} must be a positive number of GiB")
        ranges = {"learning_rate": (0, math.inf, False), "weight_decay": (0, math.inf, True),
                  "max_grad_norm": (0, math.inf, False), "ema_decay": (0, 1, True),
                  "caption_dropout": (0, 1, True), "subject_dropout": (0, 1, True)}
        for field, (low, high, low_ok) in ranges.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name(field)} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value < low or (value == low and not low_ok) or value >= high:
                raise ValueError(f"{name(field)}={value} is out of range ({low}{'' if low_ok else ' exclusive'} to {high})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{name('schedule')}={self.schedule!r}: choose one of {SCHEDULES}")
        groups = tuple(self.train)
        if not groups or any(g not in GROUPS for g in groups) or len(set(groups)) != len(groups):
            raise ValueError(f"{name('train')}={self.train!r}: choose distinct groups among {GROUPS}")
        if "vision" in groups and "qformer" not in groups:
            raise ValueError(f"{name('train')}: 'vision' trains with 'qformer'")
        if jnp.dtype(self.compute_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"{name('compute_dtype')}={self.compute_dtype!r} must be float32, bfloat16 or float16")

    def resume_settings(self) -> dict:
        keys = ("data", "backgrounds", "toy", "batch_size", "learning_rate", "warmup_steps", "schedule", "weight_decay",
                "max_grad_norm", "ema_decay", "caption_dropout", "subject_dropout", "prompt_reps", "resolution", "seed")
        settings = {k: getattr(self, k) for k in keys}
        settings["train"] = list(self.train)
        for k in ("data", "backgrounds"):
            if settings[k] is not None:
                settings[k] = os.path.abspath(settings[k])
        return settings


# ---------------------------------------------------------------------------------------------------- loss


class PretrainLoss(DiffusionLoss):
    """Pure loss over `trainable` (the groups being trained) and `frozen` (the rest, the VAE included).
    Parameter groups: "qformer" is the Q-Former tree without its `visual_encoder`, which is "vision"."""

    def __init__(self, configs: dict, ctx_begin_pos: int, compute_dtype=jnp.float32, remat: bool = False,
                 cpu_rewrites: bool | None = None):
        from .. import components

        super().__init__(configs, ctx_begin_pos, compute_dtype, remat, cpu_rewrites=cpu_rewrites)
        self.qformer = components.build_model("qformer", configs["qformer"], self.compute_dtype)

    @staticmethod
    def split(params: dict, groups) -> tuple[dict, dict]:
        """(trainable, frozen) trees from a model's params {"qformer", "text_encoder", "unet", "vae"}."""
        qformer = dict(params["qformer"])
        pieces = {"vision": qformer.pop("visual_encoder"), "qformer": qformer, "text_encoder": params["text_encoder"],
                  "unet": params["unet"], "vae": params["vae"]}
        trainable = {k: v for k, v in pieces.items() if k in groups}
        return trainable, {k: v for k, v in pieces.items() if k not in groups}

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        """The model's params from the two trees (the inverse of `split`)."""
        pieces = {**frozen, **trainable}
        return {"qformer": {**pieces["qformer"], "visual_encoder": pieces["vision"]},
                "text_encoder": pieces["text_encoder"], "unet": pieces["unet"], "vae": pieces["vae"]}

    def subject_embeddings(self, pieces, batch):
        params = {**pieces["qformer"], "visual_encoder": pieces["vision"]}
        return self.qformer.apply({"params": params}, batch["qformer_ids"], batch["qformer_mask"],
                                  batch["reference"].astype(self.compute_dtype))

    def __call__(self, trainable, frozen, batch, latents, noise, timesteps, keep_subject, keep_caption):
        """batch: reference, prompt_ids, uncond_ids (1, 77), qformer_ids, qformer_mask; keep_*: (B,) booleans."""
        pieces = {**frozen, **trainable}
        subject = self.subject_embeddings(pieces, batch)
        subject = jnp.where(keep_subject[:, None, None], subject, jnp.zeros_like(subject))
        text = {"params": pieces["text_encoder"]}
        both = encode_contexts(self.text_encoder, text, batch["uncond_ids"], batch["prompt_ids"], subject, self.ctx_begin_pos)
        uncond, cond = both[:1], both[1:]
        context = jnp.where(keep_caption[:, None, None], cond, jnp.broadcast_to(uncond, cond.shape))
        noise = noise.astype(self.loss_dtype)
        noisy = self.scheduler.add_noise(self.scheduler_state, latents.astype(self.loss_dtype), noise, timesteps)
        prediction = self._unet(pieces["unet"], noisy.astype(self.compute_dtype), timesteps, context)
        return jnp.mean((prediction.astype(self.loss_dtype) - self.target(latents, noise, timesteps)) ** 2)


# --------------------------------------------------------------------------------------------- optimizer


class EmaState(NamedTuple):
    ema: object


def ema_of_params(decay: float) -> optax.GradientTransformation:
    """Keeps an exponential moving average of the params after each update in the optimizer state (so it is
    checkpointed and resumed with it); the updates pass through unchanged."""

    def init(params):
        return EmaState(jax.tree_util.tree_map(jnp.array, params))

    def update(updates, state, params):
        new = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new)
        return updates, EmaState(ema)

    return optax.GradientTransformation(init, update)


def make_pretrain_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on ndim >= 2, as LAVIS) with linear warm-up and cosine decay to
    10% (or a constant rate); then the EMA when `ema_decay` > 0."""
    peak, warmup = float(config.learning_rate), int(config.warmup_steps)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.steps, warmup + 1), peak * 0.1)
    else:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(config.weight_decay),
                        mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params))
    parts = [optax.clip_by_global_norm(float(config.max_grad_norm)), adamw]
    if config.ema_decay:
        parts.append(ema_of_params(float(config.ema_decay)))
    return optax.chain(*parts)


def make_pretrain_step(loss: PretrainLoss, optimizer, caption_dropout: float, subject_dropout: float, grad_accum: int = 1):
    """One jitted step: the VAE latents, noise, timesteps and dropout masks drawn from `key` for the whole batch,
    then value_and_grad of the loss (summed over `grad_accum` microbatches in a scan) and the optimizer update.
    The draws do not depend on `grad_accum`, so neither does the step's result (up to summation order)."""

    def gradients(trainable, frozen, batch, *per_example):
        if grad_accum == 1:
            return jax.value_and_grad(loss)(trainable, frozen, batch, *per_example)
        uncond = batch["uncond_ids"]
        examples = ({k: v for k, v in batch.items() if k != "uncond_ids"}, *per_example)
        # Microbatch j holds examples j, j+K, j+2K, ...: each device's rows stay on that device.
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), examples)

        def accumulate(total, xs):
            part, *rest = xs
            value, grads = jax.value_and_grad(loss)(trainable, frozen, {**part, "uncond_ids": uncond}, *rest)
            return jax.tree_util.tree_map(jnp.add, total, (value, grads)), None

        zeros = (jnp.zeros((), loss.loss_dtype), jax.tree_util.tree_map(jnp.zeros_like, trainable))
        total, _ = jax.lax.scan(accumulate, zeros, micro)
        return jax.tree_util.tree_map(lambda x: x / grad_accum, total)

    def step(trainable, opt_state, frozen, batch, key):
        sample_key, subject_key, caption_key = jax.random.split(key, 3)
        latents, noise, timesteps = loss.sample_inputs(frozen["vae"], batch["target"], sample_key)
        size = latents.shape[0]
        keep_subject = jax.random.uniform(subject_key, (size,)) >= subject_dropout
        keep_caption = jax.random.uniform(caption_key, (size,)) >= caption_dropout
        value, grads = gradients(trainable, frozen, batch, latents, noise, timesteps, keep_subject, keep_caption)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def cached_pretrain_step(configs: dict, ctx_begin_pos: int, config: PretrainConfig):
    """(loss, optimizer, step function) shared by pre-trainers of the same model configs and settings; the step
    is compiled for a mesh by `compiled_step`."""
    settings = {k: getattr(config, k) for k in ("steps", "learning_rate", "warmup_steps", "schedule", "weight_decay",
                                                "max_grad_norm", "ema_decay", "caption_dropout", "subject_dropout", "remat",
                                                "grad_accum")}
    key = json.dumps(["pretrain", {k: configs[k] for k in ("qformer", "unet", "text_encoder", "vae", "scheduler")},
                      int(ctx_begin_pos), jnp.dtype(config.compute_dtype).name, settings], sort_keys=True, default=str)

    def build():
        loss = PretrainLoss(configs, ctx_begin_pos, config.compute_dtype, config.remat)
        optimizer = make_pretrain_optimizer(config)
        step = make_pretrain_step(loss, optimizer, float(config.caption_dropout), float(config.subject_dropout),
                                  int(config.grad_accum))
        return loss, optimizer, step

    return cached_step(key, build)


_COMPILED: dict = {}  # (step function, shapes and shardings of its arguments) -> compiled step


def compiled_step(loss: PretrainLoss, step, args: tuple):
    """`step` compiled ahead of time for `args` (arrays or ShapeDtypeStructs with shardings): `jax.jit` with
    `in_shardings` those of `args` and `out_shardings` those of the trainable and optimizer state, both
    donated, so parameters and optimizer state stay sharded as placed, step after step."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    # The step itself (not its id, which a collected function's successor could reuse) keys the cache.
    signature = (step, treedef, tuple((x.shape, jnp.dtype(x.dtype).name, x.sharding) for x in leaves))
    if signature not in _COMPILED:
        in_shardings = jax.tree_util.tree_map(lambda x: x.sharding, args)
        replicated = sharding.replicated(leaves[0].sharding.mesh)
        jitted = loss.runtime.jit(step, in_shardings=in_shardings, donate_argnums=(0, 1),
                                  out_shardings=(in_shardings[0], in_shardings[1], replicated))
        if len(_COMPILED) >= 4:
            _COMPILED.pop(next(iter(_COMPILED)))
        with loss.runtime.compiling():
            _COMPILED[signature] = jitted.lower(*args).compile()
    return _COMPILED[signature]


# ---------------------------------------------------------------------------------------------- trainer


def _float32(x):
    """Host float32 copy of a param; a ShapeDtypeStruct (a model of shapes only, for a memory plan) stays one."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return np.asarray(x, np.float32)


class SubjectPretrainer(Trainer):
    """Pre-trains `model` (a `ConvertedModel`) on `config`'s data; writes the model into `config.out`."""

    run_kind = "pre-training"

    def __init__(self, model: ConvertedModel, config: PretrainConfig, names: dict | None = None, keep_in_out=()):
        from ..pipelines import FlaxBlipDiffusionPipeline

        config.validate(names)
        self.model, self.config, self.names = model, config, names or {}
        self.keep_in_out = tuple(keep_in_out)
        self.pipeline = FlaxBlipDiffusionPipeline(model)
        self._check_resolution(model, config.resolution)
        self.out = os.path.abspath(config.out)
        self.groups = tuple(config.train)
        self.source = ToyWorldSource(config.resolution) if config.toy else FolderSource(
            config.data, config.backgrounds, (self._name("data"), self._name("backgrounds")))
        self._setup_devices(config.devices, config.batch_size, config.mesh, config.shard_min_size)
        if config.batch_size % (config.grad_accum * self.num_devices):
            raise ValueError(f"{self._name('batch_size')}={config.batch_size} must split into {self._name('grad_accum')}="
                             f"{config.grad_accum} microbatches of a multiple of {self.num_devices} device(s)")
        self.batches = PretrainBatches(self.source, self.pipeline, config.resolution, config.batch_size, config.seed,
                                       config.prompt_reps, rows=self._process_rows(config.batch_size))
        self.loss, self.optimizer, self.train_step = cached_pretrain_step(model.configs, self.pipeline.ctx_begin_pos, config)
        self.memory_plan = None
        _, uncond = self.pipeline.prepare_inputs([""], [""])
        self.uncond_ids = uncond

    auto_resume = True

    def _description(self) -> str:
        sizes = ",".join(f"{axis}={size}" for axis, size in self.mesh.shape.items())
        return f"pre-training on {self.num_devices} device(s) ({sizes})"

    def _process_rows(self, batch_size: int) -> tuple[int, int]:
        """The rows [start, stop) of each global batch that this process's devices hold (and it loads)."""
        index_map = self._shardings[1].addressable_devices_indices_map((batch_size,))
        rows = sorted({r for (index,) in index_map.values() for r in range(*index.indices(batch_size))})
        if rows != list(range(rows[0], rows[-1] + 1)):
            raise ValueError(f"{self._name('mesh')}: this process's devices hold rows {rows} of the batch, not one "
                             f"contiguous block; order the devices by process")
        return rows[0], rows[-1] + 1

    def _compile_step(self, args: tuple):
        """The step compiled for the placed `args`, after its memory plan is printed and checked (ValueError
        when it does not fit the device)."""
        compiled = compiled_step(self.loss, self.train_step, args)
        self.memory_plan = MemoryPlan.of(compiled, self.mesh, self.config.device_memory_gib)
        if self.is_primary and self.config.progress:
            from tqdm.auto import tqdm

            tqdm.write(self.memory_plan.line())  # above the progress bar, not through it
        self.memory_plan.check(self._name("device_memory_gib"))
        return compiled

    def _host_state(self, resuming: bool) -> dict:
        trainable, _ = PretrainLoss.split(self.model.params, self.groups)
        return jax.tree_util.tree_map(_float32, trainable)

    def _frozen(self) -> dict:
        _, frozen = PretrainLoss.split(self.model.params, self.groups)
        return jax.tree_util.tree_map(_float32, frozen)

    def batch(self, step: int) -> dict:
        """Host arrays of step `step` (this process's share), with the unconditional prompt ids."""
        return {**self.batches[step], "uncond_ids": self.uncond_ids}

    def _step_args(self, step: int) -> tuple:
        batch = self.batch(step)
        uncond = self._replicate(batch.pop("uncond_ids"))
        return ({**self._shard_batch(batch), "uncond_ids": uncond},)

    def abstract_step_args(self) -> tuple:
        """ShapeDtypeStructs (with shardings) of every argument of the step, for a memory plan that allocates
        nothing: the state by `_initial_state`'s rule, the batch from one host batch's shapes."""
        trainable, frozen = PretrainLoss.split(self.model.params, self.groups)
        host, frozen = (jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), tree)
                        for tree in (trainable, frozen))  # shapes only: no float32 copy of the weights
        opt = jax.eval_shape(self.optimizer.init, host)
        batch = self.batch(0)
        uncond = batch.pop("uncond_ids")
        spec = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
        rows = {k: jax.ShapeDtypeStruct((self.config.batch_size,) + v.shape[1:], v.dtype, sharding=self._shardings[1])
                for k, v in batch.items()}
        rows["uncond_ids"] = jax.ShapeDtypeStruct(uncond.shape, uncond.dtype, sharding=self._shardings[0])
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        return (spec(host, self._state_shardings(host)), spec(opt, self._state_shardings(opt)),
                spec(frozen, self._state_shardings(frozen)), rows,
                jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self._shardings[0]))

    def plan(self) -> MemoryPlan:
        """Compile the step for this mesh and batch on abstract arguments and return its per-device memory plan."""
        self.memory_plan = MemoryPlan.of(compiled_step(self.loss, self.train_step, self.abstract_step_args()),
                                         self.mesh, self.config.device_memory_gib)
        return self.memory_plan

    # ------------------------------------------------------------------ outputs

    def _exported(self, trainable, opt_state):
        for state in opt_state if isinstance(opt_state, tuple) else ():
            if isinstance(state, EmaState):
                return state.ema
        return trainable

    def params_of(self, trainable) -> dict:
        """The model's host params with `trainable` in place of the trained groups."""
        _, frozen = PretrainLoss.split(self.model.params, self.groups)
        return PretrainLoss.merge(self._to_host(trainable), frozen)

    def export(self, trainable) -> str:
        """Write the model into OUT (process 0; every process takes part in gathering the weights)."""
        model = dataclasses.replace(self.model, params=self.params_of(trainable), subject_embeddings=None)
        if self.is_primary:
            write_converted_into(model, self.out)
        barrier("blipdiff-jax: exported")
        return self.out

    def preview(self, trainable, step: int) -> str:
        """previews/step-XXXX.png: the first example's reference beside a generation from it."""
        from PIL import Image

        params = self.params_of(trainable)
        if not self.is_primary:
            return ""
        params = {k: params[k] for k in ("qformer", "text_encoder", "unet", "vae")}
        params["scheduler"] = self.pipeline.scheduler.create_state()
        example = self.source.example(self.config.seed + 1, 0)
        size = self.config.resolution
        out = self.pipeline(example["caption"], example["reference"], example["category"], example["category"],
                            params=params, prng_seed=jax.random.PRNGKey(self.config.seed), height=size, width=size,
                            num_inference_steps=self.config.preview_steps, prompt_reps=self.config.prompt_reps)
        sheet = Image.new("RGB", (2 * size, size))
        sheet.paste(example["reference"].convert("RGB").resize((size, size)), (0, 0))
        sheet.paste(out.images[0], (size, 0))
        os.makedirs(self._path("previews"), exist_ok=True)
        path = self._path("previews", f"step-{step:04d}.png")
        sheet.save(path)
        return path


def pretrain(model: ConvertedModel, config: PretrainConfig, names=None) -> str:
    """Pre-train and export; returns OUT."""
    return SubjectPretrainer(model, config, names=names).train()
