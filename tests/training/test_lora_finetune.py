"""LoRA subject fine-tuning (training/lora.py): one step's loss and gradients against peft in PyTorch, what is
trained and stored, the adapter OUT holds (read back by us and by diffusers' PyTorch loader), exact resume and
the CLI. Tiny model, 16x16 pixels; every run uses the same settings, so the train step compiles once.
"""

import argparse
import copy
import json
import os
import types

import jax
import numpy as np
import pytest
import torch
from support.images import write_subject_images
from support.runs import read_log
from support.torch_reference import assert_grads_close, flax_unet_numerics, torch_lavis_loss

from blipdiff_jax import FlaxBlipDiffusionPipeline
from blipdiff_jax.lora_files import MANIFEST, WEIGHT_NAME, _to_torch
from blipdiff_jax.models.lora import module_name, modules_of, parameter_count
from blipdiff_jax.training.lora import merged_params
from blipdiff_jax.training.trainer import FinetuneConfig, SubjectFinetuner, step_key

RANK, ALPHA = 2, 4.0
SETTINGS = dict(subject="dog", resolution=16, batch_size=2, learning_rate=1e-2, seed=3, progress=False,
                lora_rank=RANK, lora_alpha=ALPHA, lora_text_encoder=True)
RTOL = 1e-4  # loss and gradient parity with PyTorch, as full fine-tuning's


@pytest.fixture(scope="module")
def pipe(flax_pipeline):
    return flax_pipeline[0]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_subject_images(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="module")
def base_dir(converted_model, tmp_path_factory):
    from blipdiff_jax.checkpoint import save_converted

    return save_converted(converted_model, str(tmp_path_factory.mktemp("base") / "model"))


def trainer_for(model, pipeline, out, **overrides):
    return SubjectFinetuner(model, FinetuneConfig(out=str(out), **{**SETTINGS, **overrides}), pipeline=pipeline)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def run(converted_model, pipe, image_dir, base_dir, tmp_path_factory):
    """3 steps, exported to OUT (the manifest names `base_dir`)."""
    out = tmp_path_factory.mktemp("lora") / "out"
    trainer = trainer_for(converted_model, pipe, out, images=image_dir, steps=3, base_model=base_dir)
    trainer.train()
    return trainer, str(out)


# ---------------------------------------------------------------------------------------------- one step vs PyTorch


def torch_with_factors(module, factors, style, targets):
    """A copy of `module` with peft LoRA layers (rank RANK, alpha ALPHA) holding `factors`."""
    from peft import LoraConfig

    module = copy.deepcopy(module)
    module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets)))
    layers = dict(module.named_modules())
    for path, pair in modules_of(factors).items():
        a, b = _to_torch(np.asarray(pair["down"]), np.asarray(pair["up"]))
        layer = layers[module_name(path, style)]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
    return module, layers


