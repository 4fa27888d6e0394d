"""Subject fine-tuning: the LAVIS loss and its gradients against PyTorch, overfitting, data parallelism,
resuming, export, bad input and the CLI. All on the tiny model at 16x16 pixels.

Compiling is what costs here (2 CPU cores): every training run uses the same settings on the 4 fake devices,
so the train step compiles once; the one-device reference (parity, data parallelism) is one compiled
`value_and_grad` of the same loss.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.images import make_image, write_subject_images
from support.paths import shared_image
from support.runs import read_log
from support.torch_reference import assert_grads_close, flax_unet_numerics, torch_lavis_loss

from blipdiff_jax.training import data
from blipdiff_jax.training.trainer import FinetuneConfig, SubjectFinetuner, step_key

RESOLUTION = 16
# One setting for every run below (batch 4 splits over the 4 fake devices), so the step compiles once.
SETTINGS = dict(subject="dog", resolution=RESOLUTION, batch_size=4, learning_rate=1e-3, seed=3, progress=False)
STEPS = 40  # the loss halves by about step 30 (measured: steps 1-10 average 0.78, steps 31-40 0.30)
RTOL = 1e-4  # loss and gradient parity with PyTorch (see assert_grads_close)


@pytest.fixture(scope="module")
def pipe(flax_pipeline):
    return flax_pipeline[0]  # (pipeline, params): the trainers reuse its compiled subject encoder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_subject_images(tmp_path_factory.mktemp("subject"))


def train(model, pipeline, out, stop_after=None, **overrides):
    trainer = SubjectFinetuner(model, FinetuneConfig(out=str(out), **{**SETTINGS, **overrides}), pipeline=pipeline)
    trainer.train(stop_after=stop_after)
    return trainer


def max_diff(a, b):
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def uninterrupted(converted_model, pipe, image_dir, tmp_path_factory):
    """STEPS steps, data-parallel over the 4 fake devices, one checkpoint at the end."""
    out = tmp_path_factory.mktemp("run") / "out"
    trainer = train(converted_model, pipe, out, images=image_dir, steps=STEPS)
    assert trainer.num_devices == 4
    return trainer, str(out)


@pytest.fixture(scope="module")
def one_device(uninterrupted, converted_model):
    """The loss of `uninterrupted` as one jitted `value_and_grad` on one device, with the text encoder among the
    differentiated params, and the exact (latents, noise, timesteps) its train step draws at a given step."""
    trainer, _ = uninterrupted
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Arguments committed to one device, always: the compiled programs are then reused, never rebuilt.
    jitted_value_and_grad = jax.jit(jax.value_and_grad(trainer.loss))
    jitted_sample = jax.jit(trainer.loss.sample_inputs)

    def value_and_grad(*args):
        return jitted_value_and_grad(*jax.device_put(args, device))

    def inputs(step):
        key = step_key(jax.random.PRNGKey(SETTINGS["seed"]), step)
        return jitted_sample(*jax.device_put((converted_model.params["vae"], trainer.batch(step), key), device))

    return value_and_grad, inputs


# ---------------------------------------------------------------------------------------------- loss parity


def torch_loss_and_grads(torch_pipeline, latents, noise, timesteps, input_ids, emb):
    import torch

    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    ctx = t(emb).requires_grad_(True)
    modules = (torch_pipeline.unet, torch_pipeline.text_encoder)
    for module in modules:
        module.zero_grad(set_to_none=True)
    try:
        value = torch_lavis_loss(torch_pipeline, t(latents), t(noise), t(timesteps).long(), t(input_ids).long(), ctx)
        value.backward()
        unet = dict(torch_pipeline.unet.named_parameters())
        text = dict(torch_pipeline.text_encoder.named_parameters())
        grads = {
            ("unet", "conv_in", "kernel"): unet["conv_in.weight"].grad.numpy().transpose(2, 3, 1, 0),
            ("unet", "time_embedding", "linear_1", "kernel"): unet["time_embedding.linear_1.weight"].grad.numpy().T,
            ("unet", "down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel"):
                unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].grad.numpy().T,
            ("unet", "up_blocks_1", "resnets_0", "norm1", "scale"): unet["up_blocks.1.resnets.0.norm1.weight"].grad.numpy(),
            ("unet", "conv_out", "bias"): unet["conv_out.bias"].grad.numpy(),
            ("text_encoder", "text_model", "encoder", "layers", "0", "self_attn", "q_proj", "kernel"):
                text["text_model.encoder.layers.0.self_attn.q_proj.weight"].grad.numpy().T,
            ("text_encoder", "text_model", "final_layer_norm", "scale"): text["text_model.final_layer_norm.weight"].grad.numpy(),
            ("subject_embeddings",): ctx.grad.numpy(),
        }
    finally:
        for module in modules:
            module.zero_grad(set_to_none=True)
    return float(value.detach()), grads


@pytest.mark.slow
def test_loss_and_gradients_match_lavis_in_pytorch(converted_model, pipe, torch_pipeline, uninterrupted, one_device):
    import torch

    trainer, _ = uninterrupted
    value_and_grad, inputs = one_device
    loss = trainer.loss
    emb = trainer.subject_embeddings()
    assert emb.shape == (1, pipe.num_query_tokens, 32)

    # The VAE posterior matches diffusers' (LAVIS samples it: mean + std * eps).
    pixels = jnp.asarray(trainer.batch(0))

    def posterior(params, pixels):
        dist = loss.vae.apply({"params": params}, pixels, method=loss.vae.encode).latent_dist
        return dist.mean.transpose(0, 3, 1, 2), dist.std.transpose(0, 3, 1, 2)

    mean, std = jax.jit(posterior)(converted_model.params["vae"], pixels)
    with torch.no_grad():
        torch_posterior = torch_pipeline.vae.encode(torch.from_numpy(np.array(pixels))).latent_dist
    np.testing.assert_allclose(np.asarray(mean), torch_posterior.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(std), torch_posterior.std.numpy(), atol=1e-4)

    latents, noise, _ = inputs(0)
    timesteps = jnp.array([3, 250, 999, 600])  # both ends of the schedule
    trainable = {k: converted_model.params[k] for k in ("unet", "text_encoder")} | {"subject_embeddings": emb}
    batch = (latents, noise, timesteps, trainer.input_ids)
    value, grads = value_and_grad(trainable, {}, *batch)

    with flax_unet_numerics(torch_pipeline.unet):
        aligned_value, aligned_grads = torch_loss_and_grads(torch_pipeline, *batch, emb)
    np.testing.assert_allclose(float(value), aligned_value, rtol=RTOL)
    assert_grads_close(grads, aligned_grads, RTOL)

    # diffusers' PyTorch UNet as it is (see flax_unet_numerics): the loss still within 1e-4, gradients within 1e-3.
    torch_value, torch_grads = torch_loss_and_grads(torch_pipeline, *batch, emb)
    np.testing.assert_allclose(float(value), torch_value, rtol=RTOL)
    assert_grads_close(grads, torch_grads, 1e-3)

    # remat: each UNet block is one rematerialised call (nn.remat is exact; tracing suffices, no second compile).
    from blipdiff_jax.training.loss import DiffusionLoss

    remat = DiffusionLoss(converted_model.configs, pipe.ctx_begin_pos, remat=True)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(remat))(trainable, {}, *batch).jaxpr
    blocks = len(converted_model.configs["unet"]["down_block_types"]) * 2 + 1
    assert sum(eqn.primitive.name.startswith(("remat", "checkpoint")) for eqn in jaxpr.eqns) == blocks


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_with_float32_master_weights(converted_model, pipe, uninterrupted, one_device):
    """Traced only (a bf16 train step is one more compile): every convolution and matmul of the forward and
    backward pass takes bf16 operands (on CPU they sum into fp32, models/bf16_matmul.py), the loss and the
    gradients of the fp32 params come out in fp32."""
    from collections import Counter

    from support.programs import jaxpr_equations

    from blipdiff_jax.training.loss import DiffusionLoss

    trainer, _ = uninterrupted
    _, inputs = one_device
    loss = DiffusionLoss(converted_model.configs, pipe.ctx_begin_pos, compute_dtype=jnp.bfloat16)
    trainable = {"unet": converted_model.params["unet"], "subject_embeddings": np.zeros((1, 4, 32), np.float32)}
    frozen = {"text_encoder": converted_model.params["text_encoder"]}
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(trainable, frozen, *inputs(0), trainer.input_ids)
    products = jaxpr_equations(jaxpr.jaxpr, ("conv_general_dilated", "dot_general"))
    kinds = Counter(str(operand.aval.dtype) for eqn in products for operand in eqn.invars[:2])
    assert set(kinds) == {"bfloat16"} and kinds["bfloat16"] > 200
    assert {str(aval.dtype) for aval in jaxpr.out_avals} == {"float32"}


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_model_overfits_three_images(uninterrupted):
    """At learning rate 1e-3 the mean loss of the last 10 steps is under half that of the first 10."""
    trainer, out = uninterrupted
    losses = [entry["loss"] for entry in read_log(out)]
    assert [entry["step"] for entry in read_log(out)] == list(range(1, STEPS + 1))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_data_parallel_on_4_devices_matches_one_device(converted_model, pipe, image_dir, uninterrupted, one_device, tmp_path):
    """The first step on 4 devices against the same loss on one device: the loss, and the gradients (AdamW's
    first moment after one step is exactly (1 - b1) * gradient)."""
    trainer, _ = uninterrupted
    assert len(trainer.trainable["unet"]["conv_in"]["kernel"].sharding.device_set) == 4
    first = train(converted_model, pipe, tmp_path / "one-step", images=image_dir, steps=1)
    value_and_grad, inputs = one_device
    params = {"unet": converted_model.params["unet"], "text_encoder": converted_model.params["text_encoder"],
              "subject_embeddings": trainer.subject_embeddings()}
    value, grads = value_and_grad(params, {}, *inputs(0), trainer.input_ids)
    np.testing.assert_allclose(read_log(tmp_path / "one-step")[0]["loss"], float(value), rtol=0, atol=1e-5)
    sharded_grads = jax.tree_util.tree_map(lambda mu: np.asarray(mu) / 0.1, first.opt_state[0].mu)
    for name in ("unet", "subject_embeddings"):
        scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[name]))
        assert max_diff(sharded_grads[name], grads[name]) <= 1e-4 * scale, name


class Killed(BaseException):
    """Stands for a kill (SIGINT and the like): not an `Exception`, so nothing on the way catches it."""


@pytest.mark.slow
def test_stop_kill_and_resume_equal_an_uninterrupted_run(converted_model, pipe, image_dir, uninterrupted, tmp_path):
    """Stopped after step 17 (checkpoints at 15 and 17), resumed and killed during step 28, resumed again: the
    final params equal the uninterrupted run's, and the loss log holds every step once with the same losses."""
    reference, _ = uninterrupted
    out = tmp_path / "out"
    settings = dict(images=image_dir, steps=STEPS, checkpoint_every=15)
    train(converted_model, pipe, out, stop_after=17, **settings)
    assert not os.path.exists(out / "model_index.json")  # stopped early: nothing exported yet
    assert sorted(os.listdir(out / "checkpoints"), key=int) == ["15", "17"]

    killed = SubjectFinetuner(converted_model, FinetuneConfig(out=str(out), resume=True, **{**SETTINGS, **settings}), pipeline=pipe)
    real_step, calls = killed.train_step, []

    def dies_in_step_28(*args):
        calls.append(1)
        if len(calls) == 11:
            raise Killed
        return real_step(*args)

    killed.train_step = dies_in_step_28
    with pytest.raises(Killed):
        killed.train()
    assert read_log(out)[-1]["step"] == 27 and sorted(os.listdir(out / "checkpoints"), key=int) == ["15", "17"]

    resumed = train(converted_model, pipe, out, resume=True, **settings)
    assert max_diff(resumed.trainable, reference.trainable) <= 1e-6
    assert [e["step"] for e in read_log(out)] == list(range(1, STEPS + 1))  # steps 18-27 logged once
    assert [e["loss"] for e in read_log(out)] == pytest.approx([e["loss"] for e in read_log(reference.out)], abs=1e-6)


