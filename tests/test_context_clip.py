"""Context CLIP: subject embeddings spliced into CLIP's token embeddings, against diffusers' PyTorch class."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from conftest import converted, torch_text_encoder
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

from blipdiff_jax import components, tiny

TOLERANCE = 1e-4  # max abs difference, fp32
FULL_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "blipdiffusion_full.json")


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


def test_too_many_tokens_is_refused(text_models):
    _, params, module, _ = text_models
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, np.zeros((1, 77 - 3), np.int32), np.zeros((1, 4, 32), np.float32), np.array([2]))


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
