"""Ours against diffusers' PyTorch BlipDiffusionPipeline at the real size (random weights), side by side.

    python benchmarks/bench_pipeline.py [--sizes 512 256] [--steps 2] [--long-steps 6] [--workdir benchmarks/.cache]

1. Builds the real-size architecture (`../shared/reference/blipdiffusion_full.json`) with random weights once,
   saves it with `save_pretrained` and converts it (both cached in --workdir).
2. Runs each side in its own process: JAX cold (empty persistent compilation cache); PyTorch; JAX warm (the
   cache the cold run filled); with --bf16 JAX in bf16 at the largest size (its peak memory), cold, PyTorch in
   bf16 there too, then JAX bf16 warm; last, JAX warm at the largest size with torch importable. The runs whose
   steady times are compared run next to each other. The other JAX processes run without torch, as a runtime
   install does. Each process reports, per
   size: first-call time, steady time per image and per denoising step (from calls with `steps` and
   `long_steps`: (T(long) - T(steps)) / (long - steps); in the PyTorch, JAX warm and bf16 runs the fastest of
   `--repeats` calls of each, interleaved),
   subject-encoding time, RSS after imports, and peak RSS.
3. Prints a markdown table with ratios (ours / PyTorch) and writes it to `benchmarks/results.md`, the raw numbers
   to `benchmarks/results.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from machine import cpu_description  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

FULL_CONFIG = os.path.join(ROOT, "..", "shared", "reference", "blipdiffusion_full.json")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def reference_image():
    from blipdiff_jax.tiny import demo_reference_image

    return demo_reference_image(256)


# --------------------------------------------------------------------------- model building (once)


def build_torch_model(path: str, bert_dir: str, full: dict | None = None, dtype=None) -> None:
    """The architecture of `full` (default: the real one) with random weights, saved by `save_pretrained`
    (in `dtype` when given). Built on torch's default device: the GPU benchmark builds on the GPU."""
    import torch
    from diffusers import AutoencoderKL, BlipDiffusionPipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import Blip2Config, CLIPTextConfig, CLIPTokenizer

    from blipdiff_jax import tiny

    if full is None:
        with open(FULL_CONFIG) as f:
            full = json.load(f)
    torch.manual_seed(0)
    qconfig = Blip2Config(**{k: full["qformer"][k] for k in ("num_query_tokens", "vision_config", "qformer_config")})
    qconfig.tokenizer = bert_dir
    vocab = full["text_encoder"]["vocab_size"]
    reference_size = full["qformer"]["vision_config"].get("image_size", 224)
    clip_dir = tiny.write_clip_tokenizer(os.path.join(path + "-tokenizers", "clip"))  # ids stay < 514 < vocab
    pipeline = BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir),
        text_encoder=ContextCLIPTextModel(CLIPTextConfig(**{**full["text_encoder"], "vocab_size": vocab})),
        vae=AutoencoderKL(**full["vae"]),
        unet=UNet2DConditionModel(**full["unet"]),
        scheduler=PNDMScheduler(**{k: v for k, v in full["scheduler"].items() if not k.startswith("_")}),
        qformer=Blip2QFormerModel(qconfig),
        image_processor=BlipImageProcessor(size={"height": reference_size, "width": reference_size}, resample=3,
                                           do_center_crop=True),
        ctx_begin_pos=2, mean=full["pipeline"]["mean"], std=full["pipeline"]["std"],
    )
    if dtype is not None:
        pipeline.to(dtype=dtype)
    pipeline.save_pretrained(path)


def ensure_models(workdir: str) -> tuple[str, str]:
    from blipdiff_jax import tiny

    torch_dir, flax_dir = os.path.join(workdir, "torch"), os.path.join(workdir, "flax")
    bert_dir = tiny.write_bert_tokenizer(os.path.join(workdir, "bert"))
    if not os.path.isfile(os.path.join(torch_dir, "model_index.json")):
        print("building the real-size random PyTorch model (once) ...", flush=True)
        build_torch_model(torch_dir, bert_dir)
    if not os.path.isfile(os.path.join(flax_dir, "model_index.json")):
        print("converting it (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "convert", torch_dir, flax_dir, "--qformer-tokenizer", bert_dir],
                       check=True, cwd=ROOT)
    return torch_dir, flax_dir


# --------------------------------------------------------------------------- one side, in its own process


