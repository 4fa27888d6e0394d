"""What a new user hit (issue 24): each test failed before its fix. Tiny models, CPU."""

import inspect
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.images import make_image
from support.paths import ROOT
from PIL import Image

from blipdiff_jax import FlaxBlipDiffusionPipeline
from blipdiff_jax.checkpoint import save_converted
from blipdiff_jax.cli import main

BF16_TOLERANCE = 0.05  # max abs on images in [0, 1], as in test_bf16.py and the README
SMALL = dict(height=16, width=16, num_inference_steps=2, output_type="np")


def _call(pipeline, params, **change):
    args = dict(prompt="on grass", reference_image=make_image(0), source_subject_category="dog",
                target_subject_category="dog", params=params, prng_seed=jax.random.PRNGKey(0), **SMALL)
    args.update(change)
    return pipeline(**args)


@pytest.fixture(scope="module")
def model_dir(converted_model, tmp_path_factory):
    """The tiny model as a converted directory, for the CLI."""
    return save_converted(converted_model, str(tmp_path_factory.mktemp("cli") / "model"))


@pytest.fixture(scope="module")
def generate(model_dir, tmp_path_factory):
    """`blipdiff-jax generate` arguments on the tiny model with a reference picture, plus `extra`."""
    reference = tmp_path_factory.mktemp("reference") / "ref.png"
    make_image(20, (48, 40)).save(reference)
    return lambda *extra: ["generate", "--model", model_dir, "--image", str(reference), "--subject", "dog", *extra]


# ------------------------------------------------------------------ 4: steps above num_train_timesteps


@pytest.mark.parametrize("entry", ["call", "edit", "edit_real", "edit_inversion", "invert"])
def test_more_steps_than_the_scheduler_has_are_refused(flax_pipeline, entry):
    pipeline, params = flax_pipeline
    edit = dict(prompt="on a sofa", reference_image=make_image(0), source_subject_category="dog",
                target_subject_category="dog", original_subject="cat", params=params,
                prng_seed=jax.random.PRNGKey(0), height=16, width=16)
    calls = {
        "call": (lambda: _call(pipeline, params, num_inference_steps=1001), "num_inference_steps=1001"),
        "edit": (lambda: pipeline.edit(**edit, num_inference_steps=1001), "num_inference_steps=1001"),
        "edit_real": (lambda: pipeline.edit(**edit, image=make_image(5), num_inference_steps=1001), "num_inference_steps=1001"),
        "edit_inversion": (lambda: pipeline.edit(**edit, image=make_image(5), num_inference_steps=2, num_inversion_steps=1001),
                           "num_inversion_steps=1001"),
        "invert": (lambda: pipeline.invert(make_image(5), "a cat", params=params, num_inference_steps=1001,
                                           height=16, width=16), "num_inference_steps=1001"),
    }
    run, name = calls[entry]
    with pytest.raises(ValueError, match=rf"{name} must be at most 1000 \(the scheduler's num_train_timesteps\)"):
        run()


def test_controlnet_refuses_more_steps_than_the_scheduler_has(flax_controlnet_pipeline):
    pipeline, params = flax_controlnet_pipeline
    with pytest.raises(ValueError, match=r"num_inference_steps=1001 must be at most 1000"):
        _call(pipeline, params, conditioning_image=Image.new("RGB", (8, 8)), num_inference_steps=1001)


# ------------------------------------------------------------------ 3: the seed's noise in every dtype


@pytest.mark.slow
def test_a_seed_gives_the_same_image_in_bf16_as_in_fp32(flax_pipeline, converted_model):
    pipeline32, params32 = flax_pipeline
    pipeline16, params16 = FlaxBlipDiffusionPipeline.from_converted(converted_model, dtype=jnp.bfloat16)
    # At this file's small size (16x16, 2 steps): the fp32 program is the one the other tests here compiled.
    fp32 = _call(pipeline32, params32, prng_seed=jax.random.PRNGKey(7)).images
    bf16 = _call(pipeline16, params16, prng_seed=jax.random.PRNGKey(7)).images
    print("bf16 vs fp32 from one seed: max abs", np.abs(bf16 - fp32).max())
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=BF16_TOLERANCE)
    # The noise itself: the fp32 draw, rounded once to bf16.
    noise32 = pipeline32._latents(None, jax.random.PRNGKey(7), 1, 32, 32)
    noise16 = pipeline16._latents(None, jax.random.PRNGKey(7), 1, 32, 32)
    assert noise16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(noise16), np.asarray(noise32.astype(jnp.bfloat16)))