@pytest.mark.slow
def test_one_step_matches_peft_in_pytorch(converted_model, pipe, image_dir, torch_pipeline, tmp_path, monkeypatch):
    """The first step from factors with a random `up` (peft starts it at zero, which would leave `down` without
    gradient): its logged loss, and its gradients read from AdamW's first moment (exactly 0.1 * gradient after
    one step), against LAVIS's loss on peft-adapted PyTorch modules holding the same factors."""
    trainer = trainer_for(converted_model, pipe, tmp_path / "one", images=image_dir, steps=1)
    start = trainer.initial_trainable()
    rng = np.random.default_rng(0)
    for key in ("unet_lora", "text_encoder_lora"):
        start[key] = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), start[key])
    monkeypatch.setattr(trainer, "initial_trainable", lambda subject_embeddings=None: start)
    trainer.train()
    grads = jax.tree_util.tree_map(lambda mu: np.asarray(mu) / 0.1, trainer.opt_state[0].mu)

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sample = jax.jit(trainer.loss.sample_inputs)
    key = step_key(jax.random.PRNGKey(SETTINGS["seed"]), 0)
    latents, noise, timesteps = jax.device_get(sample(*jax.device_put((converted_model.params["vae"], trainer.batch(0), key), device)))
    unet, unet_layers = torch_with_factors(torch_pipeline.unet, start["unet_lora"], "diffusers", ("to_q", "to_k", "to_v", "to_out.0"))
    text, text_layers = torch_with_factors(torch_pipeline.text_encoder, start["text_encoder_lora"], "transformers",
                                           ("q_proj", "k_proj", "v_proj", "out_proj"))
    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    ctx = t(start["subject_embeddings"]).requires_grad_(True)
    with flax_unet_numerics(unet):
        value = torch_lavis_loss(types.SimpleNamespace(scheduler=torch_pipeline.scheduler, unet=unet, text_encoder=text),
                                 t(latents), t(noise), t(timesteps).long(), t(trainer.input_ids).long(), ctx)
        value.backward()
    np.testing.assert_allclose(read_log(tmp_path / "one")[0]["loss"], float(value.detach()), rtol=RTOL)
    expected = {("subject_embeddings",): ctx.grad.numpy()}
    for key, layers, style in (("unet_lora", unet_layers, "diffusers"), ("text_encoder_lora", text_layers, "transformers")):
        for path in modules_of(start[key]):
            layer = layers[module_name(path, style)]
            expected[(key,) + path + ("down",)] = layer.lora_A["default"].weight.grad.numpy().T
            expected[(key,) + path + ("up",)] = layer.lora_B["default"].weight.grad.numpy().T
    assert len(expected) == 1 + 2 * (32 + 8)  # every factor of the 32 UNet and 8 text-encoder projections
    assert_grads_close(grads, expected, RTOL)


# ---------------------------------------------------------------------------------------------- what trains, OUT


@pytest.mark.slow
def test_only_the_factors_and_embeddings_train(run, converted_model):
    trainer, out = run
    trained = trainer.trainable
    assert sorted(trained) == ["subject_embeddings", "text_encoder_lora", "unet_lora"]
    factors = parameter_count({k: trained[k] for k in ("unet_lora", "text_encoder_lora")})
    unet = parameter_count(converted_model.params["unet"])
    moments = parameter_count(trainer.opt_state[0].mu)
    assert moments == factors + trained["subject_embeddings"].size  # the base is not in the optimizer state
    assert factors < 0.05 * unet
    assert [e["step"] for e in read_log(out)] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in read_log(out))


@pytest.mark.slow
def test_out_holds_an_adapter_that_loads_here_and_in_diffusers(run, converted_model, torch_pipeline, base_dir):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from peft.tuners.tuners_utils import BaseTunerLayer

    from convert.pytorch_dir import convert_component

    trainer, out = run
    assert {WEIGHT_NAME, MANIFEST, "subject_embeddings.npy"} <= set(os.listdir(out))
    assert not os.path.exists(os.path.join(out, "params"))  # no model copy
    with open(os.path.join(out, MANIFEST)) as f:
        assert json.load(f)["base_model"] == base_dir
    expected = merged_params(converted_model.params, trainer.trainable, trainer.config)
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(out)  # the base named by the manifest, merged
    assert max_diff(params["unet"], expected["unet"]) < 1e-6 and max_diff(params["text_encoder"], expected["text_encoder"]) < 1e-6
    np.testing.assert_array_equal(pipeline.subject_embeddings, np.asarray(trainer.trainable["subject_embeddings"]))
    image = pipeline("on the beach", None, None, "dog", params=params, prng_seed=jax.random.PRNGKey(0), height=16, width=16,
                     num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # diffusers' PyTorch loader reads the adapter (keys and alpha metadata) into the same merged weights.
    state, alphas, metadata = Loader.lora_state_dict(out, weight_name=WEIGHT_NAME, return_lora_metadata=True)
    unet, text = copy.deepcopy(torch_pipeline.unet), copy.deepcopy(torch_pipeline.text_encoder)
    Loader.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    Loader.load_lora_into_text_encoder(state, alphas, text, metadata=metadata)
    for name, module in (("unet", unet), ("text_encoder", text)):
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
        weights = {k.replace("base_layer.", ""): v.detach().numpy() for k, v in module.state_dict().items() if "lora_" not in k}
        config = dict(module.config) if name == "unet" else module.config.to_dict()
        assert max_diff(convert_component(name, weights, config), expected[name]) < 1e-5, name


@pytest.mark.slow
def test_stopped_and_resumed_equals_uninterrupted(run, converted_model, pipe, image_dir, tmp_path):
    reference, reference_out = run
    out = tmp_path / "out"
    trainer_for(converted_model, pipe, out, images=image_dir, steps=3, checkpoint_every=1).train(stop_after=2)
    assert not os.path.exists(out / MANIFEST)  # stopped early: nothing exported
    resumed = trainer_for(converted_model, pipe, out, images=image_dir, steps=3, checkpoint_every=1, resume=True)
    resumed.train()
    assert max_diff(resumed.trainable, reference.trainable) <= 1e-6
    assert [e["loss"] for e in read_log(out)] == pytest.approx([e["loss"] for e in read_log(reference_out)], abs=1e-6)
    with pytest.raises(ValueError, match="lora_rank"):
        trainer_for(converted_model, pipe, out, images=image_dir, steps=4, resume=True, lora_rank=0, lora_alpha=None,
                    lora_text_encoder=False).train()


# ---------------------------------------------------------------------------------------------- settings, CLI


def finetune_args(argv):
    from blipdiff_jax.training.cli import add_finetune_parser

    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["finetune"] + argv)


