"""Pre-training at scale: the sharding rule, meshes of the 4 fake CPU devices (data, fsdp, both) against one
device, SIGTERM and resume, two processes against one, and the memory plan."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from support.models import smallest_model
from support.paths import ROOT
from support.runs import read_losses

from blipdiff_jax.training import sharding
from blipdiff_jax.training.pretrain import PretrainConfig, SubjectPretrainer

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from multiprocess import cpu_collectives_available  # noqa: E402
from pretrain_scaling import TOY_SETTINGS  # noqa: E402  the settings the two-process workers train with

STEPS = 5
LOSS_ATOL = 1e-5  # a mesh's losses against one device's (fp32; only the reductions' order differs)
MIN_SIZE = TOY_SETTINGS["shard_min_size"]


def pretrainer(model, out, **overrides):
    return SubjectPretrainer(model, PretrainConfig(out=str(out), **{**TOY_SETTINGS, **overrides}))


def checkpoint_state(out, step, like):
    """The checkpoint's state as arrays on this process's first device, whatever mesh wrote it."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    return ocp.StandardCheckpointer().restore(os.path.join(out, "checkpoints", str(step), "state"), target)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return smallest_model(str(tmp_path_factory.mktemp("smallest")))


@pytest.fixture(scope="module")
def one_device(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    trainer = pretrainer(model, out, devices=1)
    trainer.train(stop_after=STEPS)
    return trainer, str(out)


def test_rule_splits_large_leaves_on_their_largest_divisible_dimension():
    P = jax.sharding.PartitionSpec
    assert sharding.param_spec((320, 1280), 4, 1024) == P(None, "fsdp")
    assert sharding.param_spec((3, 3, 4, 320), 8, 1024) == P(None, None, None, "fsdp")
    assert sharding.param_spec((1280, 4), 4, 1024) == P("fsdp")  # the largest dimension first
    assert sharding.param_spec((320,), 4, 1024) == P()  # small: replicated
    assert sharding.param_spec((7, 1031), 4, 1024) == P()  # no dimension divides
    assert sharding.param_spec((320, 1280), 1, 1024) == P()
    assert sharding.parse_mesh(None, 4) == {"data": 4, "fsdp": 1}
    assert sharding.parse_mesh("fsdp=2, data=2", 4) == {"data": 2, "fsdp": 2}
    for bad, match in (("fsdp=8", "needs 8 devices"), ("model=2", "axis=size"), ("data=0", "axis=size")):
        with pytest.raises(ValueError, match=match):
            sharding.parse_mesh(bad, 4)


def test_bad_mesh_settings_are_refused_before_compiling(model, tmp_path):
    for overrides, error, match in ((dict(mesh="data=3"), ValueError, "batch_size"),
                                    (dict(mesh="data=2", devices=2), ValueError, "devices"),
                                    (dict(grad_accum=3), ValueError, "grad_accum"),
                                    (dict(mesh="data=4", grad_accum=4), ValueError, "grad_accum"),
                                    (dict(mesh=4), TypeError, "mesh")):
        with pytest.raises(error, match=match):
            pretrainer(model, tmp_path / "o", **overrides)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
@pytest.mark.parametrize("mesh, grad_accum", [("data=4", 1), ("fsdp=4", 1), ("data=2,fsdp=2", 2)])
def test_mesh_losses_equal_one_device_and_state_is_sharded(model, one_device, tmp_path, mesh, grad_accum):
    out = tmp_path / "run"
    trainer = pretrainer(model, out, mesh=mesh, grad_accum=grad_accum)
    trainer.train(stop_after=STEPS)
    frozen = trainer.frozen_state["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert frozen.sharding.spec == sharding.param_spec(frozen.shape, trainer.mesh.shape["fsdp"], MIN_SIZE)  # frozen: same rule
    np.testing.assert_allclose(read_losses(str(out)), read_losses(one_device[1]), rtol=0, atol=LOSS_ATOL)
    fsdp = trainer.mesh.shape["fsdp"]
    split = 0
    for tree in (trainer.trainable, trainer.opt_state):
        for leaf in jax.tree_util.tree_leaves(tree):
            spec = sharding.param_spec(leaf.shape, fsdp, MIN_SIZE)
            assert leaf.sharding.spec == spec, (leaf.shape, leaf.sharding)
            shard = leaf.addressable_shards[0].data
            if "fsdp" in spec:  # each device holds 1/fsdp of the leaf
                assert shard.size * fsdp == leaf.size
                split += 1
            else:
                assert shard.shape == leaf.shape
    if fsdp > 1:  # the UNet's kernels and their AdamW moments
        unet_kernel = trainer.trainable["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_0"]["proj"]["kernel"]
        assert "fsdp" in unet_kernel.sharding.spec
        assert split >= 20, split
    else:
        assert split == 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(model, one_device, tmp_path):
    out = tmp_path / "run"
    trainer = pretrainer(model, out, devices=1)
    prepare = trainer._step_args

    def preempted_after_step_3(step):  # as a scheduler's SIGTERM arriving while step 3 runs
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return prepare(step)

    trainer._step_args = preempted_after_step_3
    trainer.train(stop_after=STEPS)
    assert trainer.stopped_at == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["3"]
    assert not os.path.exists(out / "model_index.json")  # not exported
    assert signal.getsignal(signal.SIGTERM) is not trainer  # our handler is gone after the run
    resumed = pretrainer(model, out, devices=1)  # no resume flag: the same command continues
    resumed.train(stop_after=STEPS)
    assert read_losses(str(out)) == read_losses(one_device[1])
    for a, b in zip(jax.tree_util.tree_leaves(resumed.trainable), jax.tree_util.tree_leaves(one_device[0].trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not cpu_collectives_available(), reason="this jaxlib has no CPU collectives (no gloo TCP collectives)")
def test_two_processes_give_the_losses_and_checkpoint_of_one(model, one_device, tmp_path):
    from blipdiff_jax.checkpoint import save_converted

    model_dir = save_converted(model, str(tmp_path / "model"))
    out = str(tmp_path / "two")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "pretrain_scaling.py"), "processes", "--model", model_dir,
           "--out", out, "--processes", "2", "--mesh", "fsdp=2", "--stop-after", str(STEPS), "--timeout", "240"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "steps on a global mesh of 2" in proc.stdout
    np.testing.assert_allclose(read_losses(out), read_losses(one_device[1]), rtol=0, atol=LOSS_ATOL)
    trainer = one_device[0]
    like = {"trainable": trainer.trainable, "opt_state": trainer.opt_state, "rng": jax.random.PRNGKey(0)}
    two, one = checkpoint_state(out, STEPS, like), checkpoint_state(one_device[1], STEPS, like)
    assert len(jax.tree_util.tree_leaves(two)) == len(jax.tree_util.tree_leaves(one)) > 100
    # AdamW moves a parameter by ~the learning rate whatever its gradient's size, so where the true gradient is
    # zero (biases just before a group norm) the update follows rounding noise (|g| ~ 1e-11, second moment
    # < 1e-18; real gradients' are > 1e-16) and differs between any two reduction orders by up to lr per step.
    # Every other leaf must agree within 1e-5.
    second_moment = one["opt_state"][1][0].nu
    noise_only = jax.tree_util.tree_map(lambda nu: float(np.max(np.asarray(nu))) < 1e-18, second_moment)
    noisy, total = 0, 0
    for (path, a), b, only_noise in zip(jax.tree_util.tree_leaves_with_path(one["trainable"]),
                                        jax.tree_util.tree_leaves(two["trainable"]), jax.tree_util.tree_leaves(noise_only)):
        atol = STEPS * TOY_SETTINGS["learning_rate"] if only_noise else 1e-5
        noisy, total = noisy + only_noise, total + 1
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
    assert noisy < total / 3, (noisy, total)  # biases and the time-embedding projections before group norms
    for a, b in zip(jax.tree_util.tree_leaves(one["opt_state"]), jax.tree_util.tree_leaves(two["opt_state"])):
        assert np.shape(a) == np.shape(b)


@pytest.mark.slow
def test_memory_plan_is_printed_and_an_over_budget_step_refused(model, one_device, tmp_path, capsys):
    trainer, _ = one_device
    plan = trainer.memory_plan  # made before the first step
    assert plan is not None and plan.mesh == {"data": 1, "fsdp": 1}
    assert 0 < plan.arguments and 0 < plan.total and plan.limit is None  # CPU reports no limit
    # `--plan` compiles the same program on ShapeDtypeStructs, allocating nothing: the same plan
    assert pretrainer(model, tmp_path / "plan", devices=1).plan() == plan
    assert "total" in plan.line() and not os.path.exists(tmp_path / "plan")
    with pytest.raises(ValueError, match="device_memory_gib.*per device"):
        pretrainer(model, tmp_path / "small", devices=1, device_memory_gib=plan.total / 2**30 / 2).train()
    assert not os.path.exists(tmp_path / "small" / "checkpoints" / "1")


def test_cli_refuses_bad_distributed_and_plan_flags(tmp_path, capsys):
    from blipdiff_jax.cli import main

    out = str(tmp_path / "o")
    assert main(["pretrain", "--model", "m", "--out", out, "--num-processes", "2"]) == 2
    assert "--num-processes: only with --coordinator-address" in capsys.readouterr().err
    assert main(["pretrain", "--toy", "--out", out, "--plan"]) == 2
    assert "--plan" in capsys.readouterr().err
    assert main(["pretrain", "--toy", "--out", out, "--mesh", "data=64"]) == 2
    assert "--mesh" in capsys.readouterr().err
    assert not os.path.exists(out)