# ------------------------------------------------------------------ 11: typed and raw keys


@pytest.mark.slow
def test_typed_and_raw_keys_give_the_same_image(flax_pipeline):
    pipeline, params = flax_pipeline
    raw = _call(pipeline, params, prng_seed=jax.random.PRNGKey(3)).images
    typed = _call(pipeline, params, prng_seed=jax.random.key(3)).images
    np.testing.assert_array_equal(typed, raw)
    # per-device keys, typed or raw: the first one
    split = _call(pipeline, params, prng_seed=jax.random.split(jax.random.key(3), 4)).images
    np.testing.assert_array_equal(split, _call(pipeline, params, prng_seed=jax.random.split(jax.random.PRNGKey(3), 4)[0]).images)


@pytest.mark.parametrize("seed,what", [(0, "int"), (np.float32(1.5), "float32"),
                                       (np.zeros(2, np.float32), "float32 with shape")])
def test_a_seed_that_is_not_a_key_is_a_type_error_naming_prng_seed(flax_pipeline, seed, what):
    pipeline, params = flax_pipeline
    with pytest.raises(TypeError, match=rf"prng_seed must be a JAX PRNG key.*{what}"):
        _call(pipeline, params, prng_seed=seed)
    with pytest.raises(TypeError, match="prng_seed must be a JAX PRNG key"):
        pipeline.edit("on a sofa", make_image(0), "dog", "dog", "cat", params=params, prng_seed=seed, height=16, width=16)


# ------------------------------------------------------------------ 7: NaN subject embeddings


def test_nan_subject_embeddings_passed_in_are_refused(flax_pipeline):
    pipeline, params = flax_pipeline
    embeddings = np.array(pipeline.encode_subject(make_image(0), "dog", params))
    embeddings[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="subject_embeddings hold NaN or inf"):
        _call(pipeline, params, reference_image=None, subject_embeddings=embeddings)
    with pytest.raises(ValueError, match="subject_embeddings hold NaN or inf"):
        pipeline.edit("on a sofa", None, None, "dog", "cat", params=params, subject_embeddings=embeddings,
                      prng_seed=jax.random.PRNGKey(0), height=16, width=16)


def test_nan_from_the_subject_encoder_names_it(flax_pipeline):
    pipeline, params = flax_pipeline
    poisoned = dict(params, qformer=jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params["qformer"]))
    with pytest.raises(FloatingPointError, match=r"subject encoder \(Q-Former\)"):
        _call(pipeline, poisoned)


# ------------------------------------------------------------------ 10: errors that named the wrong argument


def test_edit_names_num_inversion_steps(flax_pipeline):
    pipeline, params = flax_pipeline
    with pytest.raises(ValueError, match=r"num_inversion_steps=0 must be at least 1"):
        pipeline.edit("on a sofa", make_image(0), "dog", "dog", "cat", image=make_image(5), params=params,
                      num_inference_steps=2, num_inversion_steps=0, height=16, width=16)


@pytest.mark.parametrize("change,error,match", [
    (dict(prompt_strength=float("nan")), ValueError, r"prompt_strength=nan must be a finite number >= 0"),
    (dict(prompt_strength="1"), TypeError, "prompt_strength must be a number"),
    (dict(prompt_reps=-1), ValueError, r"prompt_reps=-1 must be >= 0"),
    (dict(prompt=["a", "b", "c"], source_subject_category=["dog", "cat"]), ValueError,
     r"source_subject_category has 2 entries for 3 prompts \(give 1 or 3\)"),
    (dict(reference_image=[make_image(0), make_image(1)]), ValueError, r"reference_image has 2 entries for 1 prompt \(give 1\)"),
])
def test_prompt_arguments_are_named(flax_pipeline, change, error, match):
    pipeline, params = flax_pipeline
    compiled = pipeline._generate_jit._cache_size()
    with pytest.raises(error, match=match):
        _call(pipeline, params, **change)
    assert pipeline._generate_jit._cache_size() == compiled


