"""Stage-2 pre-training at scale: the memory plan of the real-size step on a mesh, the tiny model's step on
1, 2 and 4 devices, and a run over several processes.

    python benchmarks/pretrain_scaling.py plan [--mesh 'data=1,fsdp=8;data=2,fsdp=4'] [--per-device-batch 2] [--remat] [--write]
    python benchmarks/pretrain_scaling.py scaling [--steps 12] [--write]
    python benchmarks/pretrain_scaling.py processes --model DIR --out OUT [--processes 2] [--mesh fsdp=2]
                                                    [--settings JSON] [--stop-after 5]

`plan` builds the real-size model (`../shared/reference/blipdiffusion_full.json`) as shapes only (nothing is
allocated), on `--fake-devices` (default 8) CPU devices, and prints `SubjectPretrainer.plan()`: XLA's
per-device memory analysis of the compiled stage-2 step at 512x512 with bf16 compute, the `--plan` of the
CLI. `scaling` trains the tiny random model on the toy world on meshes of 1, 2 and 4 fake CPU devices
(data and fsdp) and prints steps/s and the losses against one device. `--write` updates
benchmarks/results-pretrain.md. `processes` starts `--processes` workers of this script on localhost
(jax.distributed, CPU collectives over gloo, one CPU device each) that pre-train a converted model together;
process 0 writes OUT/loss.jsonl and every process its shards of OUT/checkpoints (tests/training/test_sharding.py
compares them with one process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
FULL_CONFIG = os.path.join(ROOT, "..", "shared", "reference", "blipdiffusion_full.json")
RESULTS = os.path.join(HERE, "results-pretrain.md")
# The tiny model's runs: the UNet trained (the frozen Q-Former, text encoder and VAE sharded by the same rule),
# which compiles in about half the time of the three default groups.
TOY_SETTINGS = dict(toy=True, resolution=16, batch_size=8, learning_rate=1e-3, warmup_steps=2, seed=5, steps=30,
                    prompt_reps=1, progress=False, shard_min_size=1024, train=("unet",))


def fake_devices(count: int) -> None:
    """`count` CPU devices for this process (before jax is imported)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


# ------------------------------------------------------------------------------------------------- plan


def abstract_real_model():
    """The real-size ConvertedModel with ShapeDtypeStruct params (the tiny model's tokenizers: only the token
    counts matter for shapes)."""
    import tempfile

    import jax

    from blipdiff_jax import components, tiny
    from blipdiff_jax.checkpoint import ConvertedModel

    with open(FULL_CONFIG) as f:
        full = json.load(f)
    configs = {name: {k: v for k, v in full[name].items() if not k.startswith("_")}
               for name in ("qformer", "text_encoder", "unet", "vae", "scheduler", "image_processor")}
    params = {name: jax.eval_shape(lambda name=name: components.init_params(name, components.build_model(name, configs[name])))
              for name in ("qformer", "text_encoder", "unet", "vae")}
    with tempfile.TemporaryDirectory() as folder:
        base = tiny.build_tiny_model(folder)
    pipeline_config = {k: v for k, v in full["pipeline"].items() if not k.startswith("_")}
    return ConvertedModel(pipeline_config, configs, params, base.tokenizer, base.qformer_tokenizer)


