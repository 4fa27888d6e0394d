"""`blipdiff-jax`: subject-driven generation from the command line.

    blipdiff-jax demo --out demo.png
    blipdiff-jax generate --model DIR --image dog.png --subject dog --prompt "swimming underwater" --out out.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blipdiff-jax", description="BLIP-Diffusion in JAX: subject-driven image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prompt", default="on the beach", help="what the subject does or where it is")
    common.add_argument("--out", default="out.png", help="PNG file to write (default: %(default)s)")
    common.add_argument("--steps", type=int, default=None, help="denoising steps")
    common.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    common.add_argument("--height", type=int, default=None, help="image height in pixels")
    common.add_argument("--width", type=int, default=None, help="image width in pixels")
    common.add_argument("--negative-prompt", default="", help="what to steer away from")

    gen = sub.add_parser("generate", parents=[common], help="generate an image of a subject from a reference photo",
                         description="Generate an image of the subject in --image, doing what --prompt says.")
    gen.add_argument("--model", required=True, help="converted directory (python -m convert) or a diffusers PyTorch directory")
    gen.add_argument("--image", required=True, help="reference image file of the subject")
    gen.add_argument("--subject", required=True, help="category word of the subject in --image, e.g. dog")
    gen.add_argument("--target-subject", default=None, help="category to render (default: --subject)")
    gen.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")
    gen.add_argument("--control-image", default=None, metavar="FILE",
                     help="ControlNet conditioning image (structure); the model needs a controlnet (see --controlnet)")
    gen.add_argument("--canny", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                     help="turn --control-image into a canny edge map with these thresholds first (e.g. 30 70)")
    gen.add_argument("--controlnet", default=None, metavar="PATH", help="SD 1.5 ControlNet directory to add to --model")
    gen.add_argument("--controlnet-scale", type=float, default=1.0, help="controlnet_conditioning_scale (default: %(default)s)")

    edit = sub.add_parser("edit", parents=[common], help="edit a subject into a real photo (or a generated one)",
                          description="Replace --original-subject in --image (DDIM-inverted) by the subject of --reference. "
                                      "Writes the reconstruction and the edit side by side.")
    edit.add_argument("--model", required=True, help="converted directory or a diffusers PyTorch directory")
    edit.add_argument("--image", default=None, help="photo to edit (omit for synthetic editing: generate, then edit)")
    edit.add_argument("--reference", required=True, help="reference image of the new subject")
    edit.add_argument("--subject", required=True, help="category word of the subject in --reference, e.g. skirt")
    edit.add_argument("--target-subject", default=None, help="category to render (default: --subject)")
    edit.add_argument("--original-subject", required=True, help="word for what to replace in --image, e.g. dress")
    edit.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: --steps)")
    edit.add_argument("--cross-replace-steps", type=float, default=0.8)
    edit.add_argument("--self-replace-steps", type=float, default=0.4)
    edit.add_argument("--lb-threshold", type=float, default=0.3, help="LocalBlend mask threshold (default: %(default)s)")
    edit.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")

    demo = sub.add_parser("demo", parents=[common], help="offline check of the install with the embedded tiny RANDOM-weight model",
                          description="Generate with the embedded tiny model. Its weights are random: the PNG is noise, "
                                      "which proves the install and the compiled pipeline work, not image quality.")
    demo.add_argument("--image", default=None, help="reference image (default: a synthetic picture)")
    demo.add_argument("--subject", default="dog", help="category word of the subject (default: %(default)s)")
    demo.add_argument("--target-subject", default=None)
    return parser


def _run(args) -> str:
    import jax

    from .pipelines import FlaxBlipDiffusionControlNetPipeline, FlaxBlipDiffusionPipeline

    started = time.perf_counter()
    call_extra = {}
    if args.command == "edit":
        return _edit(args, started)
    if args.command == "demo":
        from . import tiny

        print("blipdiff-jax demo: tiny model with RANDOM weights (checks the install; the image is noise by design)")
        with tempfile.TemporaryDirectory() as workdir:
            pipeline, params = FlaxBlipDiffusionPipeline.from_converted(tiny.build_tiny_model(workdir))
        image = args.image if args.image is not None else tiny.demo_reference_image()
        defaults = {"height": 64, "width": 64, "steps": 10}
    else:
        from .checkpoint import is_converted_directory

        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"--model: no directory {args.model!r}")
        from_pt = not is_converted_directory(args.model)
        kwargs = {"qformer_tokenizer": args.qformer_tokenizer} if from_pt else {}
        if args.canny is not None and args.control_image is None:
            raise ValueError("--canny: needs --control-image")
        if args.control_image is not None:
            from .image_processing import canny

            control = args.control_image if args.canny is None else canny(args.control_image, *args.canny)
            pipeline, params = FlaxBlipDiffusionControlNetPipeline.from_pretrained(
                args.model, from_pt=from_pt, controlnet=args.controlnet, **kwargs)
            call_extra = {"conditioning_image": control, "controlnet_conditioning_scale": args.controlnet_scale}
        else:
            if args.controlnet is not None:
                raise ValueError("--controlnet: needs --control-image")
            pipeline, params = _load(args.model, args.qformer_tokenizer)
        image = args.image
        defaults = {"height": 512, "width": 512, "steps": 50}
    loaded = time.perf_counter()
    out = pipeline(
        prompt=args.prompt,
        reference_image=image,
        source_subject_category=args.subject,
        target_subject_category=args.target_subject or args.subject,
        params=params,
        prng_seed=jax.random.PRNGKey(args.seed),
        guidance_scale=args.guidance,
        height=defaults["height"] if args.height is None else args.height,
        width=defaults["width"] if args.width is None else args.width,
        num_inference_steps=defaults["steps"] if args.steps is None else args.steps,
        neg_prompt=args.negative_prompt,
        **call_extra,
    )
    done = time.perf_counter()
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    out.images[0].save(args.out)
    print(f"loaded in {loaded - started:.1f}s, compiled and sampled in {done - loaded:.1f}s")
    return args.out


def _load(model: str, qformer_tokenizer=None):
    from .checkpoint import is_converted_directory
    from .pipelines import FlaxBlipDiffusionPipeline

    if not os.path.isdir(model):
        raise FileNotFoundError(f"--model: no directory {model!r}")
    from_pt = not is_converted_directory(model)
    kwargs = {"qformer_tokenizer": qformer_tokenizer} if from_pt else {}
    return FlaxBlipDiffusionPipeline.from_pretrained(model, from_pt=from_pt, **kwargs)


def _edit(args, started) -> str:
    import jax
    from PIL import Image

    pipeline, params = _load(args.model, args.qformer_tokenizer)
    steps = 50 if args.steps is None else args.steps
    loaded = time.perf_counter()
    out = pipeline.edit(
        args.prompt, args.reference, args.subject, args.target_subject or args.subject, args.original_subject,
        image=args.image, params=params, prng_seed=jax.random.PRNGKey(args.seed), guidance_scale=args.guidance,
        num_inference_steps=steps, num_inversion_steps=steps if args.inversion_steps is None else args.inversion_steps,
        cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
        lb_threshold=args.lb_threshold, neg_prompt=args.negative_prompt,
        height=512 if args.height is None else args.height, width=512 if args.width is None else args.width,
    )
    done = time.perf_counter()
    source, edited = out.images
    pair = Image.new("RGB", (source.width * 2, source.height))
    pair.paste(source, (0, 0))
    pair.paste(edited, (source.width, 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pair.save(args.out)
    print(f"loaded in {loaded - started:.1f}s, compiled and edited in {done - loaded:.1f}s (left: source, right: edit)")
    return args.out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = _run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"blipdiff-jax: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
