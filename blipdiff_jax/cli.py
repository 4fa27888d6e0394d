"""`blipdiff-jax`: subject-driven generation, stylization and editing from the command line.

    blipdiff-jax demo --out demo.png
    blipdiff-jax generate --model DIR --image dog.png --subject dog --prompt "swimming underwater" --out out.png
    blipdiff-jax edit --model DIR --image photo.png --reference skirt.png --subject skirt --original-subject dress
    blipdiff-jax evaluate --model DIR --dreambench dreambooth/dataset --out eval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from . import TOY_GUIDANCE
from .host_memory import tune_host_memory



class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like every other CLI error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="blipdiff-jax",
        description="BLIP-Diffusion in JAX: images of a subject from one reference photo, guided by a prompt.",
        epilog="Run `blipdiff-jax COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = _OneLineParser(add_help=False)
    look = common.add_argument_group("what to make")
    look.add_argument("--prompt", default="on the beach", help="what the subject does or where it is (default: %(default)r)")
    look.add_argument("--negative-prompt", default="", help="what to steer away from")
    look.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; demo: 10)")
    look.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale (default: 7.5; toy model demo: %s)" % TOY_GUIDANCE)
    look.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    look.add_argument("--height", type=int, default=None, help="image height in pixels (default: 512; demo: 64)")
    look.add_argument("--width", type=int, default=None, help="image width in pixels (default: 512; demo: 64)")
    out = common.add_argument_group("output")
    out.add_argument("--out", default="out.png", help="PNG to write; a grid when there are several images (default: %(default)s)")
    out.add_argument("--output-dir", default=None, help="also write every image to this folder, one PNG each")
    out.add_argument("--quiet", action="store_true", help="no progress bars (the run is then one compiled program, "
                     "the one the Python API compiles)")
    run = common.add_argument_group("compilation")
    run.add_argument("--compile-cache", default=None, metavar="DIR",
                     help="JAX persistent compilation cache (default: $BLIPDIFF_JAX_CACHE/jax-cache, ~/.cache/blipdiff-jax/jax-cache)")
    run.add_argument("--no-compile-cache", action="store_true", help="compile from scratch every run")
    run.add_argument("--attention", default="auto", choices=["auto", "blockwise", "cudnn", "dot_product", "xla"],
                     help="attention kernel in the UNet: auto = blockwise on CPU, cuDNN's fused kernel on GPU, "
                          "jax.nn.dot_product_attention on TPU; xla = diffusers' own (default: %(default)s); the CPU "
                          "rewrites of the other layers are on unless BLIPDIFF_JAX_CPU_REWRITES=0")

    many = _OneLineParser(add_help=False)
    many.add_argument("--num-images", type=int, default=1, help="images to make, each from its own noise (default: 1)")

    gen = sub.add_parser("generate", parents=[common, many], help="generate an image of a subject from a reference photo",
                         description="Generate the subject of --image doing what --prompt says; with --control-image, "
                                     "follow that image's structure through a ControlNet (stylization).")
    gen.add_argument("--model", required=True, help="converted directory, diffusers PyTorch directory, or Hub id")
    gen.add_argument("--image", default=None, help="reference image file of the subject (not needed with a fine-tuned "
                     "--model: its learned subject is used)")
    gen.add_argument("--subject", required=True, help="category word of the subject in --image, e.g. dog")
    gen.add_argument("--target-subject", default=None, help="category to render (default: --subject)")
    gen.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")
    control = gen.add_argument_group("ControlNet")
    control.add_argument("--control-image", default=None, metavar="FILE", help="conditioning image (structure)")
    control.add_argument("--canny", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                         help="turn --control-image into a canny edge map first (e.g. 30 70)")
    control.add_argument("--controlnet", default=None, metavar="PATH", help="SD 1.5 ControlNet directory to add to --model")
    control.add_argument("--controlnet-scale", type=float, default=1.0, help="controlnet_conditioning_scale (default: %(default)s)")
    _add_lora_argument(gen)

    edit = sub.add_parser("edit", parents=[common], help="edit a subject into a photo (or into a generated image)",
                          description="Replace --original-subject in --image (DDIM-inverted) by the subject of --reference; "
                                      "without --image, generate then edit. --out gets the source and the edit side by side.")
    edit.add_argument("--model", required=True, help="converted directory, diffusers PyTorch directory, or Hub id")
    edit.add_argument("--image", default=None, help="photo to edit (omit for synthetic editing)")
    edit.add_argument("--reference", required=True, help="reference image of the new subject")
    edit.add_argument("--subject", required=True, help="category word of the subject in --reference, e.g. skirt")
    edit.add_argument("--target-subject", default=None, help="category to render (default: --subject)")
    edit.add_argument("--original-subject", required=True, help="word for what to replace, e.g. dress")
    edit.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: --steps)")
    edit.add_argument("--cross-replace-steps", type=float, default=0.8, help="(default: %(default)s)")
    edit.add_argument("--self-replace-steps", type=float, default=0.4, help="(default: %(default)s)")
    edit.add_argument("--lb-threshold", type=float, default=0.3, help="LocalBlend mask threshold (default: %(default)s)")
    edit.add_argument("--no-placeholder-tokens", dest="placeholder_tokens", action="store_false",
                      help="edited prompt without LAVIS's \"sks\" words; token mapper aligned on the subject embeddings")
    edit.add_argument("--qformer-tokenizer", default=None, help="local BERT tokenizer folder (PyTorch directories only)")
    _add_lora_argument(edit)

    from .training.cli import add_finetune_parser, add_pretrain_parser

    add_finetune_parser(sub)
    add_pretrain_parser(sub)
    from .evaluation.cli import add_evaluate_parser

    add_evaluate_parser(sub)

    demo = sub.add_parser("demo", parents=[common, many], help="subject transfer by the shipped toy model, offline",
                          description="Draw the shipped toy model (blipdiff_jax.TOY_MODEL, pre-trained on the toy world) "
                                      "carrying subjects it never saw in training from a reference picture onto three "
                                      "backgrounds: one PNG, a row per subject. With --image: one generation from that "
                                      "reference. With --tiny: the embedded tiny RANDOM-weight model instead (an install "
                                      "check; its images are noise by design).")
    demo.add_argument("--tiny", action="store_true", help="use the embedded tiny random-weight model (install check)")
    demo.add_argument("--image", default=None, help="reference image (default: the toy transfer picture)")
    demo.add_argument("--subject", default="dog", help="category word of the subject (default: %(default)s)")
    demo.add_argument("--target-subject", default=None)
    return parser


def _add_lora_argument(parser) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge a LoRA (.safetensors: diffusers/peft or kohya; or a LoRA fine-tuning folder) into "
                             "the UNet and text encoder at SCALE (default 1); repeat to stack several")


def _parse_loras(values: list[str]) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] values as (path, scale), each file checked before the model is loaded."""
    from .lora_files import lora_file_path

    loras = []
    for value in values:
        path, scale = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a ':' that belongs to the path
        if not math.isfinite(scale):
            raise ValueError(f"--lora {value}: the scale must be a finite number")
        lora_file_path(path, f"--lora {value}")
        loras.append((path, scale))
    return loras


