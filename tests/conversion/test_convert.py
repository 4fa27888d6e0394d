"""Conversion: strict mapping, the converted directory format, the `python -m convert` CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file
from support.paths import ROOT
from support.torch_reference import torch_qformer

from blipdiff_jax import tiny
from blipdiff_jax.checkpoint import load_converted, save_converted
from convert.mapping import ConversionError
from convert.pytorch_dir import convert_component, read_pytorch_directory
from convert.state_dict import read_folder_weights


@pytest.fixture(scope="module")
def qformer_state(tokenizer_dirs):
    pt = torch_qformer(tiny.qformer_config(), tokenizer_dirs["bert"], seed=11)
    return {k: v.numpy() for k, v in pt.state_dict().items()}, pt.config.to_dict()


def test_every_tensor_is_used_and_every_param_filled(qformer_state):
    state, config = qformer_state
    params = flatten_dict(convert_component("qformer", state, config))
    assert len(params) == len(state) - 1  # all but the position_ids buffer
    np.testing.assert_array_equal(params[("query_tokens",)], state["query_tokens"])
    np.testing.assert_array_equal(
        params[("encoder", "layer", "1", "crossattention", "attention", "key", "kernel")],
        state["encoder.layer.1.crossattention.attention.key.weight"].T,
    )


def test_missing_tensor_is_named(qformer_state):
    state, config = qformer_state
    broken = {k: v for k, v in state.items() if k != "encoder.layer.0.output_query.dense.bias"}
    with pytest.raises(ConversionError, match=r"missing.*encoder\.layer\.0\.output_query\.dense\.bias"):
        convert_component("qformer", broken, config)


def test_extra_tensor_is_named(qformer_state):
    state, config = qformer_state
    with pytest.raises(ConversionError, match=r"unexpected.*encoder\.layer\.0\.surprise\.weight"):
        convert_component("qformer", {**state, "encoder.layer.0.surprise.weight": np.zeros((2, 2), np.float32)}, config)


def test_wrong_shape_is_named(qformer_state):
    state, config = qformer_state
    broken = dict(state, **{"proj_layer.dense2.weight": np.zeros((32, 7), np.float32)})
    with pytest.raises(ConversionError, match=r"wrong shapes.*proj_layer\.dense2\.weight: checkpoint \(32, 7\)"):
        convert_component("qformer", broken, config)


def test_unknown_buffer_is_not_skipped(qformer_state):
    state, config = qformer_state
    with pytest.raises(ConversionError, match=r"visual_encoder\.position_ids"):
        convert_component("qformer", {**state, "visual_encoder.position_ids": np.arange(3)}, config)


def test_unet_checkpoint_missing_a_tensor_fails(torch_pipeline_dir, tmp_path):
    copy = tmp_path / "pt"
    shutil.copytree(torch_pipeline_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    save_file(state, str(weights))
    with pytest.raises(ConversionError, match=r"unet: missing.*up_blocks_1\.attentions_0\.transformer_blocks_0\.attn2\.to_k\.kernel"):
        read_pytorch_directory(str(copy))


def test_bin_weights_load_with_weights_only(tmp_path, qformer_state):
    state, config = qformer_state
    folder = tmp_path / "qformer"
    folder.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / "pytorch_model.bin")
    loaded, source = read_folder_weights(str(folder))
    assert source.endswith("pytorch_model.bin")
    convert_component("qformer", loaded, config)


class _Payload:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    torch.save({"weight": _Payload()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refused"):
        read_folder_weights(str(folder))


def test_converted_directory_round_trips(converted_model, tmp_path):
    out = save_converted(converted_model, str(tmp_path / "flax"))
    back = load_converted(out)
    original = flatten_dict(converted_model.params)
    restored = flatten_dict(back.params)
    assert original.keys() == restored.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value), err_msg=str(key))
        assert restored[key].dtype == value.dtype
    assert back.configs == converted_model.configs
    assert back.pipeline_config == converted_model.pipeline_config
    text = "a dog swimming"
    assert back.tokenizer(text).input_ids == converted_model.tokenizer(text).input_ids
    assert back.qformer_tokenizer(["teapot"]).input_ids == converted_model.qformer_tokenizer(["teapot"]).input_ids
    assert not [p for p in os.listdir(tmp_path) if "incomplete" in p]
    with pytest.raises(FileExistsError):
        save_converted(converted_model, out)  # never overwrites what a user saved


def test_failed_save_leaves_nothing_half_written(converted_model, tmp_path):
    bad = dict(converted_model.params, unet={"kernel": object()})  # orbax cannot write this
    model = type(converted_model)(**{**converted_model.__dict__, "params": bad})
    with pytest.raises(ValueError):
        save_converted(model, str(tmp_path / "flax"))
    assert not os.path.exists(tmp_path / "flax")
    assert os.listdir(tmp_path) == []


def test_qformer_tokenizer_absent_offline_says_how_to_fix(torch_pipeline_dir, tmp_path):
    copy = tmp_path / "pt"
    shutil.copytree(torch_pipeline_dir, copy)
    config_file = copy / "qformer" / "config.json"
    config_file.write_text(config_file.read_text().replace(str(tiny.os.path.dirname(tiny.__file__)), "x"))
    import json

    config = json.loads(config_file.read_text())
    config["tokenizer"] = "no-such-org/no-such-bert"
    config_file.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="--qformer-tokenizer PATH"):
        read_pytorch_directory(str(copy))


@pytest.mark.slow
def test_cli_converts_and_loads_without_torch(torch_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "flax"
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "convert", torch_pipeline_dir, str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in ("qformer", "text_encoder", "unet", "vae"):
        assert f"{name}: " in result.stdout
    # The converted directory loads in a process where importing torch fails.
    check = (
        "import sys; sys.modules['torch'] = None\n"
        "from blipdiff_jax import FlaxBlipDiffusionPipeline\n"
        f"p, params = FlaxBlipDiffusionPipeline.from_pretrained({str(out)!r})\n"
        "print(sorted(params))"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=ROOT)
    assert loaded.returncode == 0, loaded.stderr
    assert "'unet'" in loaded.stdout
    # The refusals, through the same `main` whose return value `python -m convert` exits with (above): each
    # fresh interpreter cost ~8 s of imports.
    from convert.__main__ import main as convert_main

    assert convert_main([torch_pipeline_dir, str(out)]) != 0 and "already exists" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "o")]) != 0 and "does not exist" in capsys.readouterr().err


COMPONENT_FILES = {"qformer": "qformer/model.safetensors", "text_encoder": "text_encoder/model.safetensors",
                   "unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors"}


@pytest.mark.filterwarnings("ignore:bfloat16 params on CPU")  # the scheduler advice; no program runs here
@pytest.mark.parametrize("dtype", [jax.numpy.float32, jax.numpy.bfloat16])
def test_from_pt_streams_the_params_of_the_converted_directory(torch_pipeline_dir, tmp_path, dtype):
    """`from_pretrained(from_pt=True)` reads, converts and places one tensor at a time; its params equal, bit
    for bit and dtype for dtype, those of the converted directory and of whole state dicts mapped at once."""
    from blipdiff_jax import FlaxBlipDiffusionPipeline, components

    _, streamed = FlaxBlipDiffusionPipeline.from_pretrained(torch_pipeline_dir, from_pt=True, dtype=dtype)
    out = save_converted(read_pytorch_directory(torch_pipeline_dir), str(tmp_path / "flax"))
    _, from_dir = FlaxBlipDiffusionPipeline.from_pretrained(out, dtype=dtype)
    model = load_converted(out)
    for name, file in COMPONENT_FILES.items():
        whole = convert_component(name, load_file(os.path.join(torch_pipeline_dir, file)), model.configs[name])
        expected = flatten_dict(components.cast_params(whole, dtype))
        for reference in (expected, flatten_dict(from_dir[name])):
            got = flatten_dict(streamed[name])
            assert got.keys() == reference.keys()
            for key, value in reference.items():
                assert isinstance(got[key], jax.Array) and got[key].dtype == value.dtype, key
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=f"{name} {key}")


def test_weights_are_read_one_tensor_at_a_time(torch_pipeline_dir):
    """Each tensor is read only when its turn comes and placed before the next is read; the whole state dict
    equals safetensors' own reading."""
    from convert.state_dict import open_folder_weights

    folder = os.path.join(torch_pipeline_dir, "vae")
    lazy, source = open_folder_weights(folder)
    whole = load_file(source)
    assert list(lazy) == list(whole)
    for key, value in whole.items():
        assert lazy.shape(key) == value.shape
        got = lazy[key]
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)
    events = []
    reading = type(lazy)({k: lazy.shape(k) for k in lazy}, lambda key: events.append("read") or lazy[key])
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    convert_component("vae", reading, config, place=lambda array: events.append("place") or array)
    assert events == ["read", "place"] * len(whole)


