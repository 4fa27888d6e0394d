"""`evaluate`: generate DreamBench over every device and process, then score it (DINO, CLIP-I, CLIP-T).

    settings = EvaluationSettings(model="blipdiffusion-flax", dreambench="dreambooth/dataset", out="eval")
    results = evaluate(settings)          # results.json's content in process 0, None elsewhere

Each process takes its share of the jobs (jobs.py), generates the missing ones in batches sharded over its
local devices (`mesh=`), writes each image as OUT/images/SUBJECT/PP-I.png (whole or not at all), then scores
its share; process 0 gathers every process's scores (`process_allgather`), so OUT need not be one disk
shared by all hosts. OUT/config.json records every setting; a later run into the same OUT must use the same
generation settings, and then makes only the missing images (scoring settings such as --clip may change:
the images are rescored).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from . import report
from .dreambench import DreamBench, load_dreambench
from .jobs import Job, batches, job_latents, make_jobs, pending, process_share
from .metrics import DEFAULT_DINO, load_metric_model, real_image_scores, subject_scores

PROMPT_TEMPLATE = "a {class} {prompt}"
# --scheduler: the model's own (PNDM for BLIP-Diffusion) or a deterministic diffusers Flax scheduler built on
# the model's noise schedule. No DDPM: its step noise is drawn per batch, so an image would depend on its batch.
SCHEDULERS = {"pndm": None, "ddim": "DDIMScheduler", "dpm-solver": "DPMSolverMultistepScheduler",
              "euler": "EulerDiscreteScheduler"}
# Settings an image depends on: a run into an OUT made with others would mix two experiments.
GENERATION_KEYS = ("model", "finetuned", "steps", "guidance", "seed", "scheduler", "reference", "height", "width",
                   "negative_prompt", "dtype", "prompt_template")


@dataclasses.dataclass
class EvaluationSettings:
    model: str
    dreambench: str
    out: str
    images_per_prompt: int = 4
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    scheduler: str = "pndm"
    subjects: tuple | None = None
    reference: str = "first"  # "first": the subject's first photo; "all": its photos' embeddings averaged
    finetuned: str | None = None  # a path with {subject}: one fine-tuned model per subject
    clip: str = "ViT-B-32"
    dino: str = DEFAULT_DINO
    real_images: bool = False  # also score the real photos against each other
    height: int = 512
    width: int = 512
    negative_prompt: str = ""
    dtype: str = "float32"
    devices: int | None = None  # local devices to use (default: all)
    batch_per_device: int = 1
    attention: str = "auto"  # the UNet's attention kernel (see FlaxBlipDiffusionPipeline.from_pretrained)
    progress: bool = True

    def validate(self, flags: dict | None = None) -> None:
        """ValueError/TypeError naming the flag (`flags`: field -> CLI flag) for any bad value."""
        name = (flags or {}).get
        for field in ("images_per_prompt", "steps", "height", "width", "batch_per_device"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name(field, field)} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name(field, field)}={value} must be at least 1")
        if self.devices is not None and (not isinstance(self.devices, int) or self.devices < 1):
            raise ValueError(f"{name('devices', 'devices')}={self.devices} must be at least 1")
        if not np.isfinite(self.guidance):
            raise ValueError(f"{name('guidance', 'guidance')}={self.guidance} must be finite")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"{name('scheduler', 'scheduler')}: one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        if self.reference not in ("first", "all"):
            raise ValueError(f"{name('reference', 'reference')}: 'first' or 'all', not {self.reference!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"{name('dtype', 'dtype')}: 'float32' or 'bfloat16', not {self.dtype!r}")
        if self.finetuned is not None and "{subject}" not in self.finetuned:
            raise ValueError(f"{name('finetuned', 'finetuned')}: {self.finetuned!r} must contain {{subject}}, e.g. ft/{{subject}}")
        if self.out and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"{name('out', 'out')}: {self.out} is a file, not a folder")


def _config(settings: EvaluationSettings, bench: DreamBench) -> dict:
    """OUT/config.json: every setting, the reference photo(s) and the pipeline's inputs for each prompt."""
    import jax

    fields = dataclasses.asdict(settings)
    for transient in ("out", "progress", "devices", "batch_per_device", "attention"):
        fields.pop(transient)
    references = {s.name: [os.path.relpath(p, bench.root) for p in (s.images if settings.reference == "all" else s.images[:1])]
                  for s in bench.subjects}
    if settings.finetuned:
        references = {name: f"learned by {settings.finetuned.format(subject=name)} (else {refs})" for name, refs in references.items()}
    return {
        **fields,
        "subjects": [s.name for s in bench.subjects],
        "dreambench": bench.root,
        "prompt_template": PROMPT_TEMPLATE,
        "prompt_building": "the pipeline's own: 'a {target} {prompt}' repeated prompt_reps=20 times (diffusers' "
                           "prompt amplification); DreamBooth's 'a ADJ {0} {1} ...' gives target 'ADJ CLASS'",
        "seeding": "job latents = normal(fold_in(PRNGKey(seed), crc32('SUBJECT/PROMPT/IMAGE') & 0x7fffffff))",
        "references": references,
        "prompts": {s.name: [{"template": p.template, "target": p.target, "prompt": p.prompt, "text": p.text}
                             for p in s.prompts] for s in bench.subjects},
        "class": {s.name: s.class_name for s in bench.subjects},
        "devices": {"processes": jax.process_count(), "local_devices": settings.devices or jax.local_device_count(),
                    "batch_per_device": settings.batch_per_device, "platform": jax.default_backend()},
    }


