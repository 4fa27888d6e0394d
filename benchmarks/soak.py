"""Soak: many generations in one process with varied shapes and batch sizes; memory must not grow beyond
what the compilation cache takes for the distinct shapes.

    python benchmarks/soak.py [--generations 200]

Reports resident memory after every distinct shape has compiled once, and at the end.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import tempfile
import time

SHAPES = [(16, 16, 1), (24, 16, 2)]  # (height, width, batch)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(generations: int = 200, log=print) -> dict:
    import jax
    import numpy as np

    from blipdiff_jax import FlaxBlipDiffusionPipeline, tiny, tune_host_memory

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    with tempfile.TemporaryDirectory() as workdir:
        pipeline, params = FlaxBlipDiffusionPipeline.from_converted(tiny.build_tiny_model(workdir))
    reference = tiny.demo_reference_image()
    prompts = ["on the beach", "in the snow, at night", "", "swimming underwater " * 3]

    def run(i, shape):
        height, width, batch = shape
        out = pipeline([prompts[(i + k) % len(prompts)] for k in range(batch)], reference, "dog", "dog", params=params,
                       prng_seed=jax.random.PRNGKey(i), height=height, width=width, num_inference_steps=2, output_type="np")
        assert np.isfinite(out.images).all()

    started = time.perf_counter()
    for i, shape in enumerate(SHAPES):  # compile every program once
        run(i, shape)
    gc.collect()
    warm = rss_mb()
    shapes = itertools.cycle(SHAPES)
    for i in range(len(SHAPES), generations):
        run(i, next(shapes))
    gc.collect()
    final = rss_mb()
    result = {"generations": generations, "distinct_shapes": len(SHAPES), "rss_after_warmup_mb": round(warm, 1),
              "rss_final_mb": round(final, 1), "growth_mb": round(final - warm, 1),
              "seconds": round(time.perf_counter() - started, 1)}
    log(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=200)
    soak(parser.parse_args().generations)
