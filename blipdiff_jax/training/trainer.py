"""Subject fine-tuning (LAVIS `finetune-db-*.yaml`): a few images of one subject teach the UNet (and
optionally the text encoder) and the subject embeddings that subject.

    trainer = SubjectFinetuner(model, FinetuneConfig(images="dog/", subject="dog", out="dog-model"))
    trainer.train()       # then FlaxBlipDiffusionPipeline.from_pretrained("dog-model")

What is trained follows LAVIS `BlipDiffusion.before_training`: the subject embeddings start as the mean
over all subject images of the Q-Former output and are then cached as an `nn.Parameter(requires_grad=True)`
that the optimizer (built after `before_training`) updates, so here too they are a trained parameter.
The UNet is trained, the text encoder only with `train_text_encoder`, the Q-Former and the VAE are frozen
(they are not passed to the optimizer at all). AdamW, constant learning rate; as LAVIS's
`get_optimizer_params`, weight decay applies to parameters with 2 or more dimensions (the subject embeddings
included) and not to biases and norm scales.

Layout of OUT:
    model_index.json, params/, unet/, ... , subject_embeddings.npy   the exported model (at the end)
    checkpoints/<step>/      orbax: trained params, optimizer state, RNG key, step (atomic)
    previews/step-XXXX.png   optional previews
    loss.jsonl               {"step", "loss", "time"} per step ("time": Unix seconds)
    training_config.json     the settings a resumed run must share

Every step's randomness (VAE posterior sample, noise, timesteps) comes from `fold_in(PRNGKey(seed), step)`
and its images from `data.batch_indices(seed, step, ...)`, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..checkpoint import ConvertedModel
from . import checkpoints, data, lora, sharding
from .config import FinetuneConfig
from .export import write_converted_into
from .loss import DiffusionLoss

CHECKPOINTS, PREVIEWS, LOSS_LOG, CONFIG_FILE = "checkpoints", "previews", "loss.jsonl", "training_config.json"


def make_optimizer(learning_rate: float, weight_decay: float):
    """torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8, decoupled decay scaled by the learning rate);
    decay only on parameters with ndim >= 2, as LAVIS's `get_optimizer_params`."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                       mask=lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params))