def test_conditioning_image_count_message(flax_controlnet_pipeline):
    pipeline, params = flax_controlnet_pipeline
    with pytest.raises(ValueError, match=r"conditioning_image has 2 images for 1 prompt \(give 1\)$"):
        _call(pipeline, params, conditioning_image=[Image.new("RGB", (8, 8))] * 2)


# ------------------------------------------------------------------ 15: the long-prompt warning's line


def test_long_prompt_warning_points_at_the_callers_line(flax_pipeline):
    pipeline, params = flax_pipeline
    with pytest.warns(UserWarning, match="truncated") as record:
        line = inspect.currentframe().f_lineno + 1
        pipeline("very " * 100, make_image(0), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0), **SMALL)
    warning = next(w for w in record if "truncated" in str(w.message))
    assert (warning.filename, warning.lineno) == (__file__, line)


# ------------------------------------------------------------------ 1: ControlNet editing


@pytest.mark.parametrize("method", ["edit", "invert"])
def test_the_controlnet_pipeline_refuses_to_edit_instead_of_ignoring_the_controlnet(flax_controlnet_pipeline, method):
    pipeline, params = flax_controlnet_pipeline
    args = {"edit": ("on a sofa", make_image(0), "dog", "dog", "cat"), "invert": (make_image(5), "a cat")}[method]
    with pytest.raises(NotImplementedError, match=rf"{method}: ControlNet-guided editing is not supported.*FlaxBlipDiffusionPipeline"):
        getattr(pipeline, method)(*args, params=params, height=16, width=16)


# ------------------------------------------------------------------ 6: FloatingPointError in the CLI


@pytest.mark.slow
def test_cli_non_finite_values_are_one_line_and_exit_2(generate, tmp_path, capsys):
    code = main(generate("--guidance", "1e38", "--steps", "2", "--height", "16", "--width", "16", "--no-compile-cache",
                         "--out", str(tmp_path / "out.png")))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    err = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "denoising:" not in line]  # not the bar
    assert len(err) == 1 and err[0].startswith("blipdiff-jax: error: non-finite latents after denoising step")
    step = int(err[0].split("step ")[1].split(" of ")[0])
    assert 1 <= step <= 2 and " of 2 " in err[0]


# ------------------------------------------------------------------ 8: outputs checked before any work


