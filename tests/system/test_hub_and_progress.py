"""Hub ids with a conversion cache, and the progress bar fed from inside the compiled loop."""

import shutil

import jax
import numpy as np
import pytest
from support.images import make_image

from blipdiff_jax import FlaxBlipDiffusionPipeline, hub


def test_hub_id_converts_once_then_reuses(torch_pipeline_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "snapshots" / "0123456789abcdef"
    shutil.copytree(torch_pipeline_dir, snapshot)
    monkeypatch.setenv("BLIPDIFF_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_snapshot", lambda repo_id: str(snapshot))
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")
    converted = tmp_path / "cache" / "converted" / "Salesforce--blipdiffusion" / "0123456789abcdef"
    assert (converted / "model_index.json").exists()

    import convert.pytorch_dir

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert.pytorch_dir, "read_pytorch_directory", no_second_conversion)
    again, _ = FlaxBlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")
    # Offline with the Hub cache gone, the converted copy still serves.
    monkeypatch.setattr(hub, "_snapshot", lambda repo_id: None)
    offline, _ = FlaxBlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")
    assert offline.num_query_tokens == pipeline.num_query_tokens


def test_offline_with_nothing_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPDIFF_JAX_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        FlaxBlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")
    message = str(err.value)
    assert "Salesforce/blipdiffusion" in message and "local directory" in message and "\n" not in message


@pytest.mark.slow
def test_progress_bar_counts_steps_without_recompiling_or_changing_images(flax_pipeline, capsys):
    pipeline, params = flax_pipeline
    # The suite's common small generation (16x16, 2 steps): its programs are compiled once per run.
    kwargs = dict(params=params, prng_seed=jax.random.PRNGKey(3), height=16, width=16, num_inference_steps=2, output_type="np")
    plain = pipeline("on grass", make_image(0), "dog", "dog", **kwargs).images
    shown = pipeline("on grass", make_image(0), "dog", "dog", progress=True, **kwargs).images
    compiled = pipeline._generate_jit._cache_size()
    pipeline("on grass", make_image(0), "dog", "dog", progress=True, **kwargs)
    assert pipeline._generate_jit._cache_size() == compiled
    np.testing.assert_array_equal(plain, shown)
    assert "2/2" in capsys.readouterr().err
