"""bf16 on CPU and XLA's scheduler (blipdiff_jax/compilation.py): the default one holds an fp32 copy of every
weight at once (and hoists them out of loops); after `prefer_memory_on_cpu()` each is converted when it is
used. Measured by XLA's own buffer assignment of a bf16 MLP, in fresh processes (XLA reads the choice once,
when JAX starts)."""

import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest
from support.programs import abstract_generate_args, hlo_bodies

from blipdiff_jax import FlaxBlipDiffusionPipeline, compilation

LAYERS, WIDTH = 16, 512
pytestmark = pytest.mark.cpu_only  # XLA's CPU backend options

FP32_WEIGHTS_MIB = LAYERS * WIDTH * WIDTH * 4 / 2**20  # 16 MiB

PROGRAM = f"""
import json, sys
import blipdiff_jax
took = blipdiff_jax.prefer_memory_on_cpu() if sys.argv[1] == "prefer" else None
import jax, jax.numpy as jnp, numpy as np
layers = [jnp.asarray(np.random.randn({WIDTH}, {WIDTH}) * 0.05, jnp.bfloat16) for _ in range({LAYERS})]
def mlp(layers, x):
    for w in layers:
        x = jax.nn.gelu(x @ w)
    return x
def looped(layers, x):  # as in the denoising loop, where the converts are loop invariants
    return jax.lax.fori_loop(0, 3, lambda i, x: mlp(layers, x), x)
x = jnp.ones((4, {WIDTH}), jnp.bfloat16)
temp = lambda f: jax.jit(f).lower(layers, x).compile().memory_analysis().temp_size_in_bytes / 2**20
temp_mib, loop_temp_mib = temp(mlp), temp(looped)
after_start = blipdiff_jax.prefer_memory_on_cpu() if sys.argv[1] == "late" else None
print(json.dumps(dict(temp_mib=temp_mib, loop_temp_mib=loop_temp_mib, took=took, after_start=after_start)))
"""


def _run(mode: str, xla_flags: str = "") -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_default_scheduler_holds_every_fp32_weight_and_ours_does_not():
    default, preferred = _run("default"), _run("prefer")
    assert default["temp_mib"] >= 0.9 * FP32_WEIGHTS_MIB  # all 16 converted weights live at once
    assert default["loop_temp_mib"] >= 0.9 * FP32_WEIGHTS_MIB  # hoisted out of the loop
    assert preferred["took"] is True
    assert preferred["temp_mib"] <= 0.2 * FP32_WEIGHTS_MIB  # measured 1 MiB: one weight at a time
    assert preferred["loop_temp_mib"] <= 0.2 * FP32_WEIGHTS_MIB


@pytest.mark.slow
def test_a_choice_already_made_is_kept():
    assert _run("late")["after_start"] is False  # JAX started: too late, and said so
    kept = _run("prefer", xla_flags=f"--{compilation.FLAG_NAME}=true")
    assert kept["took"] is False and kept["temp_mib"] >= 0.9 * FP32_WEIGHTS_MIB


def test_bf16_pipeline_on_cpu_advises_the_flag(converted_model, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="prefer_memory_on_cpu"):
        FlaxBlipDiffusionPipeline(converted_model, dtype=jnp.bfloat16)
    monkeypatch.setenv("XLA_FLAGS", compilation.RECOMMENDED_XLA_FLAGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlaxBlipDiffusionPipeline(converted_model, dtype=jnp.bfloat16)
        FlaxBlipDiffusionPipeline(converted_model, dtype=jnp.float32)


# ------------------------------------------------------------------ convolutions on XLA's Eigen kernel (CPU)


def _library_ops(hlo_text: str) -> set[str]:
    """The convolution and dot ops a compiled CPU program hands to YNNPACK (inside its ynn fusions)."""
    bodies = hlo_bodies(hlo_text)
    called = re.findall(r"%?ynn_fusion[\w.]* = .*?calls=%?([\w.\-]+)", hlo_text)
    return {op for name in called for line in bodies.get(name, []) for op in re.findall(r" (convolution|dot)\(", line)}


def _conv_and_matmul(x, w, a):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y - y.mean((1, 2), keepdims=True)
    return jax.nn.gelu(y.reshape(-1, y.shape[-1]) @ a).sum(0)


def test_cpu_programs_keep_convolutions_off_ynnpack():
    args = (jnp.ones((2, 16, 16, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((64, 128)))
    lowered = jax.jit(_conv_and_matmul).lower(*args)
    unmeta = lambda text: re.sub(r", metadata=\{[^}]*\}", "", text)  # noqa: E731
    default = lowered.compile().as_text()
    options = compilation.compiler_options()
    assert options == {compilation.YNN_FUSION_TYPES: compilation.YNN_WITHOUT_CONVOLUTIONS}
    ours = lowered.compile(compiler_options=options).as_text()
    assert _library_ops(default) == {"convolution", "dot"}  # what the option is for: XLA's default
    assert _library_ops(ours) == {"dot"}  # matmuls stay on YNNPACK
    # The list is exactly the backend's default less the convolution: with it added back, the same program.
    with_convolutions = options[compilation.YNN_FUSION_TYPES] + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    restored = {compilation.YNN_FUSION_TYPES: with_convolutions}
    assert unmeta(lowered.compile(compiler_options=restored).as_text()) == unmeta(default)


def test_generation_program_runs_convolutions_on_eigen(flax_pipeline, monkeypatch):
    pipeline, params = flax_pipeline
    args = abstract_generate_args(pipeline, params)
    text = pipeline._generate_jit.lower(*args, num_inference_steps=1, do_cfg=True).compile().as_text()
    assert " convolution(" in text and _library_ops(text) == {"dot"}
    # A choice already in XLA_FLAGS is the user's: left alone.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert compilation.compiler_options() is None
