"""Context CLIP: subject embeddings spliced into CLIP's token embeddings, against diffusers' PyTorch class."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from support.paths import FULL_CONFIG
from support.programs import abstract_generate_args
from support.torch_reference import converted, torch_text_encoder
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

from blipdiff_jax import components, tiny
from blipdiff_jax.models.context_clip import FlaxContextCLIPTextTransformer, encode_contexts

TOLERANCE = 1e-4  # max abs difference, fp32


@pytest.fixture(scope="module")
def text_models():
    pt = torch_text_encoder(tiny.text_encoder_config(), seed=7)
    params, config = converted("text_encoder", pt)
    return pt, params, components.build_model("text_encoder", config), config


@pytest.fixture(scope="module")
def clip_tokenizer(tokenizer_dirs):
    return CLIPTokenizer.from_pretrained(tokenizer_dirs["clip"])


def _ids(tokenizer, texts, length):
    return tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np").input_ids


@pytest.mark.parametrize("ctx_begin_pos", [[2, 2], [5, 5], [1, 7]], ids=["pos2", "pos5", "per-example"])
def test_with_subject_embeddings_matches_pytorch(text_models, clip_tokenizer, ctx_begin_pos):
    pt, params, module, _ = text_models
    ids = _ids(clip_tokenizer, ["a dog swimming underwater", "a cat on a sofa, a cat"], 77 - 4)
    ctx = np.random.RandomState(0).randn(2, 4, 32).astype(np.float32)
    ours, _ = module.apply({"params": params}, ids, ctx, np.array(ctx_begin_pos))
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids), ctx_embeddings=torch.from_numpy(ctx), ctx_begin_pos=ctx_begin_pos)[0].numpy()
    assert ours.shape == (2, 77, 32)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOLERANCE)


def test_without_subject_embeddings_is_flax_clip(text_models, clip_tokenizer):
    pt, params, module, config = text_models
    ids = _ids(clip_tokenizer, ["", "blurry, low quality"], 77)
    ours, pooled = module.apply({"params": params}, ids)
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOLERANCE)
    # The parameter tree is FlaxCLIPTextModel's, and so are its outputs.
    flax_clip = FlaxCLIPTextModel(CLIPTextConfig(**config), _do_init=False)
    expected = flax_clip(ids, params=params)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected.last_hidden_state), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(expected.pooler_output), rtol=0, atol=1e-6)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, flax_clip.init_weights(jax.random.PRNGKey(0), (1, 77)))


def test_one_pass_encodes_plain_and_subject_prompts_as_separate_passes(text_models, clip_tokenizer):
    """encode_contexts (plain prompts then subject prompts, one batch) against one pass each, and PyTorch."""
    pt, params, module, _ = text_models
    plain = _ids(clip_tokenizer, ["", "blurry, low quality, a very long negative prompt " * 3], 77)
    subject = _ids(clip_tokenizer, ["a dog swimming underwater"], 77 - 4)
    ctx = np.random.RandomState(1).randn(1, 4, 32).astype(np.float32)
    both = np.asarray(encode_contexts(module, {"params": params}, plain, subject, ctx, 2))
    assert both.shape == (3, 77, 32)
    alone_plain = module.apply({"params": params}, plain)[0]
    alone_subject = module.apply({"params": params}, subject, ctx, np.array([2]))[0]
    np.testing.assert_allclose(both[:2], np.asarray(alone_plain), rtol=0, atol=1e-6)
    np.testing.assert_allclose(both[2:], np.asarray(alone_subject), rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(subject), ctx_embeddings=torch.from_numpy(ctx), ctx_begin_pos=[2])[0].numpy()
    np.testing.assert_allclose(both[2:], ref, rtol=0, atol=TOLERANCE)
    alone = np.asarray(encode_contexts(module, {"params": params}, None, subject, ctx, 2))
    np.testing.assert_allclose(alone, np.asarray(alone_subject), rtol=0, atol=0)
    with pytest.raises(ValueError, match="same length"):
        encode_contexts(module, {"params": params}, plain, subject[:, :-1], ctx, 2)


# Two passes of a bf16 text encoder in one program: XLA's CPU backend converts each weight to fp32 once and keeps
# the copy for both passes, so every layer's copy is alive between them; one batched pass converts each weight
# just before its use. Measured by XLA's buffer assignment, in a fresh process with the memory-aware scheduler.
ENCODER_MEMORY = """
import json
import blipdiff_jax
assert blipdiff_jax.prefer_memory_on_cpu()
import jax, jax.numpy as jnp
from blipdiff_jax import components
from blipdiff_jax.models.context_clip import encode_contexts
config = dict(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              max_position_embeddings=77, eos_token_id=2)
module = components.build_model("text_encoder", config, jnp.bfloat16)
S = jax.ShapeDtypeStruct
ids, short, embeds = S((1, 77), jnp.int32), S((1, 73), jnp.int32), S((1, 4, 256), jnp.float32)
params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))
params = jax.tree_util.tree_map(lambda x: S(x.shape, jnp.bfloat16), params)
def two_passes(p, plain, subject, ctx):
    return jnp.concatenate([module.apply(p, plain)[0], module.apply(p, subject, ctx, jnp.array([2]))[0]])