def plan(mesh: str, per_device_batch: int, remat: bool, fake: int, budget_gib: float, grad_accum: int = 1) -> dict:
    import jax.numpy as jnp

    from blipdiff_jax.training.pretrain import PretrainConfig, SubjectPretrainer

    devices = 1
    for part in mesh.split(","):
        devices *= int(part.split("=")[1])
    config = PretrainConfig(out=os.path.join("/tmp", "blipdiff-plan-unused"), toy=True, resolution=512,
                            batch_size=per_device_batch * devices, compute_dtype=jnp.bfloat16, remat=remat, mesh=mesh,
                            grad_accum=grad_accum, device_memory_gib=budget_gib, progress=False)
    trainer = SubjectPretrainer(abstract_real_model(), config)
    started = time.perf_counter()
    result = trainer.plan()
    return {**result.as_dict(), "mesh": mesh, "fake_devices": fake, "per_device_batch": per_device_batch, "remat": remat,
            "grad_accum": grad_accum, "compile_s": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------- scaling


def scaling(steps: int) -> list[dict]:
    import tempfile

    from blipdiff_jax import tiny
    from blipdiff_jax.training.pretrain import PretrainConfig, SubjectPretrainer

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = tiny.build_tiny_model(os.path.join(folder, "model"))
        reference = None
        for mesh in ("data=1", "data=2", "fsdp=2", "data=4", "fsdp=4", "data=2,fsdp=2"):
            out = os.path.join(folder, mesh.replace(",", "_").replace("=", ""))
            trainer = SubjectPretrainer(model, PretrainConfig(out=out, mesh=mesh, **{**TOY_SETTINGS, "steps": steps}))
            trainer.train()
            with open(os.path.join(out, "loss.jsonl")) as f:
                log = [json.loads(line) for line in f]
            times = [b["time"] - a["time"] for a, b in zip(log[1:], log[2:])]  # after the compiled first step
            losses = [entry["loss"] for entry in log]
            reference = reference or losses
            rows.append({"mesh": mesh, "devices": trainer.num_devices, "steps_per_s": round(len(times) / sum(times), 2),
                         "max_loss_difference": max(abs(a - b) for a, b in zip(losses, reference))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -------------------------------------------------------------------------------------------- processes


def worker(args) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.processes,
                               process_id=args.process_id, initialization_timeout=int(args.timeout))
    from blipdiff_jax.checkpoint import load_converted
    from blipdiff_jax.training.pretrain import PretrainConfig, SubjectPretrainer

    settings = {**TOY_SETTINGS, **json.loads(args.settings)}
    trainer = SubjectPretrainer(load_converted(args.model), PretrainConfig(out=args.out, mesh=args.mesh, **settings))
    trainer.train(stop_after=args.stop_after)
    print(f"process {jax.process_index()}: {trainer.stopped_at} steps on a global mesh of {trainer.num_devices}", flush=True)


def launch(args) -> int:
    from multiprocess import free_port

    port = free_port()
    env = dict(os.environ)
    fake_devices_env = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{fake_devices_env} --xla_force_host_platform_device_count=1".strip()
    procs = [subprocess.Popen([sys.executable, __file__, "worker", "--model", args.model, "--out", args.out,
                               "--processes", str(args.processes), "--process-id", str(i), "--port", str(port),
                               "--mesh", args.mesh, "--settings", args.settings, "--stop-after", str(args.stop_after),
                               "--timeout", str(args.timeout)], env=env, cwd=ROOT)
             for i in range(args.processes)]
    deadline = time.time() + args.timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(-9)
    print(f"worker exit codes: {codes}")
    return 0 if all(code == 0 for code in codes) else 1


def write_results(plans: list[dict] | None, rows: list[dict] | None) -> None:
    from machine import cpu_description

    lines = ["# Pre-training at scale", "",
             "Written by `python benchmarks/pretrain_scaling.py plan --write` and `scaling --write` on "
             f"{cpu_description()}. No PyTorch column: LAVIS released no stage-2 training to run beside it.", ""]
    if plans:
        lines += ["## Memory plan of the real-size stage-2 step (512x512, bf16 compute, fp32 AdamW state)", "",
                  "XLA's memory analysis of the compiled step per device (`blipdiff-jax pretrain ... --plan`), compiled "
                  "for fake CPU devices; trained: Q-Former, text encoder, UNet; total = arguments + temporaries + "
                  "outputs - aliased (donated state). Target: <= 14 GiB per device (a 16 GB chip). This is the CPU "
                  "compiler's buffer assignment: a TPU's or GPU's compiler lays out and fuses differently, so run "
                  "`--plan` on the target before a long job (it checks the device's own limit there).",
                  "", "| mesh | batch per device | remat | arguments GiB | temporaries GiB | outputs GiB | aliased GiB | total GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in plans:
            lines.append(f"| {p['mesh']} | {p['per_device_batch']} | {'yes' if p['remat'] else 'no'} | {p['arguments']} | "
                         f"{p['temporaries']} | {p['outputs']} | {p['aliased']} | **{p['total']}** |")
        lines.append("")
    if rows:
        lines += ["## Tiny model on fake CPU devices (toy world, 16x16, batch 8)", "",
                  "Fake CPU devices share this machine's 2 cores: steps/s shows the overhead of sharding, not a speed-up. "
                  "The losses equal one device's.", "",
                  "| mesh | devices | steps/s | max loss difference vs 1 device |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['mesh']} | {r['devices']} | {r['steps_per_s']} | {r['max_loss_difference']:.1e} |")
        lines.append("")
    old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
    keep = {}
    for title in ("## Memory plan", "## Tiny model"):
        if title in old:
            start = old.index(title)
            end = old.find("\n## ", start + 1)
            keep[title] = old[start: end if end >= 0 else len(old)].rstrip() + "\n"
    text = "\n".join(lines)
    for title, block in keep.items():
        if title not in text:
            text += "\n" + block
    with open(RESULTS, "w") as f:
        f.write(text.rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["plan", "scaling", "processes", "worker"])
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--fake-devices", type=int, default=8)
    parser.add_argument("--budget-gib", type=float, default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--stop-after", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=240)
    args = parser.parse_args()
    if args.mode == "worker":
        worker(args)
        return 0
    if args.mode == "processes":
        args.mesh = args.mesh or f"fsdp={args.processes}"
        return launch(args)
    if args.mode == "plan":
        fake_devices(args.fake_devices)
        meshes = args.mesh.split(";") if args.mesh else ["data=1,fsdp=8", "data=2,fsdp=4"]
        results = []
        for mesh in meshes:
            results.append(plan(mesh, args.per_device_batch, args.remat, args.fake_devices, args.budget_gib, args.grad_accum))
            print(json.dumps(results[-1]), flush=True)
        if args.write:
            write_results(results, None)
        return 0
    fake_devices(4)
    rows = scaling(args.steps)
    if args.write:
        write_results(None, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