@pytest.mark.slow
def test_export_loads_and_generates_with_the_learned_embeddings(uninterrupted):
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    trainer, out = uninterrupted
    assert {"checkpoints", "loss.jsonl", "model_index.json", "subject_embeddings.npy"} <= set(os.listdir(out))
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(out)
    learned = np.asarray(trainer.trainable["subject_embeddings"])
    np.testing.assert_array_equal(pipeline.subject_embeddings, learned)
    assert np.abs(learned - trainer.subject_embeddings()).max() > 1e-4  # trained away from the Q-Former mean
    assert max_diff(params["unet"], trainer.trainable["unet"]) == 0
    kwargs = dict(params=params, prng_seed=jax.random.PRNGKey(0), height=16, width=16, num_inference_steps=2, output_type="np")
    image = pipeline("on the beach", None, None, "dog", **kwargs).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    explicit = pipeline("on the beach", None, None, "dog", subject_embeddings=learned, **kwargs).images
    np.testing.assert_array_equal(image, explicit)
    other = pipeline("on the beach", None, None, "dog", subject_embeddings=np.zeros_like(learned), **kwargs).images
    assert np.abs(other - image).max() > 1e-4


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_images_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="images"):
        data.list_images(str(empty))
    with pytest.raises(FileNotFoundError, match="images"):
        data.list_images(str(tmp_path / "missing"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "broken.png").write_bytes(b"\x89PNG not really")
    make_image(1).save(mixed / "a.jpg")
    with pytest.warns(UserWarning) as caught:
        paths = data.list_images(str(mixed))
    assert [os.path.basename(p) for p in paths] == ["a.jpg"]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "broken.png" in messages[0] and "notes.txt" in messages[1]
    assert all(m.startswith("images: skipping") for m in messages)
    (mixed / "a.jpg").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="images"):
        data.list_images(str(mixed))


