"""LoRA files (blipdiff_jax/lora_files.py, models/lora.py) against diffusers' PyTorch loader.

Two LoRAs are written by PyTorch on copies of the tiny UNet and text encoder (peft adapters with random nonzero
factors, saved with diffusers' `save_lora_weights`): "one" adapts the UNet's and the text encoder's attention
projections (rank 4 / alpha 8 and rank 2 / alpha 3, alphas only in diffusers' metadata), "two" the UNet's
`proj_in` (1x1 conv), `conv1` (3x3 conv), `time_emb_proj` and `ff.net.2`. The reference images come from diffusers'
`BlipDiffusionPipeline` whose modules got the adapters through diffusers' own `load_lora_into_unet` /
`load_lora_into_text_encoder` (unmerged: peft adds `scale * B(A(x))` in each forward).
"""

import copy
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.images import make_image

from blipdiff_jax.lora_files import LoraFileError

TOLERANCE = 2e-3  # max abs difference of images in [0, 1], as the pipeline parity tests
SIZE, STEPS = 16, 2
ALPHAS = {"unet": 8.0, "text_encoder": 3.0}  # LoRA "one"


def _adapter(module, seed, **config):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(init_lora_weights=False, **config)  # random A and B (peft's default B is zero)
    torch.manual_seed(seed)
    module.add_adapter(config)
    return get_peft_model_state_dict(module), config.to_dict()


