"""bf16 params and compute in the ControlNet and editing pipelines, against fp32 references (tiny models).

Both on the CPU rewrites (bf16 products, models/bf16_matmul.py), the path CPU users run; the plain path's
zero-shot bf16/fp16 against PyTorch fp32 is in test_hardening.py, fine-tuning in bf16 in test_finetune.py.
The bound is the zero-shot one (0.05 max abs on images in [0, 1]); the measured values are in the docstrings.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.images import edge_picture, make_image

from blipdiff_jax import FlaxBlipDiffusionControlNetPipeline, FlaxBlipDiffusionPipeline
from blipdiff_jax.image_processing import canny

BF16_TOLERANCE = 0.05
PROMPTS = ["on a marble table", "in a garden"]


@pytest.mark.slow
def test_controlnet_bf16_against_pytorch_fp32(torch_controlnet_pipeline, torch_controlnet_pipeline_dir):
    """Measured with bf16 products on CPU (models/bf16_matmul.py): max abs 0.0165."""
    pipeline, params = FlaxBlipDiffusionControlNetPipeline.from_pretrained(torch_controlnet_pipeline_dir, from_pt=True,
                                                                          dtype=jnp.bfloat16, cpu_rewrites=True)
    assert params["controlnet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    maps = [canny(edge_picture(0), 30, 70), canny(edge_picture(1), 30, 70)]
    refs = [make_image(0), make_image(1, (70, 50))]
    latents = np.random.RandomState(0).randn(2, 4, 16, 16).astype(np.float32)
    common = dict(guidance_scale=7.5, height=32, width=32, num_inference_steps=3, output_type="np")
    ours = pipeline(PROMPTS, refs, maps, ["flower", "dog"], ["teapot", "cat"], params=params, latents=latents, **common).images
    ref = torch_controlnet_pipeline(PROMPTS, refs, maps, ["flower", "dog"], ["teapot", "cat"],
                                    latents=torch.from_numpy(latents), **common).images
    print("controlnet bf16 vs PyTorch fp32: max abs", np.abs(ours - ref).max())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=BF16_TOLERANCE)


@pytest.mark.slow
def test_editing_bf16_against_fp32(converted_model, flax_pipeline):
    """Against our fp32 edit, which test_editing.py holds to LAVIS's PyTorch semantics within 2e-3.
    Measured with bf16 products on CPU: max abs 0.0157."""
    pipeline32, params32 = flax_pipeline
    pipeline16, params16 = FlaxBlipDiffusionPipeline.from_converted(converted_model, dtype=jnp.bfloat16,
                                                                      cpu_rewrites=True)
    latents = np.random.RandomState(0).randn(1, 4, 16, 16).astype(np.float32)
    args = ("on a sofa", make_image(0), "dog", "dog", "cat")
    common = dict(latents=latents, height=32, width=32, num_inference_steps=4, output_type="np")
    ours = pipeline16.edit(*args, params=params16, **common).images
    ref = pipeline32.edit(*args, params=params32, **common).images
    print("editing bf16 vs fp32: max abs", np.abs(ours - ref).max())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=BF16_TOLERANCE)