def load_torch_pipeline(model_dir: str, dtype=None, device: str = "cpu"):
    """diffusers' `BlipDiffusionPipeline` from the saved directory, in `dtype` (default: as saved) on `device`.
    diffusers cannot load this directory back as a whole (its custom classes): load by component."""
    from diffusers import AutoencoderKL, BlipDiffusionPipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTokenizer

    sub = lambda name: os.path.join(model_dir, name)  # noqa: E731
    with open(sub("model_index.json")) as f:
        index = json.load(f)
    load = {"torch_dtype": dtype} if dtype is not None else {}
    pipeline = BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
        text_encoder=ContextCLIPTextModel.from_pretrained(sub("text_encoder"), **load),
        vae=AutoencoderKL.from_pretrained(sub("vae"), **load), unet=UNet2DConditionModel.from_pretrained(sub("unet"), **load),
        scheduler=PNDMScheduler.from_pretrained(sub("scheduler")),
        qformer=Blip2QFormerModel.from_pretrained(sub("qformer"), **load),
        image_processor=BlipImageProcessor.from_pretrained(sub("image_processor")),
        ctx_begin_pos=index["ctx_begin_pos"], mean=index["mean"], std=index["std"],
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device), index


def run_torch(model_dir: str, sizes: list[int], steps: int, long_steps: int, repeats: int = 1,
              dtype: str = "float32") -> dict:
    import diffusers  # noqa: F401
    import torch

    imports_rss = current_rss_gb()
    pipeline, index = load_torch_pipeline(model_dir, getattr(torch, dtype))
    image = reference_image()
    results = {}
    with torch.no_grad():
        pixels = pipeline.image_processor.preprocess(image, image_mean=index["mean"], image_std=index["std"],
                                                     return_tensors="pt")["pixel_values"].to(getattr(torch, dtype))
        pipeline.get_query_embeddings(pixels, ["dog"])
        start = time.perf_counter()
        pipeline.get_query_embeddings(pixels, ["dog"])
        encode = time.perf_counter() - start
        for size in sizes:
            timing = {}
            for n in (steps,) + (steps, long_steps) * repeats:  # the first call warms up
                start = time.perf_counter()
                pipeline("on the beach", image, "dog", "dog", height=size, width=size, num_inference_steps=n,
                         generator=torch.Generator().manual_seed(0),
                         output_type="np" if dtype == "float32" else "pt")  # numpy has no bf16
                timing.setdefault(n, []).append(time.perf_counter() - start)
            image_s, long_s = min(timing[steps][1:]), min(timing[long_steps])
            results[size] = {"first_call_s": timing[steps][0], "image_s": image_s,
                             "step_s": (long_s - image_s) / (long_steps - steps),
                             "compile_s": 0.0, "calls_s": timing}
    return {"sizes": results, "subject_encoding_s": encode, "peak_rss_gb": peak_rss_gb(), "imports_rss_gb": imports_rss}


