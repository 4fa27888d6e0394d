"""GPU: ours (bf16) against diffusers' PyTorch BlipDiffusionPipeline (fp16, SDPA) at the real size, one script.

    python benchmarks/bench_gpu.py [--size 512] [--batch 4] [--steps 50] [--config FULL.json] [--out DIR]

Needs a CUDA machine with torch and jax[cuda]. In one process, on the same weights and inputs:
1. builds the real-size architecture (`../shared/reference/blipdiffusion_full.json`, or --config) with random
   weights on the GPU and saves it in fp16 (once, in --workdir);
2. PyTorch, fp16, SDPA (diffusers' default attention processor): one UNet step (batch 2 x --batch, as under
   guidance) and the whole pipeline (--batch images, --steps PNDM steps);
3. JAX, the converted weights in bf16: one UNet step for each attention kernel (models/attention.py), with
   its compile time, achieved FLOP/s (XLA's count of the step) against the bf16 matmul rate measured here
   (8192^3) and its distance from PyTorch's output; then the whole pipeline with the default kernel;
4. writes a markdown table to benchmarks/results-gpu.md (and --out) and the raw numbers as JSON.
Timings are medians of --repeats calls after a warm-up. The sections run in order of importance and stop
starting new ones after --budget seconds, so a short lease still returns the main numbers.

`--tiny` runs the same flow on the tiny test architecture (any device, fp32): a check of the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")  # PyTorch shares the card in this process

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts


def median_time(fn, repeats: int, sync) -> tuple[float, float]:
    """(first call, median of `repeats` further calls) in seconds; `sync` waits for the device."""
    from bench_unet import timed

    first, times, _ = timed(lambda: sync(fn()), repeats)
    return first, statistics.median(times)


def tiny_config() -> dict:
    from blipdiff_jax import tiny

    processor = tiny.image_processor_config()
    return {"qformer": tiny.qformer_config(), "text_encoder": tiny.text_encoder_config(), "unet": tiny.unet_config(),
            "vae": tiny.vae_config(), "scheduler": tiny.scheduler_config(),
            "pipeline": {"mean": processor["image_mean"], "std": processor["image_std"]}}


def unet_inputs(batch: int, latent: int, context_dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, 4, latent, latent), np.float32), np.full((batch,), 500, np.int32),
            rng.standard_normal((batch, 77, context_dim), np.float32))


# --------------------------------------------------------------------------- PyTorch side


def torch_pipeline(model_dir: str, device: str, dtype):
    from bench_pipeline import load_torch_pipeline

    pipeline, _ = load_torch_pipeline(model_dir, dtype, device)
    # diffusers hands the processor's fp32 pixels to the Q-Former as they are; in fp16 they must be cast.
    preprocess = pipeline.image_processor.preprocess
    pipeline.image_processor.preprocess = lambda *a, **k: {"pixel_values": preprocess(*a, **k)["pixel_values"].to(dtype)}
    return pipeline


def run_torch(model_dir: str, args, device: str, dtype, latents, unet_in) -> dict:
    import numpy as np
    import torch

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    pipeline = torch_pipeline(model_dir, device, dtype)
    unet = pipeline.unet
    x, t, c = (torch.from_numpy(a).to(device) for a in unet_in)
    x, c = x.to(dtype), c.to(dtype)
    out = {"attention_processor": type(next(iter(unet.attn_processors.values()))).__name__}
    with torch.no_grad():
        first, step = median_time(lambda: unet(x, t, c).sample, args.repeats, sync)
        out["unet"] = {"first_s": first, "step_s": step}
        out["unet_output"] = unet(x, t, c).sample.float().cpu().numpy()
        from bench_pipeline import reference_image

        image = reference_image()
        call = lambda: pipeline(["on the beach"] * args.batch, [image] * args.batch, ["dog"] * args.batch,  # noqa: E731
                                ["dog"] * args.batch, latents=torch.from_numpy(latents).to(device, dtype),
                                height=args.size, width=args.size, num_inference_steps=args.steps, output_type="np")
        first, image_s = median_time(call, max(1, args.repeats // 3), sync)
        out["pipeline"] = {"first_s": first, "call_s": image_s, "image_s": image_s / args.batch}
        out["images"] = np.asarray(call().images)
    if device == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del pipeline, unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- JAX side


def matmul_tflops(calls: int = 200) -> float:
    """bf16 8192^3 products back to back (dispatch is asynchronous, so the card never waits on the host)."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in (0, 1))
    product = jax.jit(lambda a, b: a @ b)
    for _ in range(20):  # compile, and let the clocks rise
        c = product(a, b)
    jax.block_until_ready(c)
    start = time.perf_counter()
    for _ in range(calls):  # each result replaces the last: the allocator's peak stays the pipeline's
        c = product(a, b)
    jax.block_until_ready(c)
    return 2 * n**3 * calls / (time.perf_counter() - start) / 1e12