@pytest.fixture
def no_work(monkeypatch):
    """The CLI fails loudly if it starts loading its model."""
    import blipdiff_jax.cli

    def started(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(blipdiff_jax.cli, "_load", started)


@pytest.mark.parametrize("case,message", [
    ("directory", r"--out: .* is a directory; give an image file name such as out.png"),
    ("extension", r"--out: '.*out\.txt' does not end in an image extension"),
    ("parent_file", r"--out: .*blocker is a file, not a folder"),
    ("output_dir_file", r"--output-dir: .*blocker is a file, not a folder"),
])
def test_cli_output_paths_are_checked_before_any_work(generate, tmp_path, capsys, no_work, case, message):
    (tmp_path / "blocker").write_text("a file")
    out = {"directory": tmp_path, "extension": tmp_path / "out.txt", "parent_file": tmp_path / "blocker" / "out.png"}
    args = generate("--out", str(out.get(case, tmp_path / "out.png")))
    if case == "output_dir_file":
        args += ["--output-dir", str(tmp_path / "blocker" / "each")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    import re

    assert re.search(message, err[0]), err[0]


def test_convert_checks_the_target_before_reading_and_names_overwrite(torch_pipeline_dir, tmp_path, monkeypatch, capsys):
    import convert.pytorch_dir
    from convert.__main__ import main as convert_main

    def read(*args, **kwargs):
        raise AssertionError("read before the target was checked")

    monkeypatch.setattr(convert.pytorch_dir, "read_pytorch_directory", read)
    (tmp_path / "taken").mkdir()
    assert convert_main([torch_pipeline_dir, str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'taken'} already exists; choose a new path or pass --overwrite"
    (tmp_path / "file").write_text("x")
    assert convert_main([torch_pipeline_dir, str(tmp_path / "file" / "out")]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------ 10: the CLI names its own flags


def test_cli_control_image_without_a_controlnet_names_the_flag(torch_pipeline_dir, tmp_path, capsys):
    make_image(0).save(tmp_path / "ref.png")
    code = main(["generate", "--model", torch_pipeline_dir, "--image", str(tmp_path / "ref.png"), "--subject", "dog",
                 "--control-image", str(tmp_path / "ref.png"), "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("blipdiff-jax: error: --control-image: --model has no controlnet/ folder; add an SD 1.5 ControlNet "
                   "with --controlnet PATH")


# ------------------------------------------------------------------ 9: a fine-tuned subject from the CLI


def test_generate_a_fine_tuned_subject_without_image(converted_model, flax_pipeline, tmp_path, capsys):
    import dataclasses

    pipeline, params = flax_pipeline
    learned = np.asarray(pipeline.encode_subject(make_image(9), "dog", params)) * 1.5
    model_dir = save_converted(dataclasses.replace(converted_model, subject_embeddings=learned), str(tmp_path / "tuned"))
    out = tmp_path / "out.png"
    assert main(["generate", "--model", model_dir, "--subject", "dog", "--prompt", "on the moon", "--steps", "2",
                 "--height", "16", "--width", "16", "--seed", "5", "--out", str(out), "--no-compile-cache"]) == 0
    expected = pipeline("on the moon", None, None, "dog", params=params, subject_embeddings=learned,
                        prng_seed=jax.random.PRNGKey(5), height=16, width=16, num_inference_steps=2).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    # Without learned embeddings --image is still required, said before loading.
    plain = save_converted(converted_model, str(tmp_path / "plain"))
    capsys.readouterr()
    assert main(["generate", "--model", plain, "--subject", "dog", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("blipdiff-jax: error: --image: required (--model holds no learned subject "
                                               "embeddings: only a fine-tuned model can go without it)")


# ------------------------------------------------------------------ 14: metadata; --output-dir never overwrites


@pytest.mark.slow
def test_metadata_holds_the_settings_used_and_output_dir_never_overwrites(generate, tmp_path):
    folder = tmp_path / "each"
    run = generate("--steps", "2", "--height", "16", "--width", "32", "--seed", "7", "--output-dir", str(folder),
                   "--target-subject", "cat", "--no-compile-cache")
    assert main(run + ["--out", str(tmp_path / "first.png")]) == 0
    text = Image.open(tmp_path / "first.png").text
    assert {k: text[k] for k in ("steps", "height", "width", "subject", "target_subject", "seed")} == {
        "steps": "2", "height": "16", "width": "32", "subject": "dog", "target_subject": "cat", "seed": "7"}
    first = np.asarray(Image.open(folder / "7-000.png"))
    # The same seed again, into the same folder, and --out as a JPEG: nothing overwritten, metadata in EXIF.
    (folder / "7-000.png").touch()
    os.utime(folder / "7-000.png", (0, 0))
    assert main(run + ["--out", str(tmp_path / "second.jpg"), "--prompt", "on the moon"]) == 0
    assert sorted(os.listdir(folder)) == ["7-000-1.png", "7-000.png"]
    assert os.stat(folder / "7-000.png").st_mtime == 0
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "7-000.png")), first)
    assert Image.open(folder / "7-000-1.png").text["prompt"] == "on the moon"
    exif = json.loads(Image.open(tmp_path / "second.jpg").getexif()[0x010E])
    assert exif["prompt"] == "on the moon" and exif["steps"] == 2 and exif["width"] == 32


@pytest.mark.slow
def test_default_steps_are_stored_not_none(generate, tmp_path):
    out = tmp_path / "out.png"
    assert main(generate("--height", "16", "--width", "16", "--out", str(out), "--no-compile-cache")) == 0
    assert Image.open(out).text["steps"] == "50"


# ------------------------------------------------------------------ 12: Ctrl-C in finetune


def test_ctrl_c_in_finetune_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """The interrupted trainer leaves its log and checkpoints in OUT (test_finetune.py proves the resume)."""
    import blipdiff_jax.training.cli as training_cli

    out = tmp_path / "out"

    def interrupted(args):
        os.makedirs(out / "checkpoints" / "2")
        with open(out / "loss.jsonl", "w") as log:
            for step in (1, 2, 3):
                log.write(json.dumps({"step": step, "loss": 0.5}) + "\n")
            log.write('{"step": 4, "lo')  # cut by the interrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(training_cli, "run_finetune", interrupted)
    try:
        code = main(["finetune", "--model", str(tmp_path), "--images", str(tmp_path), "--subject", "dog", "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the CLI")
    assert code == 130
    assert capsys.readouterr().err.strip() == ("blipdiff-jax: stopped at step 3; resume with --resume "
                                               "(latest checkpoint: step 2)")


# ------------------------------------------------------------------ 5: the converted directory's permissions


def test_converted_directory_has_the_umask_permissions(converted_model, tmp_path):
    previous = os.umask(0o022)
    try:
        out = save_converted(converted_model, str(tmp_path / "model"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for root, folders, files in os.walk(out):
        for name in folders:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) & 0o005 == 0o005, name
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) & 0o004, name


# ------------------------------------------------------------------ 16: convert takes Hub ids


def test_convert_takes_a_hub_id(torch_pipeline_dir, tmp_path, monkeypatch, capsys):
    from blipdiff_jax import hub
    from blipdiff_jax.checkpoint import load_converted
    from convert.__main__ import main as convert_main

    monkeypatch.setattr(hub, "_snapshot", lambda repo_id: torch_pipeline_dir if repo_id == "Salesforce/blipdiffusion" else None)
    assert convert_main(["Salesforce/blipdiffusion", str(tmp_path / "flax")]) == 0
    assert sorted(load_converted(str(tmp_path / "flax")).params) == ["qformer", "text_encoder", "unet", "vae"]
    assert convert_main(["Salesforce/nothing-here", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the first conversion's progress bar
    assert err.startswith("error: Salesforce/nothing-here is no local directory, and as a Hub id it is not in the "
                          "Hugging Face cache") and "\n" not in err


# ------------------------------------------------------------------ 17: the license in pyproject.toml


def test_pyproject_license_is_an_spdx_expression_setuptools_takes_without_warning():
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    cwd = os.getcwd()
    os.chdir(ROOT)  # the readme is read relative to the project
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dist = apply_configuration(Distribution(), os.path.join(ROOT, "pyproject.toml"))
    finally:
        os.chdir(cwd)
    assert dist.metadata.license_expression == "Apache-2.0"
    assert not [w for w in caught if "license" in str(w.message)], [str(w.message)[:80] for w in caught]


# ------------------------------------------------------------------ 13: compiling is not the first step


@pytest.mark.slow
def test_the_progress_bar_clock_starts_when_the_program_runs(flax_pipeline, monkeypatch):
    import time

    import tqdm.auto

    pipeline, params = flax_pipeline
    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.created_at, self.reset_at = self._time(), None
            bars.append(self)

        def reset(self, total=None):
            super().reset(total)
            self.reset_at = self._time()

    compiled = []

    def listen(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compiled.append(time.time())

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _call(pipeline, params, height=16, width=24, num_inference_steps=3, progress=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    (bar,) = bars
    assert compiled, "the generation program was compiled in this call"
    assert bar.desc.startswith("denoising") and bar.n == 3
    assert bar.reset_at is not None and bar.reset_at >= max(compiled) > bar.created_at


@pytest.mark.slow
def test_cli_edit_shows_progress_bars_without_changing_the_edit(flax_pipeline, converted_model, tmp_path, capsys):
    pipeline, params = flax_pipeline
    model_dir = save_converted(converted_model, str(tmp_path / "model"))
    make_image(23, (50, 40)).save(tmp_path / "photo.png")
    make_image(24).save(tmp_path / "ref.png")
    out = tmp_path / "edit.png"
    assert main(["edit", "--model", model_dir, "--image", str(tmp_path / "photo.png"), "--reference", str(tmp_path / "ref.png"),
                 "--subject", "dog", "--original-subject", "cat", "--prompt", "on a sofa", "--out", str(out),
                 "--steps", "2", "--inversion-steps", "3", "--height", "16", "--width", "16", "--no-compile-cache"]) == 0
    err = capsys.readouterr().err
    assert "inverting: 100%" in err and "3/3" in err and "editing: 100%" in err and "2/2" in err
    expected = pipeline.edit("on a sofa", str(tmp_path / "ref.png"), "dog", "dog", "cat", image=str(tmp_path / "photo.png"),
                             params=params, num_inference_steps=2, num_inversion_steps=3, height=16, width=16).images
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.hstack([np.asarray(im) for im in expected]))
    text = Image.open(out).text
    assert (text["original_subject"], text["steps"], text["inversion_steps"]) == ("cat", "2", "3")


# ------------------------------------------------------------------ 2: the compile cache with the progress bar


@pytest.mark.slow
def test_a_second_cli_run_loads_the_generation_from_the_persistent_cache(generate, tmp_path):
    """The CLI always shows the progress bar; the generation's programs still go into the persistent cache,
    and a new process loads them from it (JAX logs each hit when compiles are logged)."""
    import re
    import subprocess
    import sys

    cache = tmp_path / "jax-cache"
    # Every program stored, however fast it compiles here (the CLI's default is 0.5 s).
    env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run(name):
        command = [sys.executable, "-m", "blipdiff_jax.cli", *generate("--steps", "2", "--height", "16", "--width", "16",
                   "--compile-cache", str(cache), "--out", str(tmp_path / name))]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    first = run("first.png")
    assert "because it uses host callbacks" not in first
    stored = {name.split("-")[0] for name in os.listdir(cache)}
    assert {"jit__generate_start", "jit__generate_steps", "jit__generate_finish"} <= stored, stored
    second = run("second.png")
    hits = set(re.findall(r"Persistent compilation cache hit for '(jit__generate\w*)'", second))
    assert hits == {"jit__generate_start", "jit__generate_steps", "jit__generate_finish"}
    assert {name.split("-")[0] for name in os.listdir(cache) if name.startswith("jit__generate")} == {
        name for name in stored if name.startswith("jit__generate")}  # nothing new was compiled for the generation
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "first.png")), np.asarray(Image.open(tmp_path / "second.png")))


@pytest.mark.slow
def test_edit_and_invert_with_progress_are_the_same_programs_split(flax_pipeline, capsys):
    """With progress=True, edit and invert run as cacheable programs (start, one step per call, decoding): the
    same numbers as the one-program run."""
    pipeline, params = flax_pipeline
    args = ("on a sofa", make_image(0), "dog", "dog", "cat")
    common = dict(params=params, prng_seed=jax.random.PRNGKey(2), height=16, width=16, num_inference_steps=3, output_type="np")
    plain = pipeline.edit(*args, **common).images
    shown = pipeline.edit(*args, progress=True, **common).images
    np.testing.assert_array_equal(shown, plain)
    assert "editing: 100%" in capsys.readouterr().err  # PNDM: 4 timesteps for 3 steps
    inverted = pipeline.invert(make_image(5), "a cat", params=params, num_inference_steps=3, height=16, width=16)
    shown = pipeline.invert(make_image(5), "a cat", params=params, num_inference_steps=3, height=16, width=16, progress=True)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(inverted))
    err = capsys.readouterr().err
    assert "inverting: 100%" in err and "3/3" in err


def test_finetune_skips_a_cut_off_jpeg_like_a_non_image_before_training(tmp_path):
    """Item 10: a truncated JPEG was found only mid-run (named reference_image); now it is skipped with a
    warning when the folder is listed, as a non-image file is."""
    import io
    import warnings

    from blipdiff_jax.training.data import list_images

    folder = tmp_path / "images"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    (folder / "good.jpg").write_bytes(buffer.getvalue())
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:-40])  # passes verify(), fails to decode
    (folder / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = list_images(str(folder), "--images")
    assert [os.path.basename(p) for p in paths] == ["good.jpg"]
    skipped = sorted(str(w.message).split("'")[1].rsplit("/", 1)[-1] for w in caught if "skipping" in str(w.message))
    assert skipped == ["cut.jpg", "notes.txt"]
