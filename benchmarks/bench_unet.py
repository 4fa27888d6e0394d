"""One real-size UNet step (batch 2 as under guidance), ours against diffusers' PyTorch UNet, side by side.

    python benchmarks/bench_unet.py [--size 512] [--attention xla blockwise] [--xla-flags none xla_cpu_flag=value,xla_other=1]
    python benchmarks/bench_unet.py --interleaved 5 [--size 512]

Uses the real-size random model `bench_pipeline.py` builds and caches in benchmarks/.cache. Runs PyTorch in
one process and, per XLA flag set, JAX in another (XLA_FLAGS is read once per process), timing every
attention implementation on the same inputs; checks each output against PyTorch's and prints a table.
This is where the per-step cost of sampling comes from, so the choices behind the pipeline's defaults are
measured here.

With --interleaved N, both sides run in one process instead, N rounds of one PyTorch step and one of ours (our
default attention, compiled as the pipelines compile), the order swapped every round: a shared machine's speed
drifts by more than the difference between the two, and this way each pair of steps sees the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from machine import cpu_description  # noqa: E402


def inputs(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, size // 8, size // 8), np.float32)
    context = rng.standard_normal((2, 77, 768), np.float32)
    return latents, np.array([500, 500], np.int32), context


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, times, out


def run_torch(model_dir: str, size: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    latents, t, context = (torch.from_numpy(x) for x in inputs(size))
    with torch.no_grad():
        first, times, out = timed(lambda: unet(latents, t, context).sample, repeats)
    np.save(os.path.join(HERE, ".cache", f"unet-torch-{size}.npy"), out.numpy())
    return {"torch": {"first_s": first, "step_s": min(times), "threads": torch.get_num_threads()}}


def jitted_unet_step(pipeline, attention: str):
    """Our UNet step with `attention`'s kernel, compiled as the pipelines compile it (blipdiff_jax.runtime).
    "xla" is diffusers' UNet as shipped (no CPU rewrites); every other kernel runs with the CPU rewrites, as
    the pipelines run by default."""
    from blipdiff_jax.runtime import Runtime

    runtime = Runtime.for_backend(attention, cpu_rewrites=attention != "xla")

    def step(p, x, t, c):
        with runtime.unet_layers():
            return pipeline.unet.apply({"params": p}, x, t, c).sample

    return runtime.jit(step)


def run_jax(model_dir: str, size: int, repeats: int, attentions: list[str]) -> dict:
    import jax
    import numpy as np

    from blipdiff_jax import FlaxBlipDiffusionPipeline, tune_host_memory

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(model_dir)
    unet_params = params["unet"]
    del params
    latents, t, context = inputs(size)
    reference = np.load(os.path.join(HERE, ".cache", f"unet-torch-{size}.npy"))
    results = {}
    # FLOPs of the step as XLA counts them with diffusers' own attention (a while loop's body would be
    # counted once, so the blockwise program's own count is not used).
    plain = jax.jit(lambda p, x, t, c: pipeline.unet.apply({"params": p}, x, t, c).sample)
    cost = plain.lower(unet_params, latents, t, context).cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))
    for attention in attentions:
        step = jitted_unet_step(pipeline, attention)
        first, times, out = timed(lambda: jax.block_until_ready(step(unet_params, latents, t, context)), repeats)
        error = float(np.abs(np.asarray(out) - reference).max() / np.abs(reference).max())
        results[attention] = {"first_s": first, "step_s": min(times), "rel_error_vs_torch": error,
                              "tflop_per_step": flops / 1e12, "device": str(jax.devices()[0])}
    return results


def run_interleaved(workdir: str, size: int, rounds: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from blipdiff_jax import FlaxBlipDiffusionPipeline, tune_host_memory

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(workdir, "torch", "unet")).eval()
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(os.path.join(workdir, "flax"))
    unet_params = params["unet"]
    del params
    latents, t, context = inputs(size)
    step = jitted_unet_step(pipeline, pipeline.attention)
    torch_inputs = [torch.from_numpy(x) for x in (latents, t, context)]
    sides = {"torch": lambda: unet(*torch_inputs).sample.numpy(),
             "ours": lambda: np.asarray(step(unet_params, latents, t, context))}
    times, outputs = {name: [] for name in sides}, {}
    with torch.no_grad():
        for name, fn in sides.items():  # the first calls: compiling, allocating
            outputs[name] = fn()
        for round_ in range(rounds):
            for name in (sides if round_ % 2 == 0 else reversed(list(sides))):
                start = time.perf_counter()
                sides[name]()
                times[name].append(time.perf_counter() - start)
            print(round_, {name: round(v[-1], 2) for name, v in times.items()}, flush=True)
    reference = outputs["torch"]
    ratios = [o / t for o, t in zip(times["ours"], times["torch"])]
    return {"torch_s": times["torch"], "ours_s": times["ours"],
            "ratio_of_mins": min(times["ours"]) / min(times["torch"]),
            "median_pair_ratio": float(np.median(ratios)), "pair_ratios": ratios, "attention": pipeline.attention,
            "rel_error_vs_torch": float(np.abs(outputs["ours"] - reference).max() / np.abs(reference).max())}


def write_interleaved(args) -> None:
    from bench_pipeline import ensure_models

    ensure_models(args.workdir)
    r = run_interleaved(args.workdir, args.size, args.interleaved)
    seconds = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    lines = [f"UNet step, batch 2, {args.size}x{args.size}, fp32, {datetime.date.today()}, {cpu_description()}; "
             f"both sides in one process, {args.interleaved} rounds, order swapped each round; "
             f"our attention: {r['attention']}.", "",
             "| | PyTorch | ours | ours / PyTorch |", "|---|---|---|---|",
             f"| fastest step | {min(r['torch_s']):.2f} s | {min(r['ours_s']):.2f} s | {r['ratio_of_mins']:.2f} |",
             f"| median of the per-round ratios | - | - | {r['median_pair_ratio']:.2f} |",
             f"| every step | {seconds(r['torch_s'])} | {seconds(r['ours_s'])} | {seconds(r['pair_ratios'])} |",
             f"| max rel. error vs PyTorch | - | {r['rel_error_vs_torch']:.1e} | - |"]
    print("\n".join(lines))
    with open(os.path.join(HERE, f"results-unet-{args.size}-interleaved.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", nargs="+", default=["xla", "blockwise"])
    parser.add_argument("--xla-flags", nargs="+", default=["none"],
                        help="one JAX process per entry: 'none', or comma-separated XLA flags without their leading --")
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS",
                        help="both sides in this one process, ROUNDS alternating steps each (see above)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleaved:
        return write_interleaved(args)
    model = os.path.join(args.workdir, "torch" if args.side == "torch" else "flax")
    if args.side == "torch":
        print("RESULT " + json.dumps(run_torch(model, args.size, args.repeats)), flush=True)
        return
    if args.side == "jax":
        print("RESULT " + json.dumps(run_jax(model, args.size, args.repeats, args.attention)), flush=True)
        return
    from bench_pipeline import ensure_models

    ensure_models(args.workdir)
    rows = []
    as_env = lambda entry: "" if entry == "none" else " ".join("--" + f for f in entry.split(","))  # noqa: E731
    sides = [("torch", "")] + [("jax", as_env(entry)) for entry in args.xla_flags]
    for side, flags in sides:
        env = {**os.environ, "XLA_FLAGS": flags}
        command = [sys.executable, __file__, "--side", side, "--size", str(args.size), "--repeats", str(args.repeats),
                   "--workdir", args.workdir, "--attention", *args.attention]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        for name, r in result.items():
            rows.append((side, flags or "-", name, r))
            print(side, flags or "-", name, json.dumps(r), flush=True)
    torch_step = rows[0][3]["step_s"]
    flops = next((r["tflop_per_step"] for *_, r in rows if "tflop_per_step" in r), 0.0) * 1e12
    lines = [f"UNet step, batch 2, {args.size}x{args.size}, fp32, {datetime.date.today()}, {cpu_description()}; "
             f"XLA counts {flops / 1e12:.2f} TFLOP per step.", "",
             "| side | XLA_FLAGS | attention | step | ours / PyTorch | GFLOP/s | first call | max rel. error vs PyTorch |",
             "|---|---|---|---|---|---|---|---|"]
    for side, flags, name, r in rows:
        error = f"{r['rel_error_vs_torch']:.1e}" if "rel_error_vs_torch" in r else "-"
        lines.append(f"| {side} | {flags} | {name} | {r['step_s']:.2f} s | {r['step_s'] / torch_step:.2f} | "
                     f"{flops / r['step_s'] / 1e9:.0f} | {r['first_s']:.1f} s | {error} |")
    print("\n".join(lines))
    with open(os.path.join(HERE, f"results-unet-{args.size}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
