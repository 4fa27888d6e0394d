"""Tracing skips flax's per-param initializer trace when a param has the shape its module asks for
(blipdiff_jax/runtime/param_check.py), and still refuses params of the wrong shape."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core.scope import Scope
from flax.errors import ScopeParamShapeError

from blipdiff_jax.runtime import param_check
from blipdiff_jax.runtime.param_check import fast_param_check


@pytest.fixture
def initializer_traces(monkeypatch):
    """How many times flax's `Scope.param` traced an initializer to check a shape."""
    calls = []
    eval_shape = jax.eval_shape

    def counting(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(("flax/core/scope.py", "flax\\core\\scope.py")):
            calls.append(1)
        return eval_shape(*args, **kwargs)

    monkeypatch.setattr(jax, "eval_shape", counting)
    return calls


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.GroupNorm(num_groups=4)(x)
        return nn.Dense(5)(x) + self.param("offset", nn.initializers.zeros, (5,))


def test_same_outputs_without_tracing_initializers(initializer_traces):
    net, x = Net(), jnp.ones((1, 6, 6, 3))
    params = net.init(jax.random.PRNGKey(0), x)
    initializer_traces.clear()
    expected = net.apply(params, x)
    assert len(initializer_traces) == 7  # flax alone: one per param (3 layers x 2, and the offset)
    initializer_traces.clear()
    with fast_param_check():
        np.testing.assert_array_equal(net.apply(params, x), expected)  # exact: nothing but the check changes
    assert initializer_traces == []


def test_a_param_of_the_wrong_shape_is_still_refused():
    net, x = Net(), jnp.ones((1, 6, 6, 3))
    params = jax.tree_util.tree_map(np.asarray, net.init(jax.random.PRNGKey(0), x))
    params["params"]["Dense_0"]["kernel"] = np.zeros((8, 4), np.float32)
    with pytest.raises(ScopeParamShapeError, match="Dense_0"):
        net.apply(params, x)
    with fast_param_check(), pytest.raises(ScopeParamShapeError, match="Dense_0"):
        net.apply(params, x)


def test_the_patch_is_reentrant_and_undone():
    original = Scope.param
    with fast_param_check():
        with fast_param_check():
            assert Scope.param is not original
        assert Scope.param is not original
    assert Scope.param is original
    with pytest.raises(RuntimeError), fast_param_check():
        raise RuntimeError("inside")
    assert Scope.param is original


@pytest.mark.cpu_only
def test_the_pipelines_programs_trace_no_initializer(converted_model, initializer_traces):
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    # A new pipeline: its jitted functions have traced nothing yet in this process.
    pipeline, params = FlaxBlipDiffusionPipeline.from_converted(converted_model)
    S = jax.ShapeDtypeStruct
    hidden, budget = pipeline.text_encoder.config.hidden_size, pipeline.max_text_length - pipeline.num_query_tokens
    batch = {"prompt_ids": S((1, budget), jnp.int32), "uncond_ids": S((1, pipeline.max_text_length), jnp.int32),
             "subject_embeds": S((1, pipeline.num_query_tokens, hidden), jnp.float32),
             "latents": S((1, pipeline.unet.in_channels, 8, 8), jnp.float32)}
    initializer_traces.clear()
    pipeline._generate_jit.trace(params, batch, {"guidance_scale": S((), jnp.float32)}, S((2,), jnp.uint32),
                                 num_inference_steps=2, do_cfg=True)
    size = pipeline.reference_size
    pipeline._encode_subject.trace(params["qformer"], S((1, 8), jnp.int32), S((1, 8), jnp.int32),
                                   S((1, 3, size["height"], size["width"]), jnp.float32))
    assert initializer_traces == []
    assert Scope.param is param_check._flax_param  # undone after tracing