def test_target_images_are_center_crops_in_minus_one_one():
    from PIL import Image

    array = np.zeros((30, 60, 3), np.uint8)
    array[:, 15:45] = 255  # a white centre band exactly as wide as the crop
    target = data.target_image(Image.fromarray(array), 8)
    assert target.shape == (3, 8, 8) and target.dtype == np.float32
    assert target.min() >= -1 and target.max() <= 1 and target[:, :, 2:6].min() > 0.9


def test_data_order_is_a_pure_function_of_seed_and_step():
    order = np.concatenate([data.batch_indices(5, step, 2, 3) for step in range(6)])  # 4 epochs of 3 images
    assert all(sorted(order[i : i + 3]) == [0, 1, 2] for i in range(0, 12, 3))
    np.testing.assert_array_equal(data.batch_indices(5, 4, 2, 3), order[8:10])
    assert not np.array_equal(order, np.concatenate([data.batch_indices(6, step, 2, 3) for step in range(6)]))


def test_bad_settings_name_the_argument(converted_model, pipe, image_dir, tmp_path):
    def make(**overrides):
        return SubjectFinetuner(converted_model, FinetuneConfig(out=str(tmp_path / "o"), **{**SETTINGS, "images": image_dir, **overrides}),
                                pipeline=pipe)

    for field, value, error in (("steps", 0, ValueError), ("learning_rate", float("nan"), ValueError),
                                ("batch_size", 2.5, TypeError), ("resolution", 18, ValueError), ("subject", " ", ValueError)):
        with pytest.raises(error, match=field):
            make(**{field: value})
    with pytest.raises(ValueError, match="resume"):
        make(resume=True).train()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    with pytest.raises(FileExistsError, match="out"):
        make().train()