def _check_resume(out: str, config: dict) -> None:
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f)
    differ = [key for key in GENERATION_KEYS if before.get(key) != config.get(key)]
    if differ:
        key = differ[0]
        raise ValueError(f"--out: {out} holds images made with {key}={before.get(key)!r}, not {config.get(key)!r}; "
                         f"use a new --out (or the same settings to resume)")


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def build_scheduler(name: str, model_config: dict):
    """The `--scheduler` on the model's own noise schedule (None: the model's scheduler)."""
    from ..pipelines.pipeline_blip_diffusion import scheduler_from_config

    cls = SCHEDULERS[name]
    if cls is None:
        return None
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "set_alpha_to_one", "steps_offset", "timestep_spacing")
    return scheduler_from_config({"_class_name": cls, **{k: v for k, v in model_config.items() if k in keep}})


def load_pipeline(model: str, scheduler: str = "pndm", dtype: str = "float32", attention: str = "auto"):
    """(pipeline, params) for --model (converted folder, diffusers PyTorch folder or Hub id) with --scheduler."""
    import jax.numpy as jnp

    from ..checkpoint import is_converted_directory, load_converted
    from ..hub import is_hub_id, resolve_hub_model
    from ..pipelines import FlaxBlipDiffusionPipeline

    path = resolve_hub_model(model) if is_hub_id(model) else model
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model: no directory {model!r} (and not a Hub id like Salesforce/blipdiffusion)")
    dtype = getattr(jnp, dtype)
    if is_converted_directory(path):
        converted = load_converted(path, dtype=dtype)
    else:
        from convert.pytorch_dir import read_pytorch_directory

        converted = read_pytorch_directory(path)
    return FlaxBlipDiffusionPipeline.from_converted(converted, dtype=dtype, attention=attention,
                                                    scheduler=build_scheduler(scheduler, converted.configs["scheduler"]))


def _finetuned_params(pattern: str, subject: str, pipeline, base_params):
    """The params and learned subject embeddings (or None) of the subject's fine-tuned model (`blipdiff-jax
    finetune`'s output, full or LoRA), which must have the base model's shapes: the same compiled program
    serves every subject."""
    import jax

    from ..checkpoint import is_converted_directory
    from ..lora_files import is_lora_directory

    path = pattern.format(subject=subject)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--finetuned: no fine-tuned model {path} for subject {subject!r}")
    from_pt = not (is_converted_directory(path) or is_lora_directory(path))
    tuned, params = type(pipeline).from_pretrained(path, from_pt=from_pt, dtype=pipeline.dtype)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (np.shape(x), np.dtype(x.dtype)), tree)  # noqa: E731
    for name in ("qformer", "text_encoder", "unet", "vae"):
        if shapes(params[name]) != shapes(base_params[name]):
            raise ValueError(f"--finetuned: {path}'s {name} is not shaped as --model's")
    params["scheduler"] = base_params["scheduler"]
    return params, tuned.subject_embeddings