def _merge_loras(pipeline, params, loras):
    for path, scale in loras:
        params = pipeline.load_lora(params, path, scale=scale)
    return params


class _CompileClock:
    """Sums the time JAX reports for tracing, lowering and compiling (cache hits included), so the CLI can
    say how long compiling and sampling took."""

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs):
        if event.endswith(("backend_compile_duration", "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")):
            self.seconds += duration


def _setup_compile_cache(args):
    import jax

    if getattr(args, "no_compile_cache", False):
        return None
    from .hub import cache_root

    path = getattr(args, "compile_cache", None) or os.path.join(cache_root(), "jax-cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def _load(model: str, qformer_tokenizer=None, pipeline_class=None, **kwargs):
    from .checkpoint import is_converted_directory
    from .hub import is_hub_id
    from .pipelines import FlaxBlipDiffusionPipeline

    pipeline_class = pipeline_class or FlaxBlipDiffusionPipeline
    if not os.path.isdir(model) and not is_hub_id(model):
        raise FileNotFoundError(f"--model: no directory {model!r} (and not a Hub id like Salesforce/blipdiffusion)")
    from_pt = os.path.isdir(model) and not is_converted_directory(model)
    return pipeline_class.from_pretrained(model, from_pt=from_pt, qformer_tokenizer=qformer_tokenizer, **kwargs)


def _check_outputs(args) -> None:
    """Refuse output paths that cannot be written before any work is done."""
    from PIL import Image

    out = args.out
    if os.path.isdir(out):
        raise ValueError(f"--out: {out} is a directory; give an image file name such as out.png")
    Image.init()
    extension = os.path.splitext(out)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise ValueError(f"--out: {out!r} does not end in an image extension that can be written (.png, .jpg, .webp, ...)")
    _check_folder(os.path.dirname(os.path.abspath(out)), "--out")
    if args.output_dir:
        _check_folder(os.path.abspath(args.output_dir), "--output-dir")


def _check_folder(folder: str, flag: str) -> None:
    """`folder` exists as a writable folder, or can be made: its nearest existing ancestor is a writable folder."""
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write in {existing}")


def _metadata_fields(args, settings: dict, index: int) -> dict:
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "image_index": index,
              "model": getattr(args, "model", "embedded tiny random-weight demo model" if getattr(args, "tiny", False)
                               else "toy model (blipdiff_jax.TOY_MODEL)"), "subject": args.subject,
              "target_subject": args.target_subject or args.subject, "guidance": args.guidance}
    fields.update(settings)
    fields["software"] = "blipdiff-jax"
    return {key: value for key, value in fields.items() if value is not None}


