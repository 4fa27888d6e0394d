"""Peak memory of real-size subject fine-tuning, from XLA's buffer assignment and from a measured run.

    python benchmarks/finetune_memory.py analyse [--resolution 512] [--batch-size 3] [--remat] [--bf16]
    python benchmarks/finetune_memory.py measure [--resolution 128] [--batch-size 1] [--steps 2]

`analyse` compiles the real-size training step (`../shared/reference/blipdiffusion_full.json`) on abstract
inputs (nothing is allocated) and prints XLA's memory analysis of the compiled program: arguments (trained
params, optimizer state, frozen VAE and text encoder, batch), outputs, temporaries, and what donation
aliases; the step's peak is arguments + temporaries + outputs - aliased.

`measure` runs real steps of the same program on the real-size random model that `bench_pipeline.py`
caches (benchmarks/.cache/flax) and prints the process's peak RSS next to the analysis of that program, so
the analysis can be checked against a measurement on this machine before it is trusted at 512x512.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
FULL_CONFIG = os.path.join(ROOT, "..", "shared", "reference", "blipdiffusion_full.json")
GB = 2**30


def real_configs() -> dict:
    with open(FULL_CONFIG) as f:
        full = json.load(f)
    return {name: {k: v for k, v in full[name].items() if not k.startswith("_")}
            for name in ("unet", "vae", "text_encoder", "scheduler")}


def abstract(name: str, config: dict):
    import jax

    from blipdiff_jax import components

    module = components.build_model(name, config)
    return jax.eval_shape(lambda: components.init_params(name, module))


def step_program(configs: dict, resolution: int, batch: int, remat: bool, bf16: bool, trainable=None, frozen=None):
    """(jitted step, abstract or real arguments) of the fine-tuning step for these settings."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from blipdiff_jax.training.trainer import make_optimizer, make_train_step
    from blipdiff_jax.training.loss import DiffusionLoss

    loss = DiffusionLoss(configs, 2, jnp.bfloat16 if bf16 else jnp.float32, remat)
    optimizer = make_optimizer(5e-6, 0.01)
    step = make_train_step(loss, optimizer)
    if trainable is None:
        trainable = {"unet": abstract("unet", configs["unet"]),
                     "subject_embeddings": jax.ShapeDtypeStruct((1, 16, configs["text_encoder"]["hidden_size"]), jnp.float32)}
        frozen = {"vae": abstract("vae", configs["vae"]), "text_encoder": abstract("text_encoder", configs["text_encoder"])}
    opt_state = jax.eval_shape(optimizer.init, trainable)
    pixels = jax.ShapeDtypeStruct((batch, 3, resolution, resolution), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)  # noqa: E731
    return step, optimizer, (shapes(trainable), opt_state, shapes(frozen), pixels, ids, key)


def analysis(step, args) -> dict:
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    sizes = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
             "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    sizes["peak"] = sizes["arguments"] + sizes["temporaries"] + sizes["outputs"] - sizes["aliased"]
    return {"compile_s": round(seconds, 1), **{k: round(v / GB, 2) for k, v in sizes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["analyse", "measure"])
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    configs = real_configs()
    if args.mode == "analyse":
        resolution, batch = args.resolution or 512, args.batch_size or 3
        step, _, shapes = step_program(configs, resolution, batch, args.remat, args.bf16)
        result = analysis(step, shapes)
        print(json.dumps({"resolution": resolution, "batch": batch, "remat": args.remat, "bf16": args.bf16,
                          "analysis_GiB": result}))
        return

    import jax
    import numpy as np

    from blipdiff_jax import tune_host_memory
    from blipdiff_jax.checkpoint import load_converted

    tune_host_memory()  # the glibc tuning the CLI turns on (blipdiff_jax/host_memory.py)
    resolution, batch = args.resolution or 128, args.batch_size or 1
    model = load_converted(os.path.join(HERE, ".cache", "flax"))
    trainable = {"unet": model.params["unet"], "subject_embeddings": np.zeros((1, 16, 768), np.float32)}
    frozen = {"vae": model.params["vae"], "text_encoder": model.params["text_encoder"]}
    del model
    step, optimizer, shapes = step_program(configs, resolution, batch, args.remat, args.bf16, trainable, frozen)
    result = analysis(step, shapes)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainable, frozen = jax.device_put((trainable, frozen))
    opt_state = optimizer.init(trainable)
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch, 3, resolution, resolution)).astype(np.float32)
    ids = np.array([[49406, 320, 1929, 49407]], np.int32)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, frozen, pixels, ids, jax.random.PRNGKey(i))
        loss = float(loss)
        times.append(round(time.perf_counter() - start, 1))
    print(json.dumps({"resolution": resolution, "batch": batch, "remat": args.remat, "bf16": args.bf16,
                      "analysis_GiB": result, "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "rss_after_loading_GiB": round(rss_loaded, 2), "step_s": times, "loss": loss}))


if __name__ == "__main__":
    main()
