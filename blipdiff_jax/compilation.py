"""XLA's CPU scheduler, and why bf16 on CPU wants its memory-aware one.

XLA's CPU backend schedules for concurrency by default: work that depends on nothing else runs as early as it
can, whatever that costs in memory. With bf16 (or fp16) weights that is a whole fp32 model copy: the CPU has
no bf16 matmul, so XLA converts every weight to fp32 before use, and as each convert depends only on a
parameter, all of them are scheduled first and live at once. Measured on the real-size model: a 256x256
generation with 1.9 GiB of bf16 weights needed 3.7 GiB of temporaries, the subject encoder 1.7 GiB for
0.9 GiB of weights; with the memory-aware scheduler, 0.33 GiB and 0.03 GiB. In fp32 it changes no memory
(0.75 GiB at 512x512 either way) and cost 13% of a 256x256 UNet step, so it is not forced on everyone.

XLA reads the choice once per process, from XLA_FLAGS, when JAX starts its backends; a per-program
`compiler_options` does not reach it. Hence `prefer_memory_on_cpu()`, to call before JAX starts.
"""

from __future__ import annotations

import os

FLAG_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"
MEMORY_AWARE_FLAG = f"--{FLAG_NAME}=false"
# Inside the denoising loop the converts are loop invariants, and XLA hoists them out of the `while`: the fp32
# copy then lives for the whole generation (3.2 GiB of temporaries in a 2-step 256x256 generation; 0.32 GiB
# without the hoisting). Converting again each step costs a pass over the weights per step.
NO_HOISTING = "while-loop-invariant-code-motion"
DISABLE_PASSES = "--xla_disable_hlo_passes="


RECOMMENDED_XLA_FLAGS = f"{MEMORY_AWARE_FLAG} {DISABLE_PASSES}{NO_HOISTING}"


def _disabled_passes(flags: list[str]) -> list[str]:
    return [name for flag in flags if flag.startswith(DISABLE_PASSES) for name in flag[len(DISABLE_PASSES):].split(",")]


def memory_aware_cpu_scheduler() -> bool:
    """Whether XLA_FLAGS asks for the memory-aware CPU scheduler without loop-invariant hoisting."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return MEMORY_AWARE_FLAG in flags and NO_HOISTING in _disabled_passes(flags)


def prefer_memory_on_cpu() -> bool:
    """Set XLA_FLAGS for this process so that bf16/fp16 weights are converted where used: the memory-aware CPU
    scheduler, and no hoisting of loop invariants. Leaves a scheduler choice already in XLA_FLAGS alone. Takes
    effect only before JAX starts its backends (before the first computation or `jax.devices()`); returns
    whether this process will run that way."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(FLAG_NAME in flag for flag in flags):
        return memory_aware_cpu_scheduler()
    if xla_bridge.backends_are_initialized():
        return False
    others = [flag for flag in flags if not flag.startswith(DISABLE_PASSES)]
    disabled = _disabled_passes(flags) + [NO_HOISTING]
    os.environ["XLA_FLAGS"] = " ".join(others + [MEMORY_AWARE_FLAG, DISABLE_PASSES + ",".join(disabled)])
    return True


# ------------------------------------------------------------------------------------- convolutions on CPU
# XLA's CPU backend (jax 0.10) hands each convolution to YNNPACK by default (the "individual_convolution"
# library fusion); without it, a convolution runs on XLA's own Eigen kernel, which is faster for every 3x3
# convolution of the UNet and their gradients on AVX-512 CPUs and within noise on AVX2 (numbers in
# docs/performance.md).
# So our CPU programs keep YNNPACK for what else it takes (matmuls, reductions) and leave convolutions to
# Eigen. Unlike the scheduler above, this option is read per program, so it is passed to `jax.jit`. The list
# is the backend's default (checked in tests/runtime/test_compilation.py) less the convolution.
YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
YNN_WITHOUT_CONVOLUTIONS = ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("DOT", "REDUCE", "INDIVIDUAL_DOT"))


def compiler_options() -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of our programs: on CPU, convolutions on XLA's Eigen kernel rather than
    YNNPACK (above). None off CPU, and when XLA_FLAGS already chooses the YNN fusion types."""
    import jax

    if jax.default_backend() != "cpu" or YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
        return None
    return {YNN_FUSION_TYPES: YNN_WITHOUT_CONVOLUTIONS}