def _write_image(picture, path: str, fields: dict) -> None:
    """PNG: the fields as text chunks; JPEG and WebP: as JSON in the EXIF ImageDescription; other formats hold
    none, which is said."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if kind == "PNG":
        info = PngInfo()
        for key, value in fields.items():
            info.add_text(key, str(value))
        picture.save(path, pnginfo=info)
    elif kind in ("JPEG", "WEBP"):
        exif = Image.Exif()
        exif[0x010E] = json.dumps(fields)  # ImageDescription
        picture.save(path, exif=exif)
    else:
        picture.save(path)
        print(f"note: {path}: {kind} files hold no metadata here; the settings are not stored (use .png)")


def _free_path(folder: str, stem: str, extension: str) -> str:
    """folder/stem.ext, or stem-1.ext, stem-2.ext, ...: the first name not taken (never overwrite)."""
    path, n = os.path.join(folder, stem + extension), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}-{n}{extension}")
    return path


def _save(images, args, settings: dict, grid_rows: int = 1) -> str:
    """--out (a grid when there are several images) and, with --output-dir, every image as its own PNG (new
    names when a file is already there). `settings`: what the run used, stored as metadata."""
    from .image_processing import image_grid

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    picture = images[0] if len(images) == 1 else image_grid(images, rows=grid_rows)
    _write_image(picture, args.out, _metadata_fields(args, settings, 0))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for i, image in enumerate(images):
            _write_image(image, _free_path(args.output_dir, f"{args.seed}-{i:03d}", ".png"), _metadata_fields(args, settings, i))
    return args.out


def _generate(args, clock) -> str:
    import jax

    from .pipelines import FlaxBlipDiffusionControlNetPipeline, FlaxBlipDiffusionPipeline

    started = time.perf_counter()
    call_extra, settings = {}, {}
    if args.num_images < 1:
        raise ValueError(f"--num-images={args.num_images} must be at least 1")
    _check_outputs(args)
    if args.command == "demo" and not args.tiny:
        from . import TOY_MODEL

        pipeline, params = _load(TOY_MODEL, attention=args.attention)
        image = args.image
        defaults = {"height": 32, "width": 32, "steps": 25}
    elif args.command == "demo":
        from . import tiny

        print("blipdiff-jax demo: tiny model with RANDOM weights (checks the install; the image is noise by design)")
        with tempfile.TemporaryDirectory() as workdir:
            pipeline, params = FlaxBlipDiffusionPipeline.from_converted(tiny.build_tiny_model(workdir), attention=args.attention)
        image = args.image if args.image is not None else tiny.demo_reference_image()
        defaults = {"height": 64, "width": 64, "steps": 10}
    else:
        if args.canny is not None and args.control_image is None:
            raise ValueError("--canny: needs --control-image")
        if args.controlnet is not None and args.control_image is None:
            raise ValueError("--controlnet: needs --control-image")
        loras = _parse_loras(args.lora)
        _check_model_has(args)
        if args.control_image is not None:
            from .image_processing import canny

            control = args.control_image if args.canny is None else canny(args.control_image, *args.canny)
            try:
                pipeline, params = _load(args.model, args.qformer_tokenizer, FlaxBlipDiffusionControlNetPipeline,
                                         controlnet=args.controlnet, attention=args.attention)
            except ValueError as err:
                if str(err).startswith("controlnet:"):
                    raise ValueError(_NO_CONTROLNET) from None
                raise
            call_extra = {"conditioning_image": control, "controlnet_conditioning_scale": args.controlnet_scale}
            settings = {"control_image": args.control_image, "canny": args.canny, "controlnet": args.controlnet,
                        "controlnet_scale": args.controlnet_scale}
        else:
            pipeline, params = _load(args.model, args.qformer_tokenizer, attention=args.attention)
        params = _merge_loras(pipeline, params, loras)
        if loras:
            settings["lora"] = ", ".join(f"{path}:{scale:g}" for path, scale in loras)
        if args.image is None and pipeline.subject_embeddings is None:
            raise ValueError(_NO_IMAGE)
        image = args.image
        defaults = {"height": 512, "width": 512, "steps": 50}
    size = {key: defaults[key] if getattr(args, key) is None else getattr(args, key) for key in ("height", "width")}
    steps = defaults["steps"] if args.steps is None else args.steps
    settings = {"image": image if isinstance(image, str) else None, **settings, "steps": steps, **size}
    loaded = time.perf_counter()
    compiled_before = clock.seconds
    out = pipeline(
        prompt=[args.prompt] * args.num_images,
        reference_image=image,
        source_subject_category=args.subject,
        target_subject_category=args.target_subject or args.subject,
        params=params,
        prng_seed=jax.random.PRNGKey(args.seed),
        guidance_scale=args.guidance,
        num_inference_steps=steps,
        neg_prompt=args.negative_prompt,
        progress=not args.quiet,
        **size,
        **call_extra,
    )
    _report(started, loaded, time.perf_counter(), clock.seconds - compiled_before)
    return _save(out.images, args, settings)


_NO_CONTROLNET = ("--control-image: --model has no controlnet/ folder; add an SD 1.5 ControlNet with --controlnet PATH")
_NO_IMAGE = "--image: required (--model holds no learned subject embeddings: only a fine-tuned model can go without it)"


def _check_model_has(args) -> None:
    """What a local --model lacks for this run, said before it is loaded."""
    from .checkpoint import is_converted_directory
    from .lora_files import is_lora_directory, read_manifest

    if not os.path.isdir(args.model):
        return
    # A LoRA fine-tuning output holds no model: its base (named in its manifest) has the folders.
    base = read_manifest(args.model).get("base_model") or "" if is_lora_directory(args.model) else args.model
    if (args.control_image is not None and args.controlnet is None and os.path.isdir(base)
            and not os.path.isdir(os.path.join(base, "controlnet"))):
        raise ValueError(_NO_CONTROLNET)
    learned = os.path.isfile(os.path.join(args.model, "subject_embeddings.npy"))
    if args.image is None and not ((is_converted_directory(args.model) or is_lora_directory(args.model)) and learned):
        raise ValueError(_NO_IMAGE)


def _report(started, loaded, done, compiling):
    print(f"loaded in {loaded - started:.1f}s; compiling {compiling:.1f}s, sampling {done - loaded - compiling:.1f}s")


def _edit(args, clock) -> str:
    import jax

    started = time.perf_counter()
    _check_outputs(args)
    loras = _parse_loras(args.lora)
    pipeline, params = _load(args.model, args.qformer_tokenizer, attention=args.attention)
    params = _merge_loras(pipeline, params, loras)
    steps = 50 if args.steps is None else args.steps
    inversion_steps = steps if args.inversion_steps is None else args.inversion_steps
    size = {"height": 512 if args.height is None else args.height, "width": 512 if args.width is None else args.width}
    loaded = time.perf_counter()
    compiled_before = clock.seconds
    out = pipeline.edit(
        args.prompt, args.reference, args.subject, args.target_subject or args.subject, args.original_subject,
        image=args.image, params=params, prng_seed=jax.random.PRNGKey(args.seed), guidance_scale=args.guidance,
        num_inference_steps=steps, num_inversion_steps=inversion_steps, placeholder_tokens=args.placeholder_tokens,
        cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
        lb_threshold=args.lb_threshold, neg_prompt=args.negative_prompt, progress=not args.quiet, **size,
    )
    _report(started, loaded, time.perf_counter(), clock.seconds - compiled_before)
    print("left: source, right: edit")
    settings = {"reference": args.reference, "original_subject": args.original_subject, "image": args.image,
                "steps": steps, "inversion_steps": inversion_steps if args.image is not None else None, **size,
                "cross_replace_steps": args.cross_replace_steps, "self_replace_steps": args.self_replace_steps,
                "lb_threshold": args.lb_threshold, "placeholder_tokens": args.placeholder_tokens,
                "lora": ", ".join(f"{path}:{scale:g}" for path, scale in loras) or None}
    return _save(out.images, args, settings)


def _toy_demo(args) -> str:
    """The transfer picture of the shipped toy model (blipdiff_jax.demo)."""
    from . import TOY_MODEL
    from .demo import transfer_sheet

    _check_outputs(args)
    started = time.time()
    pipeline, params = _load(TOY_MODEL, attention=args.attention)
    print("blipdiff-jax demo: the shipped toy model draws held-out subjects from their reference (left) on three backgrounds")
    sheet, settings = transfer_sheet(pipeline, params, seed=args.seed, steps=args.steps or 25, guidance=args.guidance,
                                     progress=not args.quiet)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _write_image(sheet, args.out, settings)
    print(f"done in {time.time() - started:.1f} s")
    return args.out


def _finetune_stopped(out: str) -> str:
    """What Ctrl-C in finetune leaves: the last step logged in OUT/loss.jsonl and the latest checkpoint."""
    step = 0
    try:
        with open(os.path.join(out, "loss.jsonl")) as log:
            for line in log:
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by the interrupt
    except OSError:
        pass
    try:
        saved = [int(name) for name in os.listdir(os.path.join(out, "checkpoints")) if name.isdigit()]
    except OSError:
        saved = []
    where = f"latest checkpoint: step {max(saved)}" if saved else "no checkpoint yet, so it starts over"
    return f"stopped at step {step}; resume with --resume ({where})"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    tune_host_memory()  # an application's choice, process-wide (host_memory.py); BLIPDIFF_JAX_TUNE_MALLOC=0 opts out
    if getattr(args, "guidance", 0) is None:
        toy = args.command == "demo" and not args.tiny
        args.guidance = TOY_GUIDANCE if toy else 7.5
    try:
        cache = _setup_compile_cache(args)
        if cache:
            print(f"compilation cache: {cache}")
        clock = _CompileClock()
        if args.command in ("finetune", "pretrain"):
            from .training.cli import run_finetune, run_pretrain

            try:
                path = (run_finetune if args.command == "finetune" else run_pretrain)(args)
            except KeyboardInterrupt:
                print(f"blipdiff-jax: {_finetune_stopped(args.out)}", file=sys.stderr)
                return 130
        elif args.command == "evaluate":
            from .evaluation.cli import run_evaluate

            try:
                path = run_evaluate(args)
            except KeyboardInterrupt:
                print(f"blipdiff-jax: stopped; the images in {args.out} are kept: run the same command to resume",
                      file=sys.stderr)
                return 130
        elif args.command == "demo" and not args.tiny and args.image is None:
            path = _toy_demo(args)
        else:
            path = _edit(args, clock) if args.command == "edit" else _generate(args, clock)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"blipdiff-jax: error: {err}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