def test_bad_lora_settings_name_the_flag(converted_model, pipe, image_dir, tmp_path):
    from blipdiff_jax.training.cli import FLAGS, run_finetune

    base = ["--model", str(tmp_path), "--images", image_dir, "--subject", "dog", "--out", str(tmp_path / "o")]
    for extra, error, flag in ((["--lora-rank", "-1"], ValueError, "--lora-rank"),
                               (["--lora-alpha", "4"], ValueError, "--lora-alpha"),
                               (["--lora-text-encoder"], ValueError, "--lora-text-encoder"),
                               (["--lora-rank", "2", "--train-text-encoder"], ValueError, "--train-text-encoder"),
                               (["--lora-rank", "2", "--lora-alpha", "0"], ValueError, "--lora-alpha")):
        with pytest.raises(error, match=flag):
            run_finetune(finetune_args(base + extra))
    config = FinetuneConfig(out=str(tmp_path / "o"), images=image_dir, **{**SETTINGS, "lora_target_modules": ("to_z",)})
    with pytest.raises(ValueError, match="--lora-target-modules: target_modules: to_z"):
        SubjectFinetuner(converted_model, config, pipeline=pipe, names=FLAGS)
    assert FinetuneConfig(out="o", images="i", subject="dog", lora_rank=4).learning_rate == 1e-4
    assert FinetuneConfig(out="o", images="i", subject="dog").learning_rate == 5e-6


@pytest.mark.slow
def test_cli_finetunes_a_lora_and_generates_from_it(converted_model, base_dir, image_dir, tmp_path, capsys):
    from PIL import Image

    from blipdiff_jax.cli import main

    out = tmp_path / "dog-lora"
    assert main(["finetune", "--model", base_dir, "--images", image_dir, "--subject", "dog", "--out", str(out),
                 "--steps", "1", "--resolution", "16", "--batch-size", "2", "--learning-rate", "1e-2", "--seed", "3",
                 "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lora-text-encoder", "--quiet",
                 "--preview-every", "1", "--preview-steps", "2"]) == 0
    assert "LoRA adapter in" in capsys.readouterr().out
    assert os.path.isfile(out / "previews" / "step-0001.png")  # drawn with the factors merged
    image = tmp_path / "moon.png"
    assert main(["generate", "--model", str(out), "--subject", "dog", "--prompt", "on the moon", "--steps", "2",
                 "--height", "16", "--width", "16", "--out", str(image), "--no-compile-cache"]) == 0
    assert Image.open(image).size == (16, 16)
    assert os.path.getsize(out / WEIGHT_NAME) < 0.1 * 4 * parameter_count(converted_model.params["unet"])