def _kohya(unet_state, text_state):
    """diffusers' own kohya conversion (it writes alpha = rank; the real alphas are put back)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya({**{"unet." + k: v for k, v in unet_state.items()},
                                         **{"text_encoder." + k: v for k, v in text_state.items()}})
    for key in state:
        if key.endswith(".alpha"):
            state[key] = torch.tensor(ALPHAS["unet" if key.startswith("lora_unet_") else "text_encoder"])
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def files(torch_pipeline, tmp_path_factory):
    """{"one", "one-diffusers", "one-kohya", "two"}: paths of the LoRA files."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    unet, text = copy.deepcopy(torch_pipeline.unet), copy.deepcopy(torch_pipeline.text_encoder)
    unet_state, unet_config = _adapter(unet, 7, r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_state, text_config = _adapter(text, 8, r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    metadata = dict(unet_lora_adapter_metadata=unet_config, text_encoder_lora_adapter_metadata=text_config)
    StableDiffusionPipeline.save_lora_weights(str(root / "one"), unet_lora_layers=unet_state,
                                              text_encoder_lora_layers=text_state, **metadata)
    StableDiffusionPipeline.save_lora_weights(str(root / "one-diffusers"), unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
                                              text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state), **metadata)
    save_file(_kohya(unet_state, text_state), str(root / "one-kohya.safetensors"))
    two_state, two_config = _adapter(copy.deepcopy(torch_pipeline.unet), 9, r=2, lora_alpha=1,
                                     target_modules=["proj_in", "conv1", "time_emb_proj", "ff.net.2"])
    StableDiffusionPipeline.save_lora_weights(str(root / "two"), unet_lora_layers=two_state, unet_lora_adapter_metadata=two_config)
    name = "pytorch_lora_weights.safetensors"
    return {"one": str(root / "one" / name), "one-diffusers": str(root / "one-diffusers" / name),
            "one-kohya": str(root / "one-kohya.safetensors"), "two": str(root / "two" / name)}


@pytest.fixture(scope="module")
def torch_loras(torch_pipeline, files):
    """diffusers' BlipDiffusionPipeline on copies of the UNet and text encoder with "one" and "two" loaded by
    diffusers' loader; `use(unet_weights, text_weights)` picks the active adapters and their scales."""
    from diffusers import BlipDiffusionPipeline
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    p = torch_pipeline
    unet, text = copy.deepcopy(p.unet), copy.deepcopy(p.text_encoder)
    for name in ("one", "two"):
        folder, weight_name = os.path.split(files[name])
        state, alphas, metadata = Loader.lora_state_dict(folder, weight_name=weight_name, return_lora_metadata=True)
        Loader.load_lora_into_unet(state, alphas, unet, adapter_name=name, metadata=metadata)
        if any(key.startswith("text_encoder.") for key in state):
            Loader.load_lora_into_text_encoder(state, alphas, text, adapter_name=name, metadata=metadata)
    pipeline = BlipDiffusionPipeline(tokenizer=p.tokenizer, text_encoder=text, vae=p.vae, unet=unet, scheduler=p.scheduler,
                                     qformer=p.qformer, image_processor=p.image_processor, ctx_begin_pos=2,
                                     mean=p.config.mean, std=p.config.std)

    def use(unet_weights: dict, text_weights: dict):
        set_weights_and_activate_adapters(unet, list(unet_weights), list(unet_weights.values()))
        set_weights_and_activate_adapters(text, list(text_weights), list(text_weights.values()))
        return pipeline

    return use


LATENTS = np.random.RandomState(0).randn(1, 4, SIZE // 2, SIZE // 2).astype(np.float32)
ARGS = ("swimming underwater", make_image(0), "dog", "dog")
KWARGS = dict(guidance_scale=7.5, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")


def ours(pipeline, params):
    return pipeline(*ARGS, params=params, latents=LATENTS, **KWARGS).images


def theirs(pipeline):
    return pipeline(*ARGS, latents=torch.from_numpy(LATENTS), **KWARGS).images


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_a_peft_lora_gives_diffusers_image(flax_pipeline, files, torch_loras):
    pipeline, params = flax_pipeline
    merged = pipeline.load_lora(params, files["one"])
    image = ours(pipeline, merged)
    np.testing.assert_allclose(image, theirs(torch_loras({"one": 1.0}, {"one": 1.0})), rtol=0, atol=TOLERANCE)
    assert np.abs(image - ours(pipeline, params)).max() > 0.05  # the LoRA changes the picture


def test_stacked_scaled_loras_with_conv_layers_give_diffusers_image(flax_pipeline, files, torch_loras):
    pipeline, params = flax_pipeline
    merged = pipeline.load_lora(pipeline.load_lora(params, files["one"], scale=0.5), files["two"], scale=1.5)
    reference = theirs(torch_loras({"one": 0.5, "two": 1.5}, {"one": 0.5}))
    np.testing.assert_allclose(ours(pipeline, merged), reference, rtol=0, atol=TOLERANCE)


def test_diffusers_and_kohya_names_give_the_peft_files_weights(flax_pipeline, files):
    pipeline, params = flax_pipeline
    peft = pipeline.load_lora(params, files["one"])
    for name in ("one-diffusers", "one-kohya"):
        other = pipeline.load_lora(params, files[name])
        assert max_diff(other["unet"], peft["unet"]) == 0 and max_diff(other["text_encoder"], peft["text_encoder"]) == 0, name
    np.testing.assert_array_equal(ours(pipeline, pipeline.load_lora(params, files["one-kohya"])), ours(pipeline, peft))


def test_scale_zero_is_the_base_stacking_adds_unload_subtracts(flax_pipeline, files):
    pipeline, params = flax_pipeline
    zero = pipeline.load_lora(params, files["one"], scale=0.0)
    assert max_diff(zero, params) == 0
    np.testing.assert_array_equal(ours(pipeline, zero), ours(pipeline, params))
    one, two = pipeline.load_lora(params, files["one"], 0.7), pipeline.load_lora(params, files["two"], -1.2)
    both = pipeline.load_lora(one, files["two"], -1.2)
    delta = lambda merged: jax.tree_util.tree_map(lambda m, b: np.asarray(m) - np.asarray(b), merged["unet"], params["unet"])  # noqa: E731
    added = jax.tree_util.tree_map(lambda a, b: a + b, delta(one), delta(two))
    assert max_diff(delta(both), added) < 1e-6
    assert max_diff(pipeline.unload_lora(both, files["one"], 0.7), two) < 1e-6
    assert params["unet"]["conv_in"]["kernel"] is both["unet"]["conv_in"]["kernel"]  # untouched leaves are shared


def test_merged_params_keep_their_dtype(flax_pipeline, files):
    from blipdiff_jax import components

    pipeline, params = flax_pipeline
    half = {k: components.cast_params(params[k], jnp.bfloat16) for k in ("unet", "text_encoder")}
    merged = pipeline.load_lora(half, files["one"])
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")
    kernel, full = merged["unet"], pipeline.load_lora(params, files["one"])["unet"]
    for key in path:
        kernel, full = kernel[key], full[key]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(kernel, np.float32), np.asarray(full), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_replicated_params_stay_replicated(flax_pipeline, files):
    """jit=True's params (one copy per device): the adapted kernels are merged on one copy and replicated again."""
    pipeline, params = flax_pipeline
    models = {k: params[k] for k in ("unet", "text_encoder")}
    replicated = pipeline.load_lora(pipeline.replicate(models), files["two"])
    expected = pipeline.load_lora(models, files["two"])["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    conv1 = replicated["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv1.shape[0] == jax.local_device_count() and len(conv1.sharding.device_set) == jax.local_device_count()
    for copy_ in conv1:
        np.testing.assert_array_equal(np.asarray(copy_), np.asarray(expected))


# ---------------------------------------------------------------------------------------------- bad files


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _write(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    return str(path)


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("case", ["no-module", "no-partner", "wrong-shape", "dora", "sdxl", "kohya-no-module", "not-lora"])
def test_bad_files_are_refused_naming_the_key(flax_pipeline, files, tmp_path, case):
    pipeline, params = flax_pipeline
    good = _tensors(files["one"])
    bad, named = dict(good), None
    if case == "no-module":
        named = Q.replace("down_blocks.0", "down_blocks.7") + ".lora_A.weight"
        bad[named], bad[named.replace("lora_A", "lora_B")] = good[Q + ".lora_A.weight"], good[Q + ".lora_B.weight"]
    elif case == "no-partner":
        del bad[Q + ".lora_B.weight"]
        named = Q + ".lora_A.weight"
    elif case == "wrong-shape":
        named = Q + ".lora_B.weight"
        bad[named] = np.zeros((33, 4), np.float32)
    elif case == "dora":
        named = Q + ".lora_magnitude_vector"
        bad[named] = np.ones(32, np.float32)
    elif case == "sdxl":
        named = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
        bad[named] = np.zeros((2, 32), np.float32)
    elif case == "kohya-no-module":
        bad = _tensors(files["one-kohya"])
        named = "lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight"
        bad[named] = np.zeros((2, 32, 1, 1), np.float32)
    else:
        named = "unet.conv_in.weight"  # a full weight, not a LoRA factor
        bad[named] = np.zeros((32, 4, 3, 3), np.float32)
    path = _write(tmp_path / "bad.safetensors", bad)
    with pytest.raises(LoraFileError, match=re.escape(named)):
        pipeline.load_lora(params, path)


def test_pickles_and_broken_files_are_refused(flax_pipeline, tmp_path):
    pipeline, params = flax_pipeline
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "style.bin")
    with pytest.raises(LoraFileError, match=r"style\.bin refused: pickle"):
        pipeline.load_lora(params, str(tmp_path / "style.bin"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "disguised.safetensors")
    with pytest.raises(LoraFileError, match="not a readable safetensors file"):
        pipeline.load_lora(params, str(tmp_path / "disguised.safetensors"))
    with pytest.raises(FileNotFoundError, match="path"):
        pipeline.load_lora(params, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        pipeline.load_lora(params, str(tmp_path))
    _write(tmp_path / "dora.safetensors", {Q + ".lora_A.weight": np.zeros((4, 32), np.float32),
                                           Q + ".lora_B.weight": np.zeros((32, 4), np.float32)},
           {"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    with pytest.raises(LoraFileError, match="DoRA"):
        pipeline.load_lora(params, str(tmp_path / "dora.safetensors"))
    with pytest.raises(TypeError, match="scale"):
        pipeline.load_lora(params, str(tmp_path / "dora.safetensors"), scale="0.5")


# ---------------------------------------------------------------------------------------------- CLI, ControlNet


@pytest.mark.slow
def test_cli_lora_flags_stack_as_the_api(converted_model, flax_pipeline, files, tmp_path):
    from PIL import Image

    from blipdiff_jax.checkpoint import save_converted
    from blipdiff_jax.cli import main

    pipeline, params = flax_pipeline
    model = save_converted(converted_model, str(tmp_path / "model"))
    make_image(0).save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--model", model, "--image", str(tmp_path / "ref.png"), "--subject", "dog", "--prompt",
                 "on the beach", "--steps", "2", "--height", "16", "--width", "16", "--seed", "3", "--out", str(out),
                 "--lora", files["one"] + ":0.5", "--lora", files["two"], "--no-compile-cache"]) == 0
    merged = pipeline.load_lora(pipeline.load_lora(params, files["one"], 0.5), files["two"])
    api = pipeline("on the beach", make_image(0), "dog", "dog", params=merged, prng_seed=jax.random.PRNGKey(3),
                   height=16, width=16, num_inference_steps=2, output_type="np").images[0]
    (tmp_path / "style.ckpt").write_bytes(b"a pickle")
    written = Image.open(out)
    assert written.text["lora"] == f"{files['one']}:0.5, {files['two']}:1"
    assert np.abs(np.asarray(written, np.float32) / 255 - api).max() <= 1 / 255 + 1e-6
    assert main(["generate", "--model", model, "--image", str(tmp_path / "ref.png"), "--subject", "dog",
                 "--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "style.ckpt")]) == 2  # refused before loading


@pytest.mark.slow
def test_controlnet_pipeline_loads_loras_into_its_unet_only(flax_controlnet_pipeline, files):
    pipeline, params = flax_controlnet_pipeline
    merged = pipeline.load_lora(params, files["two"])
    assert merged["controlnet"] is params["controlnet"]
    assert max_diff(merged["unet"], params["unet"]) > 0.01
