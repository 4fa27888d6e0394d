"""`blipdiff-jax evaluate`: DreamBench generation and scoring from the command line.

    blipdiff-jax evaluate --model DIR --dreambench dreambooth/dataset --out eval [--images-per-prompt 4] [--steps 50]

Importing this module loads nothing beyond argparse; JAX starts in `run_evaluate` (after jax.distributed,
when asked for).
"""

from __future__ import annotations

import os

# CLI flag of each EvaluationSettings field, so errors name what the user typed.
FLAGS = {field: "--" + field.replace("_", "-") for field in (
    "model", "dreambench", "out", "images_per_prompt", "steps", "guidance", "seed", "scheduler", "subjects",
    "reference", "finetuned", "clip", "dino", "real_images", "height", "width", "negative_prompt", "dtype", "devices",
    "batch_per_device", "attention")}


def add_evaluate_parser(subparsers):
    from .metrics import DEFAULT_DINO
    from .runner import SCHEDULERS

    p = subparsers.add_parser(
        "evaluate", help="generate DreamBench and score it with DINO, CLIP-I and CLIP-T",
        description="Generate DreamBooth's benchmark (every subject x prompt x --images-per-prompt, each image seeded "
                    "by its job) over all devices and processes, resuming what --out already holds, then score it: "
                    "OUT/images/, OUT/config.json, OUT/results.json and OUT/results.md (the paper's rows beside ours).")
    p.add_argument("--model", required=True, help="converted directory, diffusers PyTorch directory, or Hub id")
    p.add_argument("--dreambench", required=True, metavar="DIR",
                   help="DreamBooth's dataset/ folder: one folder per subject and prompts_and_classes.txt")
    p.add_argument("--out", required=True, help="output folder (an earlier run's to resume it)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's noise is folded from it and its job (default: %(default)s)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), default="pndm",
                   help="pndm = the model's own; others on its noise schedule (default: %(default)s)")
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all)")
    p.add_argument("--reference", choices=("first", "all"), default="first",
                   help="the reference of each subject: its first photo, or all its photos' subject embeddings averaged "
                        "(default: %(default)s)")
    p.add_argument("--finetuned", default=None, metavar="DIR_PATTERN",
                   help="fine-tuned model per subject, e.g. 'ft/{subject}' (blipdiff-jax finetune's output): its params "
                        "and learned subject embeddings replace --model's")
    p.add_argument("--clip", default="ViT-B-32", help="CLIP backbone of CLIP-I/CLIP-T: ViT-B-32 (DreamBooth's), ViT-L-14, "
                   "or a CLIPModel folder / Hub id (default: %(default)s)")
    p.add_argument("--dino", default=DEFAULT_DINO, help="DINO ViT folder or Hub id (default: %(default)s)")
    p.add_argument("--real-images", action="store_true", help="also score the real photos against each other (upper bound)")
    p.add_argument("--height", type=int, default=512, help="(default: %(default)s)")
    p.add_argument("--width", type=int, default=512, help="(default: %(default)s)")
    p.add_argument("--negative-prompt", default="", help="(default: none)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default: %(default)s)")
    run = p.add_argument_group("devices and processes")
    run.add_argument("--devices", type=int, default=None, help="local devices per process (default: all)")
    run.add_argument("--batch-per-device", type=int, default=1, help="images per device per call (default: %(default)s)")
    run.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() first (cluster auto-detected: TPU pod, SLURM, ...)")
    run.add_argument("--coordinator-address", default=None, metavar="HOST:PORT", help="jax.distributed by hand: the coordinator")
    run.add_argument("--num-processes", type=int, default=None, help="jax.distributed by hand: how many processes")
    run.add_argument("--process-id", type=int, default=None, help="jax.distributed by hand: this process's index")
    run.add_argument("--attention", default="auto", choices=["auto", "blockwise", "cudnn", "dot_product", "xla"],
                     help="the UNet's attention kernel (default: %(default)s)")
    run.add_argument("--compile-cache", default=None, metavar="DIR", help="JAX persistent compilation cache")
    run.add_argument("--no-compile-cache", action="store_true", help="compile from scratch every run")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def settings_from_args(args):
    from .runner import EvaluationSettings

    subjects = None
    if args.subjects is not None:
        subjects = tuple(name.strip() for name in args.subjects.split(",") if name.strip())
        if not subjects:
            raise ValueError("--subjects: give at least one subject name")
    return EvaluationSettings(
        model=args.model, dreambench=args.dreambench, out=args.out, images_per_prompt=args.images_per_prompt,
        steps=args.steps, guidance=args.guidance, seed=args.seed, scheduler=args.scheduler, subjects=subjects,
        reference=args.reference, finetuned=args.finetuned, clip=args.clip, dino=args.dino, real_images=args.real_images,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt, dtype=args.dtype,
        devices=args.devices, batch_per_device=args.batch_per_device, attention=args.attention, progress=not args.quiet)


def _start_distributed(args) -> None:
    manual = (args.coordinator_address, args.num_processes, args.process_id)
    if any(value is not None for value in manual) and None in manual:
        raise ValueError("--coordinator-address, --num-processes and --process-id: give all three (or --distributed)")
    if not args.distributed and None in manual:
        return
    import jax

    jax.distributed.initialize(*manual) if None not in manual else jax.distributed.initialize()


def run_evaluate(args) -> str:
    """Evaluate as `args` say; returns OUT/results.md (process 0) or OUT (other processes)."""
    settings = settings_from_args(args)
    settings.validate(FLAGS)
    _start_distributed(args)
    import jax

    from .report import markdown
    from .runner import evaluate

    results = evaluate(settings, flags=FLAGS)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    if results is None:
        return os.path.join(settings.out, "images")
    print(markdown(results))
    print(f"CLIP backbone: {results['clip']}; DINO: {results['dino']}")
    return os.path.join(settings.out, "results.md")
