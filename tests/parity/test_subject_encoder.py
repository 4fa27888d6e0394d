"""Subject embeddings: our Flax Q-Former against diffusers' PyTorch `Blip2QFormerModel` (fp32, CPU)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from support.images import make_image
from support.paths import FULL_CONFIG
from support.torch_reference import converted, torch_qformer

from blipdiff_jax import components, tiny
from blipdiff_jax.image_processing import preprocess_reference

TOLERANCE = 1e-4  # max abs difference, fp32


def _compare(pt, params, config, categories, images, size, tolerance):
    module = components.build_model("qformer", config)
    tokens = pt.tokenizer(categories, padding=True, return_tensors="np")
    pixels = preprocess_reference(images, {"height": size, "width": size}, tiny.image_processor_config()["image_mean"],
                                  tiny.image_processor_config()["image_std"])
    # One compiled program (op by op, the Q-Former and its vision tower cost seconds of small compiles)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, tokens.input_ids, tokens.attention_mask, pixels))
    with torch.no_grad():
        ref = pt(text_input=categories, image_input=torch.from_numpy(pixels), return_dict=False).numpy()
    assert ours.shape == ref.shape == (len(categories), config["num_query_tokens"], config["qformer_config"]["hidden_size"])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance)
    return ours


@pytest.mark.parametrize("num_query_tokens,cross_attention_frequency", [(4, 1), (6, 2)])
def test_subject_embeddings_match_pytorch(tokenizer_dirs, num_query_tokens, cross_attention_frequency):
    pt = torch_qformer(tiny.qformer_config(num_query_tokens, cross_attention_frequency), tokenizer_dirs["bert"], seed=3)
    params, config = converted("qformer", pt)
    # Categories of different token lengths exercise the padding mask; two images, one per category.
    _compare(pt, params, config, ["dog", "teapot kettle"], [make_image(0), make_image(1, (90, 30))], 64, TOLERANCE)


def test_one_reference_image_serves_every_category(tokenizer_dirs):
    pt = torch_qformer(tiny.qformer_config(), tokenizer_dirs["bert"], seed=4)
    params, config = converted("qformer", pt)
    ours = _compare(pt, params, config, ["dog", "cat sofa"], [make_image(2)], 64, TOLERANCE)
    assert not np.allclose(ours[0], ours[1], atol=1e-3)  # the category changes the embedding


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(FULL_CONFIG), reason="../shared/reference/blipdiffusion_full.json is not here (fresh clone)")
def test_real_size_subject_encoder_converts_strictly_and_matches(tokenizer_dirs):
    """The real architecture (ViT-L/14 BLIP-2 tower, 12-layer Q-Former), random weights."""
    with open(FULL_CONFIG) as f:
        full = json.load(f)["qformer"]
    config = {k: v for k, v in full.items() if k in ("num_query_tokens", "vision_config", "qformer_config")}
    pt = torch_qformer(config, tokenizer_dirs["bert"], seed=5)
    params, config = converted("qformer", pt)
    _compare(pt, params, config, ["dog"], [make_image(3, (300, 260))], 224, 1e-3)