def test_a_checkpoint_that_does_not_fit_fails_before_any_tensor_is_read(qformer_state):
    from convert.state_dict import LazyStateDict

    state, config = qformer_state
    reads = []
    broken = {k: v for k, v in state.items() if k != "encoder.layer.0.attention.attention.query.weight"}
    lazy = LazyStateDict({k: v.shape for k, v in broken.items()}, lambda key: reads.append(key) or broken[key])
    with pytest.raises(ConversionError, match=r"missing.*encoder\.layer\.0\.attention\.attention\.query\.kernel"):
        convert_component("qformer", lazy, config)
    assert reads == []


def test_bf16_safetensors_read_as_fp32_as_torch_gives_them(tmp_path):
    from safetensors.torch import save_file as save_torch

    from convert.state_dict import read_weights_file

    tensors = {"a": torch.randn(3, 2).bfloat16(), "b": torch.arange(3), "c": torch.randn(2).half()}
    path = str(tmp_path / "model.safetensors")
    save_torch(tensors, path)
    state = read_weights_file(path)
    assert sorted(state) == sorted(tensors)
    for key, tensor in tensors.items():
        assert state[key].dtype == np.float32
        np.testing.assert_array_equal(state[key], tensor.float().numpy())


def test_sharded_weights_read_lazily_as_one_state_dict(torch_pipeline_dir, tmp_path):
    from convert.state_dict import open_folder_weights

    whole = load_file(os.path.join(torch_pipeline_dir, COMPONENT_FILES["vae"]))
    keys = list(whole)
    folder = tmp_path / "vae"
    folder.mkdir()
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: whole[k] for k in names}, str(folder / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    lazy, source = open_folder_weights(str(folder))
    assert source.endswith(".index.json") and sorted(lazy) == sorted(whole)
    for key, value in whole.items():
        assert lazy.shape(key) == value.shape
        np.testing.assert_array_equal(lazy[key], value)
