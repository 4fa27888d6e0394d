"""Images per second through the sharded path on 1, 2 and 4 devices (a `jax.sharding.Mesh` over the batch).

    python benchmarks/bench_scaling.py [--model tiny|DIR] [--devices 1 2 4] [--per-device 2] [--size 64] [--steps 10]

On CPU the devices are fake (`--xla_force_host_platform_device_count`, set here before jax starts): they
share the machine's cores, so the table shows what sharding costs, not a speed-up; on a multi-GPU/TPU host
the same command measures real scaling. Every device count runs in this one process on the same prompts;
the images are checked to be the same as on one device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (the embedded demo model) or a converted directory")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--per-device", type=int, default=2, help="images per device per call")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(args.devices)}").strip()

    import jax
    import numpy as np
    from jax.sharding import Mesh

    from blipdiff_jax import FlaxBlipDiffusionPipeline, tiny, tune_host_memory

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    with tempfile.TemporaryDirectory() as workdir:
        if args.model == "tiny":
            pipeline, params = FlaxBlipDiffusionPipeline.from_converted(tiny.build_tiny_model(workdir))
        else:
            pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(args.model)
    if len(jax.devices()) < max(args.devices):
        sys.exit(f"--devices: only {len(jax.devices())} devices")
    reference = tiny.demo_reference_image()
    rows, baseline = [], None
    print(f"{jax.devices()[0].platform}: {len(jax.devices())} devices; {args.size}x{args.size}, {args.steps} steps, "
          f"{args.per_device} images per device per call, guidance 7.5")
    for count in args.devices:
        batch = count * args.per_device
        mesh = Mesh(np.array(jax.devices()[:count]), ("data",))
        side = args.size // pipeline.latent_factor  # the first rows are the same for every batch size
        latents = np.random.default_rng(0).standard_normal((batch, pipeline.unet.in_channels, side, side)).astype(np.float32)

        def call():
            return pipeline(["on the beach"] * batch, reference, "dog", "dog", params=params, latents=latents, mesh=mesh,
                            height=args.size, width=args.size, num_inference_steps=args.steps, output_type="np").images

        start = time.perf_counter()
        images = call()
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            images = call()
            times.append(time.perf_counter() - start)
        if baseline is None:
            baseline = images[: args.per_device]
        same = float(np.abs(images[: args.per_device] - baseline).max())
        rows.append((count, batch, first, min(times), batch / min(times), same))
    print("\n| devices | images per call | first call | steady call | images/s | max diff vs 1 device |")
    print("|---|---|---|---|---|---|")
    for count, batch, first, steady, rate, same in rows:
        print(f"| {count} | {batch} | {first:.2f} s | {steady:.3f} s | {rate:.1f} | {same:.1e} |")


if __name__ == "__main__":
    main()