def unet_tflop(unet_config: dict, unet_in) -> float:
    """FLOPs of one UNet step as torch's FlopCounterMode counts them (matmuls, convolutions, SDPA), on the
    meta device: no memory, no time. (XLA's GPU cost analysis does not count cuBLAS/cuDNN custom calls.)"""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        x, t, c = (torch.empty(a.shape, dtype=torch.float32 if a.dtype.kind == "f" else torch.int64) for a in unet_in)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, c)
    return counter.get_total_flops() / 1e12


def unet_step_fn(pipeline, implementation: str, loop_steps: int = 0):
    """One jitted UNet call; with `loop_steps`, that many calls in one program, each fed the last output
    (what the denoising loop does, without the host dispatching every step)."""
    import jax

    from blipdiff_jax.runtime import Runtime

    runtime = Runtime.for_backend(implementation)

    def step(p, x, t, c):
        with runtime.unet_layers():
            return pipeline.unet.apply({"params": p}, x, t, c).sample

    if loop_steps:
        return jax.jit(lambda p, x, t, c: jax.lax.fori_loop(0, loop_steps, lambda i, x: step(p, x, t, c), x))
    return jax.jit(step)


def run_jax(model_dir: str, args, dtype, latents, unet_in, reference_unet, deadline: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench_pipeline import reference_image

    from blipdiff_jax import FlaxBlipDiffusionPipeline
    from convert.pytorch_dir import read_pytorch_directory

    out = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
    if out["backend"] != "cpu":
        out["matmul_bf16_tflops"] = matmul_tflops()
        print(f"bf16 matmul 8192^3: {out['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    start = time.perf_counter()
    model = read_pytorch_directory(model_dir, qformer_tokenizer=os.path.join(os.path.dirname(model_dir), "bert"))
    out["convert_s"] = time.perf_counter() - start

    # The whole pipeline first, so the allocator's peak is the pipeline's own.
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(model, dtype=dtype)
    image = reference_image()
    call = lambda: pipeline(["on the beach"] * args.batch, [image] * args.batch, ["dog"] * args.batch,  # noqa: E731
                            ["dog"] * args.batch, params=params, latents=latents, height=args.size, width=args.size,
                            num_inference_steps=args.steps, output_type="np").images
    first, call_s = median_time(call, max(1, args.repeats // 3), lambda images: images)
    out["pipeline"] = {"attention": pipeline.attention, "first_s": first, "call_s": call_s, "image_s": call_s / args.batch}
    out["images"] = np.asarray(call())
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_gpu_gb"] = stats["peak_bytes_in_use"] / 1e9
    print(f"JAX pipeline: {out['pipeline']}", flush=True)
    del pipeline, params

    x, t, c = unet_in
    x, c = jnp.asarray(x, dtype), jnp.asarray(c, dtype)
    out["unet"] = {}
    for implementation in args.attention:
        if time.perf_counter() > deadline:
            print(f"budget spent: skipping the UNet with {implementation}", flush=True)
            continue
        pipeline, params = FlaxBlipDiffusionPipeline.from_converted(model, dtype=dtype, attention=implementation)
        step = unet_step_fn(pipeline, pipeline.attention)
        first, seconds = median_time(lambda: step(params["unet"], x, t, c), args.repeats, jax.block_until_ready)
        result = np.asarray(step(params["unet"], x, t, c), np.float32)
        error = float(np.linalg.norm(result - reference_unet) / np.linalg.norm(reference_unet))
        out["unet"][implementation] = {"first_s": first, "step_s": seconds, "rel_l2_vs_torch": error,
                                       "finite": bool(np.isfinite(result).all())}
        if implementation == args.attention[0] and args.loop_steps:
            loop = unet_step_fn(pipeline, pipeline.attention, args.loop_steps)
            _, loop_s = median_time(lambda: loop(params["unet"], x, t, c), max(1, args.repeats // 3), jax.block_until_ready)
            out["unet"][implementation]["step_in_loop_s"] = loop_s / args.loop_steps
        print(f"UNet {implementation}: {json.dumps(out['unet'][implementation])}", flush=True)
        del pipeline, params
    return out


# --------------------------------------------------------------------------- driver


def table(torch_run: dict, jax_run: dict, args, versions: str) -> str:
    kind = jax_run.get("device_kind", "?")
    peak = jax_run.get("matmul_bf16_tflops")
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in kind), None)
    tflop = jax_run.get("tflop", 0.0)
    lines = [f"Measured {datetime.date.today()} on {kind} ({jax_run.get('device')}); random weights of the real size; "
             f"{args.size}x{args.size}, batch {args.batch} (UNet batch {2 * args.batch} under guidance), PNDM "
             f"{args.steps} steps. PyTorch fp16 with {torch_run.get('attention_processor')} (SDPA); ours bf16. "
             f"{versions}.",
             "", f"One UNet step is {tflop:.2f} TFLOP (torch's FlopCounterMode); bf16 matmul measured here (8192^3): "
             + (f"{peak:.0f} TFLOP/s" if peak else "-") + (f" (datasheet {datasheet:.0f})." if datasheet else "."), "",
             "| what | PyTorch fp16 | ours bf16 | PyTorch / ours (speed-up) | ours TFLOP/s | % of measured bf16 peak | compile | rel. L2 vs PyTorch |",
             "|---|---|---|---|---|---|---|---|"]
    t_step = torch_run["unet"]["step_s"]
    for name, r in jax_run.get("unet", {}).items():
        rate = tflop / r["step_s"] if tflop else 0.0
        lines.append(f"| UNet step, attention={name} | {t_step * 1e3:.1f} ms | {r['step_s'] * 1e3:.1f} ms | "
                     f"{t_step / r['step_s']:.2f}x | {rate:.0f} | " + (f"{100 * rate / peak:.0f}%" if peak else "-")
                     + f" | {r['first_s']:.1f} s | {r['rel_l2_vs_torch']:.1e} |")
        if "step_in_loop_s" in r:
            rate = tflop / r["step_in_loop_s"] if tflop else 0.0
            lines.append(f"| UNet step in a compiled {args.loop_steps}-step loop, attention={name} | - | "
                         f"{r['step_in_loop_s'] * 1e3:.1f} ms | {t_step / r['step_in_loop_s']:.2f}x | {rate:.0f} | "
                         + (f"{100 * rate / peak:.0f}%" if peak else "-") + " | - | - |")
    if "pipeline" in jax_run:
        t, j = torch_run["pipeline"], jax_run["pipeline"]
        lines.append(f"| pipeline, {args.batch} images, per image (attention={j['attention']}) | {t['image_s'] * 1e3:.0f} ms | "
                     f"{j['image_s'] * 1e3:.0f} ms | {t['image_s'] / j['image_s']:.2f}x | - | - | {j['first_s'] - j['call_s']:.1f} s | - |")
    if "peak_gpu_gb" in torch_run or "peak_gpu_gb" in jax_run:
        lines.append(f"| peak GPU memory (allocator's count) | {torch_run.get('peak_gpu_gb', 0):.1f} GB | "
                     f"{jax_run.get('peak_gpu_gb', 0):.1f} GB | - | - | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--attention", nargs="+", default=["cudnn", "dot_product", "xla"],
                        help="UNet kernels to time; the first also runs in a compiled loop")
    parser.add_argument("--loop-steps", type=int, default=10)
    parser.add_argument("--config", default=os.path.join(ROOT, "..", "shared", "reference", "blipdiffusion_full.json"))
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache", "gpu"))
    parser.add_argument("--out", default=None, help="also write the table and raw numbers here")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which no new section starts")
    parser.add_argument("--tiny", action="store_true", help="the tiny test architecture (checks the script)")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget
    import blipdiff_jax

    blipdiff_jax.tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    import jax.numpy as jnp
    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        full, args.size, torch_dtype, jax_dtype = tiny_config(), 32, torch.float32, jnp.float32
        args.workdir += "-tiny"
    else:
        if not os.path.isfile(args.config):
            sys.exit(f"--config: {args.config} not found (the real architecture's JSON)")
        with open(args.config) as f:
            full = json.load(f)
        torch_dtype, jax_dtype = (torch.float16, jnp.bfloat16) if device == "cuda" else (torch.float32, jnp.float32)
    import diffusers
    import flax
    import jax
    import transformers

    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                f"jax {jax.__version__}, flax {flax.__version__}")
    print(versions, "| torch device", device, "| jax", jax.devices(), flush=True)
    model_dir = os.path.join(args.workdir, "torch")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        from bench_pipeline import build_torch_model

        from blipdiff_jax import tiny

        start = time.perf_counter()
        bert_dir = tiny.write_bert_tokenizer(os.path.join(args.workdir, "bert"))
        with torch.device(device):
            build_torch_model(model_dir, bert_dir, full, dtype=torch_dtype)
        print(f"built and saved the random model in {time.perf_counter() - start:.0f} s", flush=True)
    latent = args.size // 8 if not args.tiny else args.size // 2
    latents = np.random.default_rng(1).standard_normal((args.batch, 4, latent, latent)).astype(np.float32)
    unet_in = unet_inputs(2 * args.batch, latent, full["unet"].get("cross_attention_dim", 768))
    torch_run = run_torch(model_dir, args, device, torch_dtype, latents, unet_in)
    tflop = unet_tflop(full["unet"], unet_in)
    print(f"PyTorch: UNet {torch_run['unet']}, pipeline {torch_run['pipeline']}", flush=True)
    jax_run = run_jax(model_dir, args, jax_dtype, latents, unet_in, torch_run.pop("unet_output"), deadline)
    jax_run["tflop"] = tflop
    torch_images, jax_images = torch_run.pop("images"), jax_run.pop("images", None)
    if jax_images is not None:
        jax_run["images_max_abs_diff"] = float(np.abs(torch_images.astype(np.float32) - jax_images).max())
    report = table(torch_run, jax_run, args, versions)
    print(report, flush=True)
    raw = json.dumps({"torch": torch_run, "jax": jax_run, "args": vars(args)}, indent=1)
    if not args.tiny:
        with open(os.path.join(HERE, "results-gpu.md"), "w") as f:
            f.write(report + "\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results-gpu.md"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(args.out, "results-gpu.json"), "w") as f:
            f.write(raw)


if __name__ == "__main__":
    main()