# ---------------------------------------------------------------------------------------------- CLI


def finetune_args(argv):
    from blipdiff_jax.training.cli import add_finetune_parser

    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["finetune"] + argv)


@pytest.mark.slow
def test_cli_finetunes_the_dreambooth_dog(converted_model, tmp_path):
    from blipdiff_jax.checkpoint import save_converted
    from blipdiff_jax.training.cli import run_finetune

    images = os.path.dirname(shared_image("dreambooth-dog/00.jpg"))
    model_dir = save_converted(converted_model, str(tmp_path / "model"))
    out = tmp_path / "dog"
    args = finetune_args(["--model", model_dir, "--images", images, "--subject", "dog", "--out", str(out),
                          "--steps", "2", "--resolution", "16", "--batch-size", "4", "--learning-rate", "1e-3",
                          "--seed", "3", "--preview-every", "2", "--preview-steps", "2", "--quiet"])
    assert run_finetune(args) == str(out)
    assert [e["step"] for e in read_log(out)] == [1, 2]
    assert os.path.isfile(out / "previews" / "step-0002.png")
    assert os.path.isfile(out / "model_index.json") and os.path.isdir(out / "checkpoints" / "2")


def test_cli_errors_name_the_flag(image_dir, tmp_path):
    from blipdiff_jax.training.cli import run_finetune

    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--model", str(tmp_path), "--subject", "dog", "--out", str(tmp_path / "o")]
    for extra, error, flag in ((["--images", str(empty)], ValueError, "--images"),
                               (["--images", str(tmp_path / "none")], FileNotFoundError, "--images"),
                               (["--images", image_dir], FileNotFoundError, "--model"),  # not a model directory
                               (["--images", image_dir, "--batch-size", "0"], ValueError, "--batch-size"),
                               (["--images", image_dir, "--learning-rate", "-1"], ValueError, "--learning-rate")):
        with pytest.raises(error, match=flag):
            run_finetune(finetune_args(base + extra))


@pytest.mark.slow
def test_cli_takes_a_hub_id(converted_model, image_dir, tmp_path, monkeypatch):
    """A Hub id resolves as for generate (downloaded and converted once); offline and uncached, the error
    names --model and the id."""
    from blipdiff_jax import hub
    from blipdiff_jax.checkpoint import save_converted
    from blipdiff_jax.training.cli import run_finetune

    base = ["--images", image_dir, "--subject", "dog", "--steps", "1", "--resolution", "16", "--batch-size", "4",
            "--learning-rate", "1e-3", "--quiet"]
    monkeypatch.setattr(hub, "_snapshot", lambda repo_id: None)
    with pytest.raises(FileNotFoundError, match="--model: someorg/blipdiffusion is not in the local"):
        run_finetune(finetune_args(["--model", "someorg/blipdiffusion", "--out", str(tmp_path / "a")] + base))
    model_dir = save_converted(converted_model, str(tmp_path / "model"))
    monkeypatch.setattr(hub, "resolve_hub_model", lambda repo_id, qformer_tokenizer=None: model_dir)
    out = tmp_path / "b"
    assert run_finetune(finetune_args(["--model", "someorg/blipdiffusion", "--out", str(out)] + base)) == str(out)
    assert [e["step"] for e in read_log(out)] == [1]