def _write_image(array: np.ndarray, path: str, fields: dict) -> None:
    """A PNG written whole or not at all (a stopped run leaves no half image that would count as done)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_text(key, str(value))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def _generate(settings: EvaluationSettings, todo: list[Job], done: int, total: int, pipeline, params, log) -> None:
    """Make the images of `todo`, batch by batch over the local devices."""
    import jax
    from jax.sharding import Mesh

    from ..pipelines import placement

    local = jax.local_devices()
    count = settings.devices or len(local)
    if count > len(local):
        raise ValueError(f"--devices={count}: this process has {len(local)} devices")
    mesh = Mesh(np.array(local[:count]), ("data",))
    size = count * settings.batch_per_device
    shape = (pipeline.unet.in_channels, settings.height // pipeline.latent_factor, settings.width // pipeline.latent_factor)
    # Without --finetuned one set of params serves every subject, placed once; with it, batches hold one
    # subject each and its model's params are placed when its first batch comes.
    # Placed with the mesh's own sharding even when equivalent to theirs (params on one device, a mesh of one):
    # every subject's params then meet the same compiled program.
    replicated = placement.replicated_on(mesh)
    current = {"subject": None, "params": None if settings.finetuned else jax.device_put(params, replicated)}
    embeddings = {}

    def subject_inputs(subject):
        if settings.finetuned and current["subject"] != subject.name:
            current["params"] = None  # the previous subject's params leave the devices first
            subject_params, learned = _finetuned_params(settings.finetuned, subject.name, pipeline, params)
            current.update(subject=subject.name, params=jax.device_put(subject_params, replicated))
            if learned is not None:
                embeddings[subject.name] = np.asarray(learned, np.float32).reshape((-1,) + learned.shape[-2:])[:1]
        if subject.name not in embeddings:
            refs = subject.images if settings.reference == "all" else subject.images[:1]
            encoded = pipeline.encode_subject(list(refs), [subject.class_name] * len(refs), current["params"])
            embeddings[subject.name] = np.asarray(encoded, np.float32).mean(axis=0, keepdims=True)
        return current["params"], embeddings[subject.name]

    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, desc="generating DreamBench", unit="image", dynamic_ncols=True)
    try:
        for batch in batches(todo, size, by_subject=bool(settings.finetuned)):
            padded = batch + [batch[-1]] * (size - len(batch))
            inputs = [subject_inputs(job.subject) for job in padded]
            out = pipeline(
                [job.prompt.prompt for job in padded], None, None, [job.prompt.target for job in padded],
                params=inputs[-1][0], latents=job_latents(settings.seed, padded, shape),
                subject_embeddings=np.concatenate([embeds for _, embeds in inputs]),
                guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                num_inference_steps=settings.steps, neg_prompt=settings.negative_prompt, output_type="np", mesh=mesh)
            for job, image in zip(batch, out.images):
                _write_image(image, job.path(settings.out), {"prompt": job.prompt.text, "subject": job.subject.name,
                                                             "job": job.name, "seed": settings.seed, "software": "blipdiff-jax evaluate"})
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def _score(settings, jobs: list[Job], dino, clip) -> np.ndarray:
    """(len(jobs), 3) float32: each job's DINO, CLIP-I and CLIP-T, read back from its PNG."""
    from PIL import Image

    scores = np.zeros((len(jobs), 3), np.float32)
    by_subject: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_subject.setdefault(job.subject.name, []).append(i)
    for rows in by_subject.values():
        images = []
        for i in rows:
            with Image.open(jobs[i].path(settings.out)) as image:
                images.append(image.convert("RGB"))
        texts = [jobs[i].prompt.text for i in rows]
        scores[rows] = subject_scores(dino, clip, images, texts, jobs[rows[0]].subject.images)
    return scores


def _gathered(scores: np.ndarray, jobs: list[Job], share: list[Job]) -> np.ndarray | None:
    """Every job's scores in process 0 (None elsewhere): each process fills the rows of its share."""
    import jax

    full = np.full((len(jobs), 3), np.nan, np.float32)
    full[[job.index for job in share]] = scores
    if jax.process_count() == 1:
        return full
    from jax.experimental.multihost_utils import process_allgather

    every = np.asarray(process_allgather(full))  # (processes, jobs, 3)
    if jax.process_index() != 0:
        return None
    return np.stack([every[job.index % len(every), job.index] for job in jobs])


def evaluate(settings: EvaluationSettings, *, pipeline=None, params=None, dino=None, clip=None, log=print,
             flags: dict | None = None):
    """Generate what OUT lacks of this process's share, score it, and in process 0 write results.json and
    results.md and return their content (None in other processes). `pipeline`/`params`, `dino`/`clip`
    (`MetricModel`s): already loaded ones instead of loading --model, --dino and --clip."""
    import jax

    settings.validate(flags)
    bench = load_dreambench(settings.dreambench, settings.subjects)
    jobs = make_jobs(bench, settings.images_per_prompt)
    config = _config(settings, bench)
    config.update({name: model.name for name, model in (("dino", dino), ("clip", clip)) if model is not None})
    os.makedirs(settings.out, exist_ok=True)
    _check_resume(settings.out, config)
    _write_json(os.path.join(settings.out, "config.json"), config)
    process, processes = jax.process_index(), jax.process_count()
    share = process_share(jobs, process, processes)
    todo = pending(share, settings.out)
    log(f"process {process}/{processes}: {len(share)} of {len(jobs)} images, {len(share) - len(todo)} already in "
        f"{settings.out}, {len(todo)} to generate")
    if todo:
        if pipeline is None:
            pipeline, params = load_pipeline(settings.model, settings.scheduler, settings.dtype, settings.attention)
        _generate(settings, todo, len(share) - len(todo), len(share), pipeline, params, log)
    dino = dino or load_metric_model(settings.dino, "dino")
    clip = clip or load_metric_model(settings.clip, "clip")
    scores = _gathered(_score(settings, share, dino, clip), jobs, share)
    if scores is None:
        return None
    rows = [{"subject": job.subject.name, "class": job.subject.class_name, "prompt_index": job.prompt.index,
             "prompt_key": job.prompt.key, "prompt": job.prompt.text, "image": job.image,
             "path": os.path.relpath(job.path(settings.out), settings.out),
             "dino": float(row[0]), "clip_i": float(row[1]), "clip_t": float(row[2])} for job, row in zip(jobs, scores)]
    real = real_image_scores([s.images for s in bench.subjects], dino, clip) if settings.real_images else None
    results = report.summarise(rows, config, real)
    report.write_results(settings.out, results)
    return results