def make_train_step(loss: DiffusionLoss, optimizer):
    """One jitted step: draw (latents, noise, timesteps) from `key`, value_and_grad of the loss, AdamW update."""

    def step(trainable, opt_state, frozen, pixels, input_ids, key):
        latents, noise, timesteps = loss.sample_inputs(frozen["vae"], pixels, key)
        value, grads = jax.value_and_grad(loss)(trainable, frozen, latents, noise, timesteps, input_ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return loss.runtime.jit(step, donate_argnums=(0, 1))


_STEP_CACHE: dict = {}  # one compiled step per model configuration and settings (trainers of the same model share it)


def cached_step(key: str, build):
    """`build()` (a (loss, optimizer, jitted step) triple) once per `key`, so a resumed or repeated run in the
    same process does not compile again; the 4 most recent are kept."""
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 4:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = build()
    return _STEP_CACHE[key]


def cached_train_step(configs: dict, ctx_begin_pos: int, compute_dtype, remat: bool, learning_rate: float, weight_decay: float,
                      lora_scale: float | None = None):
    """(loss, optimizer, jitted step) of fine-tuning, shared by every trainer with the same model configs and settings.
    `lora_scale` (alpha / rank): LoRA fine-tuning's loss (training/lora.py) instead."""
    key = json.dumps(["finetune", {k: configs[k] for k in ("unet", "text_encoder", "vae", "scheduler")}, int(ctx_begin_pos),
                      jnp.dtype(compute_dtype).name, bool(remat), float(learning_rate), float(weight_decay), lora_scale],
                     sort_keys=True, default=str)

    def build():
        if lora_scale is None:
            loss = DiffusionLoss(configs, ctx_begin_pos, compute_dtype, remat)
        else:
            loss = lora.LoraDiffusionLoss(configs, ctx_begin_pos, compute_dtype, remat, lora_scale)
        optimizer = make_optimizer(learning_rate, weight_decay)
        return loss, optimizer, make_train_step(loss, optimizer)

    return cached_step(key, build)


def step_key(base_key, step: int):
    return jax.random.fold_in(base_key, step)


def _choose_devices(requested: int | None, batch_size: int, name=str) -> int:
    available = len(jax.devices())
    if requested is not None:
        if requested > available:
            raise ValueError(f"{name('devices')}={requested}: only {available} available")
        if batch_size % requested:
            raise ValueError(f"{name('batch_size')}={batch_size} cannot be split evenly over {requested} devices")
        return requested
    return max(d for d in range(1, min(available, batch_size) + 1) if batch_size % d == 0)


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Trainer:
    """The training loop every trainer shares: output folder, orbax checkpoints with exact resume, the loss
    log, previews and export. A subclass supplies what differs (`_host_state`, `_frozen`, `_step_args`,
    `export`, `preview`, `_description`) and a jitted `train_step(trainable, opt_state, frozen, *args, key)`."""

    run_kind = "training"
    auto_resume = False  # True: OUT holding this run's settings and a checkpoint resumes without `resume`
    keep_in_out: tuple = ()  # entries OUT may already hold when a new run starts (e.g. the toy base model)

    def _name(self, field: str) -> str:
        return self.names.get(field, field)

    def _setup_devices(self, requested, batch_size, mesh: str | None = None, min_size: int = sharding.DEFAULT_MIN_SIZE) -> None:
        """The training mesh (sharding.py): `mesh` "data=D,fsdp=F", or `requested` devices (None: as many as
        divide the batch) all on `data`. The settings were checked already (`_choose_devices`, or the config's
        `validate` for a mesh: one of the two, the batch split evenly); the mesh must span every process."""
        if mesh is None:
            sizes = {sharding.DATA: _choose_devices(requested, batch_size, self._name), sharding.FSDP: 1}
        else:
            sizes = sharding.parse_mesh(mesh, len(jax.devices()), self._name("mesh"))
        self.num_devices = sizes[sharding.DATA] * sizes[sharding.FSDP]
        self.mesh = sharding.make_mesh(sizes[sharding.DATA], sizes[sharding.FSDP])
        if len({d.process_index for d in self.mesh.devices.flat}) != jax.process_count():
            raise ValueError(f"{self._name('mesh')}: the mesh of {self.num_devices} device(s) must include devices of "
                             f"every one of the {jax.process_count()} processes")
        self.shard_min_size = min_size
        self._shardings = (sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh))

    def _check_resolution(self, model, resolution: int) -> None:
        """Training images must pass the VAE's and the UNet's downsampling evenly."""
        vae_factor = 2 ** (len(model.configs["vae"]["block_out_channels"]) - 1)
        multiple = vae_factor * 2 ** (len(model.configs["unet"]["block_out_channels"]) - 1)
        if resolution % multiple:
            raise ValueError(f"{self._name('resolution')}={resolution} must be a multiple of {multiple} for this model")

    def _replicate(self, tree):
        # Always committed to an explicit sharding: restored checkpoints are, and the compiled step must match.
        return sharding.place(tree, jax.tree_util.tree_map(lambda _: self._shardings[0], tree))

    def _state_shardings(self, tree):
        """Shardings of a state tree (params, optimizer state) on the mesh, by the FSDP rule."""
        return sharding.state_shardings(tree, self.mesh, self.shard_min_size)

    def _shard_batch(self, array):
        """This process's rows of the batch -> the global batch, split over every device."""
        return sharding.place_batch(array, self._shardings[1])

    def _to_host(self, tree):
        """Numpy copy of a tree of global arrays, on every process (an all-gather across processes)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    @property
    def is_primary(self) -> bool:
        """Process 0 writes the config, the loss log, previews and the exported model."""
        return jax.process_index() == 0

    # ------------------------------------------------------------------ output folder

    def _path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def _resumable(self) -> bool:
        """Whether OUT holds a run with these settings and a checkpoint (`auto_resume`: a preempted job, started
        again with the same command, continues where it stopped)."""
        try:
            with open(self._path(CONFIG_FILE)) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return False
        return stored == json.loads(json.dumps(self.config.resume_settings())) and any(
            name.isdigit() for name in (os.listdir(self._path(CHECKPOINTS)) if os.path.isdir(self._path(CHECKPOINTS)) else ()))

    def _prepare_out(self) -> bool:
        """Check OUT (every process), then create it (process 0). Returns whether the run resumes."""
        settings = self.config.resume_settings()
        config_file = self._path(CONFIG_FILE)
        resume = self.config.resume or (self.auto_resume and self._resumable())
        if resume:
            if not os.path.isfile(config_file):
                raise ValueError(f"{self._name('resume')}: {self.out} holds no {self.run_kind} run ({CONFIG_FILE} is missing)")
            with open(config_file) as f:
                stored = json.load(f)
            for key in settings:
                if stored.get(key) != settings[key]:
                    raise ValueError(f"{self._name(key)}={settings[key]!r} differs from the run being resumed "
                                     f"({stored.get(key)!r}); resume with the same settings")
            return True
        if os.path.exists(self.out) and (not os.path.isdir(self.out) or set(os.listdir(self.out)) - set(self.keep_in_out)):
            raise FileExistsError(f"{self._name('out')}: {self.out} already exists and is not empty; pass "
                                  f"{self._name('resume')} to continue its run or choose a new directory")
        barrier("blipdiff-jax: OUT checked")  # no process sees the folder process 0 is about to create
        if self.is_primary:
            os.makedirs(self.out, exist_ok=True)
            with open(config_file, "w") as f:
                json.dump(settings, f, indent=2, sort_keys=True)
        barrier("blipdiff-jax: OUT created")
        return False

    def _check_before_training(self) -> None:
        """Settings checks that need the model (called before anything is written)."""

    def _compile_step(self, args: tuple):
        """The step to run on `args` (placed arrays: trainable, opt_state, frozen, *step args, key). By default
        the cached jitted step, whose shardings follow its committed arguments; the pre-trainer compiles it
        ahead of time for its mesh (and checks its memory plan)."""
        return self.train_step

    # ------------------------------------------------------------------ loop

    def _initial_state(self, manager, resuming: bool):
        """(start step, trainable, opt_state, rng), placed on the mesh: restored from the latest checkpoint
        straight into its shardings, or fresh (the optimizer state created sharded, never whole on one device)."""
        host = self._host_state(resuming)
        abstract = jax.eval_shape(lambda tree: tree, host)
        opt_abstract = jax.eval_shape(self.optimizer.init, abstract)
        shardings = (self._state_shardings(abstract), self._state_shardings(opt_abstract))
        rng = jax.random.PRNGKey(self.config.seed)
        if resuming:  # nothing is allocated on the devices for the state that the checkpoint replaces
            targets = [jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
                       for tree, shard in ((abstract, shardings[0]), (opt_abstract, shardings[1]))]
            rng_target = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=self._shardings[0])
            return checkpoints.restore_latest(manager, targets[0], targets[1], rng_target)
        trainable = sharding.place(host, shardings[0])
        del host
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings[1])(trainable)
        return 0, trainable, opt_state, self._replicate(rng)

    def train(self, stop_after: int | None = None) -> str:
        """Run to `config.steps` (or stop once `stop_after` steps are done, as an interruption would: no export).
        SIGTERM (a preempted job) ends the run the same way after the current step, with a checkpoint saved.
        Returns OUT."""
        from tqdm.auto import tqdm

        config = self.config
        self._check_before_training()
        resuming = self._prepare_out()
        manager = checkpoints.manager(self._path(CHECKPOINTS))
        if resuming and manager.latest_step() is None:
            raise ValueError(f"{self._name('resume')}: no checkpoint under {self._path(CHECKPOINTS)}")
        start, trainable, opt_state, rng = self._initial_state(manager, resuming)
        if resuming and self.is_primary:
            checkpoints.trim_loss_log(self._path(LOSS_LOG), start)
        frozen_host = self._frozen()
        frozen = sharding.place(frozen_host, self._state_shardings(frozen_host))
        del frozen_host
        end = config.steps if stop_after is None else min(config.steps, stop_after)
        bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, desc=self._description(),
                   disable=not (config.progress and self.is_primary))
        preemption = checkpoints.Preemption()
        done = start
        try:
            with open(self._path(LOSS_LOG), "a") if self.is_primary else contextlib.nullcontext() as log:
                args = self._step_args(start) if start < end else None
                step_fn = self._compile_step((trainable, opt_state, frozen, *args, step_key(rng, start))) if args else None
                for step in range(start, end):
                    trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, *args, step_key(rng, step))
                    # The next batch is prepared on the host while the devices run this step.
                    args = self._step_args(step + 1) if step + 1 < end else None
                    loss = float(loss.addressable_data(0))
                    done = step + 1
                    if log is not None:
                        log.write(json.dumps({"step": done, "loss": loss, "time": round(time.time(), 3)}) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                    if not math.isfinite(loss):
                        raise ValueError(f"{self._name('learning_rate')}: the loss became {loss} at step {done} "
                                         f"(latest checkpoint: {manager.latest_step()}); try a lower learning rate")
                    stopping = preemption.reached(done)
                    if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end or stopping:
                        checkpoints.save(manager, done, trainable, opt_state, rng)
                    if stopping:
                        end = done
                        bar.write(f"stopped by SIGTERM after step {done}; the same command (or --resume) continues")
                        break
                    if config.preview_every and done % config.preview_every == 0:
                        self.preview(trainable, done)
        finally:
            preemption.close()
            bar.close()
            manager.wait_until_finished()
            manager.close()
        self.trainable, self.opt_state, self.frozen_state = trainable, opt_state, frozen  # the final state, for inspection
        self.stopped_at = done
        if done == config.steps:
            self.export(self._exported(trainable, opt_state))
        return self.out

    def _exported(self, trainable, opt_state):
        """The weights to export (the trained ones; EMA weights where the optimizer keeps them)."""
        return trainable


class SubjectFinetuner(Trainer):
    """Fine-tunes `model` (a `ConvertedModel`) on the images of `config.images`. `pipeline`: an already built
    `FlaxBlipDiffusionPipeline` of the same model (saves compiling the Q-Former again)."""

    def __init__(self, model: ConvertedModel, config: FinetuneConfig, pipeline=None, names: dict | None = None):
        from ..pipelines import FlaxBlipDiffusionPipeline

        config.validate(names)
        self.model, self.config = model, config
        self.names = names or {}
        self.subject = data.normalize_subject(config.subject)
        self.paths = data.list_images(config.images, self._name("images"))
        # The pipeline serves the subject encoder and previews; its params are the trainer's (none allocated here).
        self.pipeline = pipeline if pipeline is not None else FlaxBlipDiffusionPipeline(model)
        self._check_resolution(model, config.resolution)
        self.out = os.path.abspath(config.out)
        # LoRA fine-tuning (training/lora.py): the adapted modules, {component: {name: (Flax path, kernel shape)}}.
        self.lora_modules = lora.lora_modules(model.params, config, self._name) if config.lora_rank else None
        self.loss, self.optimizer, self.train_step = cached_train_step(
            model.configs, self.pipeline.ctx_begin_pos, config.compute_dtype, config.remat,
            float(config.learning_rate), float(config.weight_decay),
            lora.alpha_of(config) / config.lora_rank if config.lora_rank else None)
        budget = self.pipeline.max_text_length - self.pipeline.num_query_tokens
        # LAVIS tokenizes the caption without padding and without prompt repetition at training time.
        self.input_ids = self.pipeline.tokenizer([data.caption(self.subject)], padding="do_not_pad", truncation=True,
                                                 max_length=budget, return_tensors="np").input_ids.astype(np.int32)
        self._setup_devices(config.devices, config.batch_size)
        self.targets = None  # loaded on first use
        self._input_ids = None

    run_kind = "fine-tuning"

    def _description(self) -> str:
        return f"fine-tuning {self.subject!r} on {self.num_devices} device(s)"

    def _check_before_training(self) -> None:
        lora.check_resumed_rank(self._path(CONFIG_FILE), self.config, self._name)
        if self.config.preview_every and self.config.resolution % self.pipeline.size_multiple:
            raise ValueError(f"{self._name('preview_every')}: previews need {self._name('resolution')} to be a "
                             f"multiple of {self.pipeline.size_multiple}")

    def _host_state(self, resuming: bool) -> dict:
        emb_shape = (1, self.pipeline.num_query_tokens, self.pipeline.text_encoder.config.hidden_size)
        return self.initial_trainable(np.zeros(emb_shape, np.float32) if resuming else None)

    def _frozen(self) -> dict:
        return self.frozen()

    def _step_args(self, step: int) -> tuple:
        if self._input_ids is None:
            self._input_ids = self._replicate(self.input_ids)
        return self._shard_batch(self.batch(step)), self._input_ids

    # ------------------------------------------------------------------ state

    def subject_embeddings(self, chunk: int = 8) -> np.ndarray:
        """(1, Q, D): mean of the Q-Former subject embeddings over all subject images (LAVIS `before_training`)."""
        total = None
        for start in range(0, len(self.paths), chunk):
            paths = self.paths[start : start + chunk]
            emb = np.asarray(self.pipeline.encode_subject(paths, [self.subject] * len(paths), self.model.params), np.float64)
            total = emb.sum(0) if total is None else total + emb.sum(0)
        return (total / len(self.paths))[None].astype(np.float32)

    def initial_trainable(self, subject_embeddings=None) -> dict:
        """Host (numpy, float32) tree of what is trained: {"unet", "subject_embeddings", ["text_encoder"]}; with
        LoRA {"unet_lora", "subject_embeddings", ["text_encoder_lora"]}."""
        params = self.model.params
        emb = self.subject_embeddings() if subject_embeddings is None else subject_embeddings
        if self.lora_modules is not None:
            return {**lora.initial_factors(self.lora_modules, self.config.lora_rank, self.config.seed),
                    "subject_embeddings": np.asarray(emb, np.float32)}
        trainable = {"unet": params["unet"], "subject_embeddings": emb}
        if self.config.train_text_encoder:
            trainable["text_encoder"] = params["text_encoder"]
        return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), trainable)

    def frozen(self) -> dict:
        """Host tree of the frozen params the step needs (the VAE, and the text encoder unless it is trained; with
        LoRA the UNet and the text encoder too, the base the factors are merged into)."""
        names = ("vae",) if self.config.train_text_encoder else ("vae", "text_encoder")
        names += ("unet",) if self.lora_modules is not None else ()
        return {k: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), self.model.params[k]) for k in names}

    def batch(self, step: int) -> np.ndarray:
        if self.targets is None:
            self.targets = data.load_targets(self.paths, self.config.resolution, self._name("images"))
        return self.targets[data.batch_indices(self.config.seed, step, self.config.batch_size, len(self.paths))]

    # ------------------------------------------------------------------ outputs

    def export(self, trainable) -> str:
        """Write the fine-tuned model into OUT (loadable with `FlaxBlipDiffusionPipeline.from_pretrained(OUT)`); with
        LoRA the adapter, the subject embeddings and a manifest naming the base (training/lora.py)."""
        if self.lora_modules is not None:
            return lora.export_lora(self.out, trainable, self.config)
        params = dict(self.model.params)
        host = jax.device_get(trainable)
        params["unet"] = host["unet"]
        if "text_encoder" in host:
            params["text_encoder"] = host["text_encoder"]
        model = dataclasses.replace(self.model, params=params,
                                    subject_embeddings=np.asarray(host["subject_embeddings"], np.float32))
        return write_converted_into(model, self.out)

    def preview(self, trainable, step: int) -> str:
        if self.lora_modules is not None:
            trainable = {**lora.merged_params(self.model.params, trainable, self.config),
                         "subject_embeddings": trainable["subject_embeddings"]}
        params = {"text_encoder": trainable.get("text_encoder", self.model.params["text_encoder"]),
                  "unet": trainable["unet"], "vae": self.model.params["vae"],
                  "scheduler": self.pipeline.scheduler.create_state()}
        size = self.config.resolution
        out = self.pipeline(self.config.preview_prompt, None, None, self.subject, params=params,
                            subject_embeddings=trainable["subject_embeddings"], prng_seed=jax.random.PRNGKey(self.config.seed),
                            height=size, width=size, num_inference_steps=self.config.preview_steps)
        os.makedirs(self._path(PREVIEWS), exist_ok=True)
        path = self._path(PREVIEWS, f"step-{step:04d}.png")
        out.images[0].save(path)
        return path


def finetune(model: ConvertedModel, config: FinetuneConfig, pipeline=None) -> str:
    """Fine-tune and export; returns OUT."""
    return SubjectFinetuner(model, config, pipeline=pipeline).train()
