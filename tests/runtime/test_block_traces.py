"""Repeated blocks traced once per program (blipdiff_jax/models/block_traces.py): the same outputs and the same
compiled program, with fewer traces."""

import collections
import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.programs import abstract_generate_args

from blipdiff_jax.models.block_traces import REPEATED_BLOCKS, traced_once_per_block
from blipdiff_jax.runtime import backend


def _block_calls(fn, *args):
    """How many times `fn(*args)` calls one of REPEATED_BLOCKS (traced abstractly, nothing runs)."""
    calls = []

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, REPEATED_BLOCKS):
            calls.append(type(context.module).__name__)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
        jax.eval_shape(fn, *args)
    return collections.Counter(calls)


def _nested_block_jaxprs(jaxpr):
    """The jaxprs of every nested block call ("run") in `jaxpr`, sub-jaxprs (loops) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pjit", "jit") and eqn.params.get("name") == "run":
            found.append(eqn.params["jaxpr"])
        for sub in _subjaxprs(eqn):
            found += _nested_block_jaxprs(sub)
    return found


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else [value]:
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _unet_inputs(pipeline, batch=2):
    unet = pipeline.unet
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, unet.in_channels, 8, 8)), jnp.float32)
    t = jnp.asarray([10] * batch, jnp.int32)
    context = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 7, unet.cross_attention_dim)), jnp.float32)
    return x, t, context


def test_same_outputs_and_the_same_compiled_program(flax_pipeline):
    pipeline, params = flax_pipeline
    unet = pipeline.unet

    def plain(p, x, t, c):
        return unet.apply({"params": p}, x, t, c).sample

    def once(p, x, t, c):
        with traced_once_per_block():
            return plain(p, x, t, c)

    inputs = (params["unet"], *_unet_inputs(pipeline))
    np.testing.assert_array_equal(jax.jit(once)(*inputs), jax.jit(plain)(*inputs))  # exact: the same program

    def opcodes(fn):
        text = jax.jit(fn).lower(*inputs).compile().as_text()
        return collections.Counter(re.findall(r"=\s*\S+\s+([a-z][a-z\-]*)\(", text))

    assert opcodes(once) == opcodes(plain)


@pytest.mark.cpu_only
def test_each_kind_of_block_is_traced_once(flax_pipeline, monkeypatch):
    pipeline, params = flax_pipeline
    args = abstract_generate_args(pipeline, params)
    # Without the scope: every use of a block is traced inline.
    with monkeypatch.context() as patch:
        patch.setattr(backend, "traced_once_per_block", contextlib.nullcontext)
        calls = _block_calls(lambda *a: pipeline._generate(*a, 2, True, False), *args)
    assert calls["FlaxResnetBlock2D"] >= 4 and calls["FlaxCLIPEncoderLayer"] >= 2, calls
    # The pipeline's program: one nested call per use, far fewer distinct traces.
    jaxpr = pipeline._generate_jit.trace(*args, num_inference_steps=2, do_cfg=True).jaxpr
    nested = _nested_block_jaxprs(jaxpr.jaxpr)
    assert len(nested) == sum(calls.values())
    # The text encoder runs first, for the prompt and the negative prompt (both 77 tokens): all its layers share
    # one trace. The tiny UNet's blocks mostly differ in channels; the ones that match share theirs.
    clip_layers = calls["FlaxCLIPEncoderLayer"]
    assert len({id(j) for j in nested[:clip_layers]}) == 1
    assert len({id(j) for j in nested}) < len(nested) - clip_layers