def run_jax(model_dir: str, sizes: list[int], steps: int, long_steps: int, cache_dir: str, dtype: str = "float32",
            repeats: int = 1) -> dict:
    import blipdiff_jax

    blipdiff_jax.tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    if dtype != "float32":  # bf16 on CPU: XLA's memory-aware scheduler (blipdiff_jax/compilation.py)
        blipdiff_jax.prefer_memory_on_cpu()
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    compile_clock = [0.0]  # what JAX itself reports for tracing, lowering and compiling (cache hits included)

    def listen(event, duration, **kwargs):
        if event.endswith(("backend_compile_duration", "jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")):
            compile_clock[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    imports_rss = current_rss_gb()
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
    loaded_rss = peak_rss_gb()
    image = reference_image()
    start = time.perf_counter()
    jax.block_until_ready(pipeline.encode_subject(image, "dog", params))
    first_encode = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(pipeline.encode_subject(image, "dog", params))
    encode = time.perf_counter() - start
    results = {}
    for size in sizes:
        timing = {}
        compile_events = {}
        # The first call of each step count compiles; then `repeats` steady calls of each, interleaved.
        for n in (steps, long_steps) + (steps, long_steps) * repeats:
            before = compile_clock[0]
            start = time.perf_counter()
            pipeline("on the beach", image, "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
                     height=size, width=size, num_inference_steps=n, output_type="np")
            timing.setdefault(n, []).append(time.perf_counter() - start)
            compile_events.setdefault(n, compile_clock[0] - before)
        image_s, long_s = min(timing[steps][1:]), min(timing[long_steps][1:])
        results[size] = {"first_call_s": timing[steps][0], "image_s": image_s,
                         "step_s": (long_s - image_s) / (long_steps - steps),
                         "compile_s": timing[steps][0] - image_s, "compile_events_s": compile_events[steps],
                         "calls_s": timing}
    return {"sizes": results, "subject_encoding_s": encode, "subject_encoding_first_s": first_encode,
            "peak_rss_gb": peak_rss_gb(), "peak_rss_after_loading_gb": loaded_rss, "device": str(jax.devices()[0]),
            "attention": pipeline.attention, "imports_rss_gb": imports_rss, "torch_imported": sys.modules.get("torch") is not None}


# --------------------------------------------------------------------------- driver


def table(runs: dict, sizes: list[int], steps: int, long_steps: int) -> str:
    torch_run, cold, warm = runs["torch"], runs["jax_cold"], runs["jax_warm"]
    lines = [
        f"Measured {datetime.date.today()} on {cpu_description()}, fp32, random weights of "
        f"the real size, PNDM, guidance 7.5, {steps} and {long_steps} steps (a step: the difference over the "
        f"{long_steps - steps} extra steps); JAX device: {cold.get('device')}. The JAX "
        f"side runs {'with torch imported' if warm.get('torch_imported') else 'as a runtime install does, without torch'} "
        f"(one extra run with torch importable). Memory in GiB.",
        "",
        "| metric | PyTorch | ours | ours / PyTorch |",
        "|---|---|---|---|",
    ]

    def row(name, a, b, unit="s"):
        lines.append(f"| {name} | {a:.2f} {unit} | {b:.2f} {unit} | {b / a:.2f} |" if a else f"| {name} | - | {b:.2f} {unit} | - |")

    for size in sizes:
        t, c, w = torch_run["sizes"][str(size)], cold["sizes"][str(size)], warm["sizes"][str(size)]
        row(f"{size}px: time per denoising step (steady)", t["step_s"], w["step_s"])
        row(f"{size}px: time per image, {steps} steps (steady)", t["image_s"], w["image_s"])
        row(f"{size}px: compile, cold cache", 0, c["compile_s"])
        row(f"{size}px: compile, warm persistent cache", 0, w["compile_s"])
        if "compile_events_s" in w:
            row(f"{size}px: compile as JAX reports it (trace + lower + compile), cold cache", 0,
                c["compile_events_s"])
            row(f"{size}px: compile as JAX reports it (trace + lower + compile), warm cache", 0, w["compile_events_s"])
    row("subject encoding (steady)", torch_run["subject_encoding_s"], warm["subject_encoding_s"])
    # Compiling takes memory of its own: with the persistent cache warm, a process only loads the programs.
    row("peak RSS (whole process), cold cache", torch_run["peak_rss_gb"], cold["peak_rss_gb"], "GiB")
    row("peak RSS (whole process), warm persistent cache", torch_run["peak_rss_gb"], warm["peak_rss_gb"], "GiB")
    if "jax_bf16" in runs:
        bf16 = runs["jax_bf16"]
        size = str(max(sizes))
        row(f"{size}px: time per denoising step, bf16 params (ours) vs fp32 (PyTorch)",
            torch_run["sizes"][size]["step_s"], bf16["sizes"][size]["step_s"])
        if "torch_bf16" in runs:
            torch_bf16 = runs["torch_bf16"]
            row(f"{size}px: time per denoising step, bf16 both", torch_bf16["sizes"][size]["step_s"], bf16["sizes"][size]["step_s"])
            row(f"{size}px: time per image, {steps} steps, bf16 both", torch_bf16["sizes"][size]["image_s"],
                bf16["sizes"][size]["image_s"])
            row(f"peak RSS, bf16 both ({size}px), cold cache", torch_bf16["peak_rss_gb"], bf16["peak_rss_gb"], "GiB")
        row(f"peak RSS, bf16 params (ours, {max(sizes)}px) vs fp32 (PyTorch), cold cache", torch_run["peak_rss_gb"],
            bf16["peak_rss_gb"], "GiB")
        if "jax_bf16_warm" in runs:
            row(f"peak RSS, bf16 params (ours, {max(sizes)}px) vs fp32 (PyTorch), warm persistent cache", torch_run["peak_rss_gb"],
                runs["jax_bf16_warm"]["peak_rss_gb"], "GiB")
    row("RSS after imports (PyTorch: torch, diffusers; ours: blipdiff_jax, torch not importable)",
        torch_run["imports_rss_gb"], warm["imports_rss_gb"], "GiB")
    if "jax_warm_torch" in runs:
        with_torch = runs["jax_warm_torch"]
        row(f"peak RSS, torch importable (diffusers imports it), warm cache, {max(sizes)}px only",
            torch_run["peak_rss_gb"], with_torch["peak_rss_gb"], "GiB")
        row("RSS after imports, torch importable", torch_run["imports_rss_gb"], with_torch["imports_rss_gb"], "GiB")
    lines.append("")
    lines.append(f"JAX attention kernel: {warm.get('attention')}. Peak RSS right after loading: PyTorch -, ours "
                 f"{warm['peak_rss_after_loading_gb']:.2f} GiB (fp32)"
                 + (f", {runs['jax_bf16']['peak_rss_after_loading_gb']:.2f} GiB (bf16)." if "jax_bf16" in runs else "."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--steps", type=int, default=2, help="steps of the image that gives the time per image")
    parser.add_argument("--long-steps", type=int, default=6,
                        help="steps of the longer call: the time per step is the difference over the extra steps "
                             "(more extra steps, less of the machine's noise in it)")
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--side", choices=["torch", "jax"], help=argparse.SUPPRESS)  # internal: one side per process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--jax-cache", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--torch-importable", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2,
                        help="steady calls per step count in the runs that give the steady times (the minimum counts)")
    parser.add_argument("--bf16", action="store_true", help="also run the JAX side with bf16 params (cold, then warm cache)")
    args = parser.parse_args()
    if args.long_steps <= args.steps:
        parser.error("--long-steps must be more than --steps")
    if args.side == "jax" and not args.torch_importable:
        # As a runtime install runs (blipdiff_jax needs no torch): with torch installed, importing diffusers
        # would import it (its logging module tries to), 0.3 GiB. One extra run measures that case.
        sys.modules["torch"] = None
    if args.side:
        result = run_torch(args.model, args.sizes, args.steps, args.long_steps, args.repeats, args.dtype) \
            if args.side == "torch" else \
            run_jax(args.model, args.sizes, args.steps, args.long_steps, args.jax_cache, args.dtype, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not os.path.isfile(FULL_CONFIG):
        sys.exit("needs ../shared/reference/blipdiffusion_full.json (the real architecture)")
    os.makedirs(args.workdir, exist_ok=True)
    torch_dir, flax_dir = ensure_models(args.workdir)
    jax_cache = os.path.join(args.workdir, f"jax-cache-{os.getpid()}")
    runs = {}
    # The runs whose steady times are compared run next to each other (PyTorch, then JAX warm; JAX bf16, then
    # PyTorch bf16): this shared machine's speed drifts over minutes.
    sides = [("jax_cold", "jax", flax_dir, "float32"), ("torch", "torch", torch_dir, "float32"),
             ("jax_warm", "jax", flax_dir, "float32")]
    if args.bf16:  # cold, then warm from the cache the cold run filled; PyTorch in bf16 too
        sides += [("jax_bf16", "jax", flax_dir, "bfloat16"), ("torch_bf16", "torch", torch_dir, "bfloat16"),
                  ("jax_bf16_warm", "jax", flax_dir, "bfloat16")]
    sides += [("jax_warm_torch", "jax", flax_dir, "float32")]  # the peak size again, torch importable
    for name, side, model, dtype in sides:
        print(f"running {name} ...", flush=True)
        sizes = [max(args.sizes)] if dtype == "bfloat16" else args.sizes  # bf16: the peak size's memory and speed
        sizes = [max(args.sizes)] if name == "jax_warm_torch" else sizes
        command = [sys.executable, __file__, "--side", side, "--model", model, "--jax-cache", jax_cache,
                   "--steps", str(args.steps), "--long-steps", str(args.long_steps), "--dtype", dtype,
                   "--sizes", *map(str, sizes)]
        command += ["--torch-importable"] if name == "jax_warm_torch" else []
        # Steady times come from PyTorch, JAX warm and bf16 (its step): those repeat; the others only need a
        # first call and one steady call (compile time, memory).
        command += ["--repeats", str(args.repeats if name in ("torch", "jax_warm", "jax_bf16", "torch_bf16") else 1)]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        runs[name] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    report = table(runs, args.sizes, args.steps, args.long_steps)
    print(report)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(HERE, "results.json"), "w") as f:  # every run's raw numbers (the table rounds)
        json.dump({"cpu": cpu_description(), **runs}, f, indent=1)


if __name__ == "__main__":
    main()
