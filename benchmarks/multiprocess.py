"""Two JAX processes on localhost, one global mesh: the same images as one process (issue 8, scale-out).

    python benchmarks/multiprocess.py [--processes 2] [--local-devices 2] [--timeout 300]

The driver builds the tiny random-weight model once into a temporary directory, runs one single-process
generation (4 prompts, fixed latents from numpy, output_type="np"), then starts `--processes` workers of this
script on localhost. Each worker calls `jax.distributed.initialize` (CPU collectives over gloo), sees
`--local-devices` fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count), builds one Mesh over
`jax.devices()` (every process's devices) and runs the same generation through the pipeline's `mesh=` path.
Process 0 writes the gathered images; the driver checks them against the single-process images
(max abs difference <= --atol, default 1e-5) and exits non-zero on a mismatch, a failed worker or --timeout.

This is the path a multi-host TPU pod takes: there `jax.distributed.initialize()` needs no arguments and the
pipeline call is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

PROMPTS = ["on grass", "in snow", "at night", "on a boat"]
TARGETS = ["dog", "cat", "dog", "cat"]


def cpu_collectives_available() -> bool:
    """Whether this jaxlib can run CPU collectives across processes (gloo)."""
    try:
        from jax._src.lib import _jax
    except ImportError:  # older jaxlib layout
        try:
            from jax._src.lib import xla_extension as _jax
        except ImportError:
            return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def generate(model_dir: str, size: int, steps: int, mesh=None, log=lambda message: None):
    """The one generation both sides run: 4 prompts, latents from numpy, float images."""
    import numpy as np

    from blipdiff_jax import FlaxBlipDiffusionPipeline, tiny, tune_host_memory

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    started = time.perf_counter()
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(model_dir)
    log(f"loaded in {time.perf_counter() - started:.1f}s")
    shape = (len(PROMPTS), pipeline.unet.in_channels, size // pipeline.latent_factor, size // pipeline.latent_factor)
    latents = np.random.RandomState(5).randn(*shape).astype(np.float32)
    if mesh is not None:
        params = pipeline.shard_params(params, mesh)  # placed once; every call then moves only the batch
    out = pipeline(PROMPTS, tiny.demo_reference_image(), "dog", TARGETS, params=params, latents=latents,
                   height=size, width=size, num_inference_steps=steps, output_type="np", mesh=mesh)
    return np.asarray(out.images)


def worker(args) -> None:
    import jax

    # Before anything touches a backend: CPU collectives across processes, then the distributed runtime.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.processes,
        process_id=args.process_id,
        local_device_ids=list(range(args.local_devices)),
        initialization_timeout=int(args.timeout),
    )
    import numpy as np
    from jax.sharding import Mesh

    assert jax.process_count() == args.processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local devices, "
          f"global mesh of {mesh.devices.size}", flush=True)
    started = time.perf_counter()
    images = generate(args.model, args.size, args.steps, mesh=mesh, log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - started
    if jax.process_index() == 0:
        np.save(args.out, images)
        with open(args.out + ".json", "w") as f:
            json.dump({"seconds": seconds, "global_devices": int(mesh.devices.size),
                       "processes": jax.process_count()}, f)
    jax.distributed.shutdown()


def worker_env(local_devices: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def driver(args) -> int:
    if not cpu_collectives_available():
        print("multiprocess: this jaxlib has no CPU collectives (gloo); nothing to run", file=sys.stderr)
        return 2
    if len(PROMPTS) % (args.processes * args.local_devices):
        print(f"multiprocess: {len(PROMPTS)} prompts do not split over {args.processes}x{args.local_devices} devices",
              file=sys.stderr)
        return 2
    import numpy as np

    from blipdiff_jax import tiny
    from blipdiff_jax.checkpoint import save_converted

    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="blipdiff-multiprocess-") as workdir:
        model_dir = save_converted(tiny.build_tiny_model(os.path.join(workdir, "build")), os.path.join(workdir, "model"))
        started = time.perf_counter()
        single = generate(model_dir, args.size, args.steps)
        single_seconds = time.perf_counter() - started
        np.save(os.path.join(workdir, "single.npy"), single)
        print(f"single process: images {single.shape} in {single_seconds:.1f}s", flush=True)

        out = os.path.join(workdir, "multi.npy")
        port = free_port()
        started = time.perf_counter()
        procs, logs = [], []
        for i in range(args.processes):
            log = open(os.path.join(workdir, f"worker{i}.log"), "w+")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--process-id", str(i), "--port", str(port),
                   "--processes", str(args.processes), "--local-devices", str(args.local_devices), "--model", model_dir,
                   "--out", out, "--size", str(args.size), "--steps", str(args.steps),
                   "--timeout", str(max(10, int(deadline - time.monotonic())))]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env(args.local_devices)))
            logs.append(log)
        failed = None
        try:
            for i, proc in enumerate(procs):
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0 and failed is None:
                    failed = f"worker {i} exited with {rc}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {args.timeout:.0f}s"
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        multi_seconds = time.perf_counter() - started
        for i, log in enumerate(logs):
            log.seek(0)
            text = log.read()
            log.close()
            if failed or args.verbose:
                print(f"--- worker {i} log (last 3000 chars) ---\n{text[-3000:]}", file=sys.stderr)
        if failed:
            print(f"multiprocess: FAILED: {failed}", file=sys.stderr)
            return 1
        multi = np.load(out)
        with open(out + ".json") as f:
            info = json.load(f)
    if multi.shape != single.shape:
        print(f"multiprocess: MISMATCH: shapes {multi.shape} vs {single.shape}", file=sys.stderr)
        return 1
    diff = float(np.max(np.abs(multi.astype(np.float64) - single.astype(np.float64))))
    ok = diff <= args.atol
    print(f"{info['processes']} processes x {args.local_devices} devices (global mesh of {info['global_devices']}): "
          f"generation {info['seconds']:.1f}s, workers {multi_seconds:.1f}s wall")
    print(f"max abs difference vs single process: {diff:.3g} (atol {args.atol:g}): {'EQUAL' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--local-devices", type=int, default=2, help="fake CPU devices per process")
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run (model build, single run, workers)")
    parser.add_argument("--verbose", action="store_true", help="print the workers' logs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
