"""LoRA fine-tuning against full fine-tuning: memory of the real-size step, adapter size, and what it learns on
the toy world.

    python benchmarks/lora.py [--resolution 512] [--batch-size 3] [--rank 4] [--skip-memory] [--skip-toy]

- memory: XLA's memory analysis of the compiled real-size fine-tuning step (`../shared/reference/
  blipdiffusion_full.json`), compiled on abstract inputs (nothing is allocated): full fine-tuning (UNet and
  subject embeddings trained) against LoRA (rank-R factors of the UNet's attention projections, with and
  without the text encoder's, and the subject embeddings); fp32, no remat, the defaults of `finetune`.
- size: the adapter file `finetune --lora-rank R` writes (factors of the real shapes) against the UNet's fp32
  weights.
- toy: on the shipped toy model, the held-out subject zero-shot transfer gets right least often, fine-tuned on 8
  pictures of it in context (benchmarks/toy_transfer.py's `finetune_gain`): zero-shot, full fine-tuning and LoRA
  fine-tuning, the same generations scored by the toy world's analyser, and each run's loss.
Writes benchmarks/results-lora.md (and prints the numbers as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
GB = 2**30


def lora_step_program(configs: dict, resolution: int, batch: int, rank: int, text_encoder: bool):
    """(jitted step, abstract arguments) of the LoRA fine-tuning step `finetune --lora-rank` runs."""
    import jax
    import jax.numpy as jnp
    from finetune_memory import abstract

    from blipdiff_jax.models.lora import DEFAULT_TARGETS, factor_shapes, target_modules
    from blipdiff_jax.training.lora import LoraDiffusionLoss
    from blipdiff_jax.training.trainer import make_optimizer, make_train_step
    from flax.traverse_util import unflatten_dict

    frozen = {name: abstract(name, configs[name]) for name in ("vae", "unet", "text_encoder")}
    trainable = {"subject_embeddings": jax.ShapeDtypeStruct((1, 16, configs["text_encoder"]["hidden_size"]), jnp.float32)}
    for name, style in (("unet", "diffusers"), ("text_encoder", "transformers")):
        if name == "text_encoder" and not text_encoder:
            continue
        flat = {}
        for path, shape in target_modules(frozen[name], style, DEFAULT_TARGETS[name]).values():
            down, up = factor_shapes(shape, rank)
            flat[path + ("down",)], flat[path + ("up",)] = jax.ShapeDtypeStruct(down, jnp.float32), jax.ShapeDtypeStruct(up, jnp.float32)
        trainable[name + "_lora"] = unflatten_dict(flat)
    loss = LoraDiffusionLoss(configs, 2, jnp.float32, False, 1.0)
    optimizer = make_optimizer(1e-4, 0.01)
    step = make_train_step(loss, optimizer)
    pixels = jax.ShapeDtypeStruct((batch, 3, resolution, resolution), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return step, (trainable, jax.eval_shape(optimizer.init, trainable), frozen, pixels, ids, key)


def memory(resolution: int, batch: int, rank: int) -> dict:
    from finetune_memory import analysis, real_configs, step_program

    configs = real_configs()
    rows = {}
    step, _, args = step_program(configs, resolution, batch, remat=False, bf16=False)
    rows["full fine-tuning (UNet + subject embeddings)"] = analysis(step, args)
    for text_encoder in (False, True):
        step, args = lora_step_program(configs, resolution, batch, rank, text_encoder)
        label = f"LoRA rank {rank}, UNet attention{' + text encoder attention' if text_encoder else ''} (+ subject embeddings)"
        rows[label] = analysis(step, args)
    return rows


def sizes(rank: int) -> dict:
    """Bytes of the UNet's fp32 weights and of the adapter files (real shapes, rank `rank`)."""
    import jax
    import numpy as np
    from finetune_memory import abstract, real_configs

    from blipdiff_jax import components
    from blipdiff_jax.lora_files import write_lora
    from blipdiff_jax.models.lora import DEFAULT_TARGETS, init_factors, parameter_count, target_modules

    configs = real_configs()
    trees = {name: abstract(name, configs[name]) for name in ("unet", "text_encoder")}
    unet_bytes = 4 * sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(trees["unet"]))
    out = {"unet_fp32_bytes": unet_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        for label, names in (("unet", ("unet",)), ("unet+text_encoder", ("unet", "text_encoder"))):
            factors, lora_configs = {}, {}
            for name in names:
                modules = target_modules(trees[name], components.NAMING_STYLE[name], DEFAULT_TARGETS[name])
                factors[name] = init_factors(modules, rank, 0)
                lora_configs[name] = {"r": rank, "lora_alpha": float(rank), "target_modules": list(DEFAULT_TARGETS[name])}
            path = write_lora(os.path.join(tmp, f"{label}.safetensors"), factors, lora_configs, components.NAMING_STYLE)
            out[label] = {"bytes": os.path.getsize(path), "parameters": parameter_count(factors),
                          "modules": sum(len(target_modules(trees[n], components.NAMING_STYLE[n], DEFAULT_TARGETS[n])) for n in names)}
    return out


def toy(rank: int, learning_rates: list[float], seeds: int) -> dict:
    """Zero-shot, full and LoRA fine-tuning (at each learning rate) of the toy model on its hardest held-out
    subject; each fine-tuned model draws 4 backgrounds x `seeds` generations (`finetune_gain`)."""
    from toy_transfer import finetune_gain

    from blipdiff_jax import TOY_MODEL

    subject = ("triangle", "pink", "striped")  # the held-out subject zero-shot transfer gets right least often (results-toy.md)
    runs = {"full": finetune_gain(TOY_MODEL, subject, seeds=seeds)}
    for rate in learning_rates:
        runs[f"lora {rate:g}"] = finetune_gain(TOY_MODEL, subject, seeds=seeds, zero_shot=False, overrides={
            "lora_rank": rank, "learning_rate": rate, "base_model": TOY_MODEL})
    return runs


def _gib(x: float) -> str:
    return f"{x:.2f}"


def write_markdown(path: str, result: dict, args) -> None:
    from machine import cpu_description

    lines = ["# LoRA fine-tuning against full fine-tuning", "",
             f"Written by `benchmarks/lora.py`; CPU: {cpu_description()}.", ""]
    if "memory" in result:
        lines += [f"## Memory of one real-size fine-tuning step ({args.resolution}×{args.resolution}, batch {args.batch_size})", "",
                  "XLA's memory analysis of the compiled step (CPU backend, fp32 weights and compute, no remat), "
                  "compiled on abstract inputs. GiB. Arguments: trained weights, optimizer state, frozen weights, "
                  "batch; peak = arguments + temporaries + outputs − aliased (outputs donated into the arguments).", "",
                  "| step | arguments | temporaries | outputs | aliased | peak | peak / full |", "|---|---|---|---|---|---|---|"]
        full = next(iter(result["memory"].values()))["peak"]
        for label, m in result["memory"].items():
            lines.append(f"| {label} | {_gib(m['arguments'])} | {_gib(m['temporaries'])} | {_gib(m['outputs'])} | "
                         f"{_gib(m['aliased'])} | {_gib(m['peak'])} | {m['peak'] / full:.2f} |")
        lines += ["", "- Full fine-tuning's arguments are the UNet and AdamW's two moments of it (3 × 3.2 GiB) plus the "
                  "frozen VAE and text encoder; LoRA's are the frozen UNet, VAE and text encoder, and megabytes of "
                  "factors and moments. The base is not in the optimizer state and nothing of it is donated or output.",
                  "- The temporaries (the backward pass's activations and gradients) shrink less: the gradients must "
                  "still flow back through every layer to reach the factors and the subject embeddings; what goes is "
                  "the UNet-sized gradient and update.",
                  "- The merged attention kernels are computed inside the step (W + alpha/r · B @ A) and counted in "
                  "the temporaries.", ""]
    if "sizes" in result:
        s = result["sizes"]
        unet = s["unet_fp32_bytes"]
        lines += [f"## Adapter size at rank {args.rank}", "",
                  "| what | modules | parameters | file | / UNet fp32 |", "|---|---|---|---|---|",
                  f"| UNet weights, fp32 | - | {unet // 4:,} | {unet / 1e9:.2f} GB | 100% |"]
        for label in ("unet", "unet+text_encoder"):
            e = s[label]
            lines.append(f"| adapter, {label.replace('+', ' + ')} attention | {e['modules']} | {e['parameters']:,} | "
                         f"{e['bytes'] / 1e6:.2f} MB | {100 * e['bytes'] / unet:.3f}% |")
        lines += ["", "Target: ≤ 1% of the UNet at rank 4. A full fine-tuning's output is the whole model "
                  "(UNet included); a LoRA run's is the adapter, the subject embeddings (48 KB) and a manifest.", ""]
    if "toy" in result:
        runs = result["toy"]
        full = runs["full"]
        lines += ["## Toy world: does LoRA fine-tuning learn the subject?", "",
                  f"The shipped toy model, held-out subject {full['subject']} (zero-shot transfer's weakest), "
                  f"{full['finetune_images']} pictures of it on the named backgrounds, {full['finetune_steps']} steps of "
                  "batch 8; then generations with the learned subject embeddings and no reference, scored by "
                  "`toyworld.analyse` (colour and pattern both right). Zero-shot: each of the same views as the reference, "
                  "on the same prompts and seeds (`benchmarks/toy_transfer.py`).", "",
                  "| run | trained | learning rate | loss, mean of steps 1–10 | loss, mean of the last 10 | colour and pattern right |",
                  "|---|---|---|---|---|---|",
                  f"| zero-shot | - | - | - | - | {100 * full['zero_shot']:.0f}% of {full['zero_shot_images']} |"]
        for key, run in runs.items():
            label = "full fine-tuning" if key == "full" else f"LoRA rank {args.rank}"
            lines.append(f"| {label} | {run['trained_parameters']:,} parameters | {run['learning_rate']:g} | "
                         f"{run['loss_first']:.4f} | {run['loss_last']:.4f} | {100 * run['fine_tuned']:.0f}% of {run['fine_tuned_images']} |")
        lines += ["", "Every run starts from the same model, data order and noise (seed 42). With 64 generations a "
                  "difference of 5 points is one standard error. The subject embeddings train in every run, at the "
                  "run's learning rate.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--toy-learning-rates", type=float, nargs="+", default=[1e-3, 1e-4], help="LoRA's on the toy model")
    parser.add_argument("--toy-seeds", type=int, default=16, help="each fine-tuned model draws 4 backgrounds x SEEDS generations (default: %(default)s)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-json", default=None, help="reuse the memory rows of an earlier run's JSON output")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results-lora.md"))
    args = parser.parse_args(argv)
    from blipdiff_jax import tune_host_memory

    tune_host_memory()
    result = {"sizes": sizes(args.rank)}
    if args.memory_json:
        with open(args.memory_json) as f:
            result["memory"] = json.load(f)["memory"]
    elif not args.skip_memory:
        result["memory"] = memory(args.resolution, args.batch_size, args.rank)
    if not args.skip_toy:
        result["toy"] = toy(args.rank, args.toy_learning_rates, args.toy_seeds)
    print(json.dumps(result))
    write_markdown(args.out, result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
