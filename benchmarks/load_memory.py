"""Peak memory of loading the real-size model from PyTorch files (`from_pt=True`) against a converted directory.

    python benchmarks/load_memory.py [--size 256] [--steps 2] [--dtype float32] [--glibc-defaults] [--workdir benchmarks/.cache]

Uses the real-size random model that `bench_pipeline.py` builds and converts once (cached in --workdir). Each
case runs in its own process, torch not importable (as a runtime install runs; safetensors files need no
torch), with no persistent compilation cache, glibc tuned as the CLI does (not with --glibc-defaults):
`from_pretrained` of the converted directory, or of the PyTorch directory with `from_pt=True`, then one
generation at --size. Each reports its peak RSS (`ru_maxrss`) right after loading and at the end. Prints the
table and writes it into benchmarks/README.md, between the `load_memory` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README = os.path.join(HERE, "README.md")
BEGIN, END = "<!-- load_memory: begin -->", "<!-- load_memory: end -->"

from machine import cpu_description  # noqa: E402  (benchmarks/ is on sys.path: run as a script)

CASES = (("converted", "converted directory"), ("from_pt", "PyTorch directory, `from_pt=True`"))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_case(case: str, model_dir: str, size: int, steps: int, dtype: str, bert_dir: str, tune: bool) -> dict:
    """Load (timed), then one generation; the peak RSS after each."""
    import jax
    import jax.numpy as jnp

    import blipdiff_jax
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    if tune:
        blipdiff_jax.tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    from blipdiff_jax.tiny import demo_reference_image

    start = time.perf_counter()
    if case == "from_pt":
        pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(
            model_dir, from_pt=True, dtype=jnp.dtype(dtype), qformer_tokenizer=bert_dir)
    else:
        pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
    jax.block_until_ready(params)
    load_s, loaded = time.perf_counter() - start, peak_rss_gib()
    start = time.perf_counter()
    pipeline("on the beach", demo_reference_image(256), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
             height=size, width=size, num_inference_steps=steps, output_type="np")
    return {"load_s": load_s, "generate_s": time.perf_counter() - start, "peak_after_loading_gib": loaded,
            "peak_gib": peak_rss_gib(), "torch_imported": sys.modules.get("torch") is not None}


def table(runs: dict, size: int, steps: int, dtype: str, tune: bool) -> str:
    base = runs["converted"]
    lines = [
        f"{cpu_description()}; random weights of the real size, {dtype}, one {size}×{size} generation of {steps} "
        f"steps after loading; each case in its own process, torch not importable, no persistent compilation "
        f"cache, {'glibc tuned as the CLI does (`tune_host_memory()`)' if tune else 'glibc defaults'}. "
        f"Peak RSS (`ru_maxrss`) in GiB.",
        "",
        "| loaded from | load time | peak RSS after loading | peak RSS, load + generation | / converted |",
        "|---|---|---|---|---|",
    ]
    for case, label in CASES:
        run = runs[case]
        lines.append(f"| {label} | {run['load_s']:.1f} s | {run['peak_after_loading_gib']:.2f} | "
                     f"{run['peak_gib']:.2f} | {run['peak_gib'] / base['peak_gib']:.2f} |")
    return "\n".join(lines)


def write_readme(report: str) -> None:
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} section to write into")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(README, "w") as f:
        f.write(f"{head}{BEGIN}\n{report}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", default=os.path.join(HERE, ".cache"))
    parser.add_argument("--cases", nargs="+", default=[case for case, _ in CASES], choices=[case for case, _ in CASES])
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="without tune_host_memory() (which the CLI and the other benchmarks turn on)")
    parser.add_argument("--case", choices=[case for case, _ in CASES], help=argparse.SUPPRESS)  # internal: one per process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bert_dir = os.path.join(os.path.abspath(args.workdir), "bert")
    if args.case:
        sys.modules["torch"] = None  # as a runtime install runs: neither path may need torch for safetensors
        sys.path.insert(0, ROOT)
        result = run_case(args.case, args.model, args.size, args.steps, args.dtype, bert_dir, not args.glibc_defaults)
        print("RESULT " + json.dumps(result), flush=True)
        return
    from bench_pipeline import FULL_CONFIG, ensure_models

    if not os.path.isfile(FULL_CONFIG):
        sys.exit("needs ../shared/reference/blipdiffusion_full.json (the real architecture)")
    os.makedirs(args.workdir, exist_ok=True)
    torch_dir, flax_dir = ensure_models(args.workdir)
    runs = {}
    for case in args.cases:
        print(f"running {case} ...", flush=True)
        command = [sys.executable, __file__, "--case", case, "--model", flax_dir if case == "converted" else torch_dir,
                   "--size", str(args.size), "--steps", str(args.steps), "--dtype", args.dtype,
                   "--workdir", args.workdir] + (["--glibc-defaults"] if args.glibc_defaults else [])
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
        runs[case] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
        print(json.dumps(runs[case]), flush=True)
    if len(runs) < len(CASES):
        return
    report = table(runs, args.size, args.steps, args.dtype, not args.glibc_defaults)
    print(report)
    if not args.no_readme:
        write_readme(report)


if __name__ == "__main__":
    main()