def one_pass(p, plain, subject, ctx):
    return encode_contexts(module, p, plain, subject, ctx, 2)
temp = lambda f: jax.jit(f).lower(params, ids, short, embeds).compile().memory_analysis().temp_size_in_bytes / 2**20
print(json.dumps(dict(two=temp(two_passes), one=temp(one_pass))))
"""
FP32_LAYER_WEIGHTS_MIB = 6 * (4 * 256 * 256 + 2 * 256 * 1024) * 4 / 2**20  # 18 MiB


@pytest.mark.slow
def test_one_pass_keeps_one_layer_of_fp32_weights_at_a_time():
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", ENCODER_MEMORY], env=env, capture_output=True, text=True, check=True)
    temps = json.loads(out.stdout.strip().splitlines()[-1])
    assert temps["two"] >= 0.9 * FP32_LAYER_WEIGHTS_MIB  # every layer's fp32 copy alive between the passes
    assert temps["one"] <= 0.25 * FP32_LAYER_WEIGHTS_MIB


@pytest.mark.parametrize("do_cfg", [True, False], ids=["guided", "unguided"])
def test_generation_encodes_its_prompts_in_one_pass(flax_pipeline, do_cfg):
    pipeline, params = flax_pipeline
    batches = []

    def count(next_fun, args, kwargs, context):
        if isinstance(context.module, FlaxContextCLIPTextTransformer) and context.method_name == "__call__":
            batches.append(args[0].shape[0])
        return next_fun(*args, **kwargs)

    params, batch, scalars, rng = abstract_generate_args(pipeline, params)
    with nn.intercept_methods(count):
        jax.eval_shape(lambda *a: pipeline._generate(*a, num_inference_steps=1, do_cfg=do_cfg), params, batch, scalars, rng)
    assert batches == [2 if do_cfg else 1]  # one pass: the unconditional and the subject prompt together


def test_too_many_tokens_is_refused(text_models):
    _, params, module, _ = text_models
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, np.zeros((1, 77 - 3), np.int32), np.zeros((1, 4, 32), np.float32), np.array([2]))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(FULL_CONFIG), reason="../shared/reference/blipdiffusion_full.json is not here (fresh clone)")
def test_real_size_text_encoder_converts_strictly_and_matches(clip_tokenizer):
    with open(FULL_CONFIG) as f:
        config = json.load(f)["text_encoder"]
    pt = torch_text_encoder(config, seed=8)
    params, config = converted("text_encoder", pt)
    module = components.build_model("text_encoder", config)
    ids = _ids(clip_tokenizer, ["a dog swimming underwater"], 77 - 16)
    ctx = np.random.RandomState(1).randn(1, 16, 768).astype(np.float32)
    ours, _ = module.apply({"params": params}, ids, ctx, np.array([2]))
    with torch.no_grad():
        ref = pt(input_ids=torch.from_numpy(ids), ctx_embeddings=torch.from_numpy(ctx), ctx_begin_pos=[2])[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-3)
