"""`blipdiff-jax finetune`: subject fine-tuning from the command line.

    blipdiff-jax finetune --model DIR --images dog/ --subject dog --out dog-model [--steps 40] [--batch-size 3]

Importing this module loads nothing beyond argparse; the trainer is imported when `run_finetune` runs.
"""

from __future__ import annotations

import os
import warnings

# CLI flag of each FinetuneConfig field, so errors name what the user typed.
FLAGS = {field: "--" + field.replace("_", "-") for field in (
    "images", "subject", "out", "steps", "batch_size", "learning_rate", "weight_decay", "resolution",
    "train_text_encoder", "checkpoint_every", "resume", "seed", "preview_every", "preview_prompt", "preview_steps",
    "compute_dtype", "remat", "devices", "lora_rank", "lora_alpha", "lora_text_encoder", "lora_target_modules")}


def add_finetune_parser(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model on a few images of one subject (LAVIS subject fine-tuning)",
        description="Fine-tune the UNet (and optionally the text encoder) and the subject embeddings on the images "
                    "of --images, all showing --subject. --out becomes a model directory (load it with "
                    "FlaxBlipDiffusionPipeline.from_pretrained(OUT)) that also holds checkpoints/, loss.jsonl and "
                    "previews/.")
    p.add_argument("--model", required=True, help="converted directory (python -m convert), diffusers PyTorch directory, or Hub id")
    p.add_argument("--images", required=True, help="folder of images of the subject (other files are skipped)")
    p.add_argument("--subject", required=True, help="category word of the subject, e.g. dog")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier run's with --resume)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=3, help="images per step (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate, constant (default: 5e-6; with --lora-rank 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=512, help="training image size in pixels (default: %(default)s)")
    p.add_argument("--train-text-encoder", action="store_true", help="also train the CLIP text encoder")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (default: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--seed", type=int, default=42, help="seed of the data order, noise and timesteps (default: %(default)s)")
    p.add_argument("--preview-every", type=int, default=0, help="write OUT/previews/step-XXXX.png every N steps (default: never)")
    p.add_argument("--preview-prompt", default="", help="prompt of the previews, after 'a SUBJECT' (default: none)")
    p.add_argument("--preview-steps", type=int, default=25, help="denoising steps of a preview (default: %(default)s)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute precision; weights stay float32 (default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="recompute UNet block activations in the backward pass (less memory)")
    p.add_argument("--devices", type=int, default=None, help="data-parallel devices (default: as many as divide --batch-size)")
    p.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    lora = p.add_argument_group("LoRA", "train rank-R factors of the UNet's attention projections (and the subject "
                                "embeddings) instead of the UNet: --out gets a LoRA adapter of a few MB that names "
                                "--model as its base (from_pretrained(OUT) loads both)")
    lora.add_argument("--lora-rank", type=int, default=0, metavar="R", help="LoRA rank (default: 0, full fine-tuning)")
    lora.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default: the rank)")
    lora.add_argument("--lora-text-encoder", action="store_true", help="also adapt the text encoder's attention")
    lora.add_argument("--lora-target-modules", default=None, metavar="NAMES",
                      help="comma-separated UNet modules to adapt, PyTorch names (default: to_q,to_k,to_v,to_out.0)")
    return p


def _module_list(text):
    return None if text is None else tuple(name.strip() for name in text.split(",") if name.strip())


def run_finetune(args) -> str:
    """Fine-tune as `args` says; returns OUT. Bad arguments raise ValueError/TypeError/FileNotFoundError naming the flag."""
    import jax.numpy as jnp

    from .data import list_images
    from .trainer import FinetuneConfig, SubjectFinetuner

    config = FinetuneConfig(
        images=args.images, subject=args.subject, out=args.out, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, resolution=args.resolution,
        train_text_encoder=args.train_text_encoder, checkpoint_every=args.checkpoint_every, resume=args.resume,
        seed=args.seed, preview_every=args.preview_every, preview_prompt=args.preview_prompt,
        preview_steps=args.preview_steps, compute_dtype=getattr(jnp, args.compute_dtype), remat=args.remat,
        devices=args.devices, progress=not args.quiet, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_text_encoder=args.lora_text_encoder, base_model=_base_model(args.model),
        **({"lora_target_modules": _module_list(args.lora_target_modules)} if args.lora_target_modules is not None else {}))
    config.validate(FLAGS)
    with warnings.catch_warnings():  # fail before loading the model; the trainer warns about skipped files
        warnings.simplefilter("ignore")
        list_images(args.images, "--images")
    model = _load_model(args.model, args.qformer_tokenizer)  # downloaded and converted once for a Hub id
    out = SubjectFinetuner(model, config, names=FLAGS).train()
    kind = "LoRA adapter" if config.lora_rank else "fine-tuned model"
    print(f"{kind} in {out}: FlaxBlipDiffusionPipeline.from_pretrained({out!r})")
    return out


def _base_model(model: str) -> str:
    """--model as a LoRA manifest names it: a local directory as an absolute path, a Hub id as it is."""
    return os.path.abspath(model) if os.path.isdir(model) else model


PRETRAIN_FLAGS = {field: "--" + field.replace("_", "-") for field in (
    "out", "data", "backgrounds", "toy", "steps", "batch_size", "learning_rate", "warmup_steps", "schedule",
    "weight_decay", "max_grad_norm", "ema_decay", "train", "caption_dropout", "subject_dropout", "prompt_reps",
    "resolution", "compute_dtype", "remat", "devices", "checkpoint_every", "resume", "seed", "preview_every",
    "preview_steps", "mesh", "grad_accum", "device_memory_gib")}


def add_pretrain_parser(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="pre-train the subject representation (the paper's stage 2), or a toy model with --toy",
        description="Stage-2 pre-training (prompted context generation): the Q-Former, projection, text encoder and "
                    "UNet learn to redraw the subject of a reference image (the subject pasted on a random "
                    "background) in the context its caption describes. --out becomes a model directory "
                    "(FlaxBlipDiffusionPipeline.from_pretrained(OUT)) with checkpoints/, loss.jsonl and previews/. "
                    "With --toy: the whole toy-world recipe (toy model, its VAE, then pre-training) in under 30 "
                    "minutes on a CPU.")
    p.add_argument("--model", default=None, help="model to start from: converted directory, PyTorch directory or Hub id (not with --toy)")
    p.add_argument("--data", default=None, help="JSONL manifest, or folder with metadata.jsonl: file_name, category, caption[, mask]")
    p.add_argument("--backgrounds", default=None, help="folder of background images for the references")
    p.add_argument("--toy", action="store_true", help="train the toy model on the toy world (no --model/--data)")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier run's with --resume)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 10000; --toy: its recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step over all devices (default: 16; --toy: 32)")
    p.add_argument("--learning-rate", type=float, default=None, help="peak AdamW learning rate (default: 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 500)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=None, help="after warm-up (default: cosine to 10%%)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping by global norm (default: 1.0)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights, exported instead (default: 0, off)")
    p.add_argument("--train", default=None, help="comma-separated groups to train among qformer,text_encoder,unet,vision "
                   "(default: qformer,text_encoder,unet)")
    p.add_argument("--caption-dropout", type=float, default=None, help="probability of the unconditional context (default: 0.1)")
    p.add_argument("--subject-dropout", type=float, default=None, help="probability of zeroed subject embeddings (default: 0.1)")
    p.add_argument("--prompt-reps", type=int, default=None, help="prompt repetitions, as generation's (default: 20)")
    p.add_argument("--resolution", type=int, default=None, help="target image size in pixels (default: 512; --toy: 32)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32", help="(default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="recompute UNet block activations in the backward pass")
    p.add_argument("--devices", type=int, default=None, help="data-parallel devices (default: as many as divide --batch-size)")
    p.add_argument("--mesh", default=None, help="device mesh 'data=D,fsdp=F': parameters, gradients and optimizer state "
                   "sharded over fsdp, the batch over both (default: all devices on data)")
    p.add_argument("--grad-accum", type=int, default=None, help="microbatches per step, gradients summed (default: 1)")
    p.add_argument("--plan", action="store_true", help="compile the step for --mesh and --batch-size, print the "
                   "per-device memory plan and exit")
    p.add_argument("--device-memory-gib", type=float, default=None, help="per-device memory budget the plan is checked "
                   "against (default: what the device reports; none on CPU)")
    p.add_argument("--distributed", action="store_true", help="multi-process run: jax.distributed.initialize() "
                   "(TPU pods, Slurm and JAX_COORDINATOR_ADDRESS are detected; or --coordinator-address ...)")
    p.add_argument("--coordinator-address", default=None, help="coordinator host:port of a multi-process run (implies --distributed)")
    p.add_argument("--num-processes", type=int, default=None, help="processes of a multi-process run (with --coordinator-address)")
    p.add_argument("--process-id", type=int, default=None, help="this process's index (with --coordinator-address)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save a checkpoint every N steps (default: 1000; --toy: 200)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, noise and (--toy) the model (default: %(default)s)")
    p.add_argument("--preview-every", type=int, default=0, help="write OUT/previews/step-XXXX.png every N steps")
    p.add_argument("--preview-steps", type=int, default=None, help="denoising steps of a preview (default: 25)")
    p.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_pretrain(args) -> str | None:
    """Pre-train as `args` says; returns OUT (None after --plan, or a run stopped by SIGTERM). Bad arguments
    raise ValueError/TypeError naming the flag."""
    import jax.numpy as jnp

    from .pretrain import PretrainConfig, SubjectPretrainer

    start_distributed(args)
    given = {field: getattr(args, field) for field in (
        "steps", "batch_size", "learning_rate", "warmup_steps", "schedule", "weight_decay", "max_grad_norm",
        "ema_decay", "caption_dropout", "subject_dropout", "prompt_reps", "resolution", "checkpoint_every",
        "preview_steps", "grad_accum", "device_memory_gib") if getattr(args, field) is not None}
    if args.train is not None:
        given["train"] = tuple(g.strip() for g in args.train.split(",") if g.strip())
    common = dict(compute_dtype=getattr(jnp, args.compute_dtype), remat=args.remat, devices=args.devices,
                  preview_every=args.preview_every, mesh=args.mesh)
    if args.plan and args.toy:
        raise ValueError("--plan: plans a --model's step (the toy recipe is planned by running it)")
    if args.toy:
        for flag, value in (("--model", args.model), ("--data", args.data), ("--backgrounds", args.backgrounds)):
            if value is not None:
                raise ValueError(f"{flag}: not with --toy (the toy recipe builds its model and data)")
        if "resolution" in given:
            raise ValueError("--resolution: the toy world is fixed at 32 pixels")
        from .toy import pretrain_toy

        out = pretrain_toy(args.out, seed=args.seed, resume=args.resume, progress=not args.quiet, names=PRETRAIN_FLAGS,
                           checkpoint_every=given.pop("checkpoint_every", 200), **given, **common)
    else:
        if args.model is None:
            raise ValueError("--model: required (or --toy)")
        config = PretrainConfig(out=args.out, data=args.data, backgrounds=args.backgrounds, seed=args.seed,
                                resume=args.resume, progress=not args.quiet,
                                **{"checkpoint_every": 1000, **given}, **common)
        config.validate(PRETRAIN_FLAGS)
        model = _load_model(args.model, args.qformer_tokenizer)
        trainer = SubjectPretrainer(model, config, names=PRETRAIN_FLAGS)
        if args.plan:
            plan = trainer.plan()
            print(plan.line())
            plan.check("--device-memory-gib")
            return None  # nothing trained, nothing written
        out = trainer.train()
        if trainer.stopped_at < config.steps:
            print(f"stopped at step {trainer.stopped_at}; its checkpoint is in {out}: run the same command to continue")
            return None
    print(f"pre-trained model in {out}: FlaxBlipDiffusionPipeline.from_pretrained({out!r})")
    return out


def start_distributed(args) -> None:
    """jax.distributed.initialize() for a multi-process run, before JAX touches a device: with the flags, or
    (--distributed alone) from the environment JAX detects (TPU pod slices, Slurm, JAX_COORDINATOR_ADDRESS)."""
    import jax

    given = {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes, "process_id": args.process_id}
    if not (args.distributed or args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        for flag, value in (("--num-processes", args.num_processes), ("--process-id", args.process_id)):
            if value is not None:
                raise ValueError(f"{flag}: only with --coordinator-address (or --distributed)")
        return
    if args.coordinator_address and (args.num_processes is None or args.process_id is None):
        raise ValueError("--coordinator-address: give --num-processes and --process-id with it")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def _load_model(path: str, qformer_tokenizer=None):
    from ..checkpoint import is_converted_directory, load_converted
    from ..hub import is_hub_id, resolve_hub_model

    if not os.path.isdir(path) and not is_hub_id(path):
        raise FileNotFoundError(f"--model: no directory {path!r} (and not a Hub id like Salesforce/blipdiffusion)")
    try:
        if is_hub_id(path):
            return load_converted(resolve_hub_model(path, qformer_tokenizer=qformer_tokenizer))
        if is_converted_directory(path):
            return load_converted(path)
        from convert.pytorch_dir import read_pytorch_directory

        return read_pytorch_directory(path, qformer_tokenizer=qformer_tokenizer)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"--model: {err}") from err
