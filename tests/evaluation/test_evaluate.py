"""`evaluate` end to end on the tiny model and a tiny DreamBench (2 subjects x 2 prompts x 2 images, 16x16,
2 steps): one device, 4 fake devices and 2 processes make the same images and scores; a stopped run resumes
without regenerating; OUT holds config.json, results.json and the table."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from support.metric_models import converted_metric_model, make_dreambench
from support.paths import ROOT

from blipdiff_jax.cli import main
from blipdiff_jax.evaluation import EvaluationSettings, evaluate
from blipdiff_jax.evaluation.metrics import load_metric_model

SIZE = dict(images_per_prompt=2, steps=2, height=16, width=16)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evaluate"))
    _, clip_dir = converted_metric_model("clip", root, seed=1)
    _, dino_dir = converted_metric_model("dino", root, seed=2)
    return {"root": root, "dreambench": make_dreambench(os.path.join(root, "dreambench")), "clip_dir": clip_dir,
            "dino_dir": dino_dir, "clip": load_metric_model(clip_dir, "clip"), "dino": load_metric_model(dino_dir, "dino")}


def _run(bench, out, pipeline, params, **settings):
    settings = EvaluationSettings(model="tiny", dreambench=bench["dreambench"], out=out, progress=False,
                                  **{**SIZE, **settings})
    return evaluate(settings, pipeline=pipeline, params=params, dino=bench["dino"], clip=bench["clip"], log=lambda m: None)


@pytest.fixture(scope="module")
def one_device(bench, flax_pipeline):
    pipeline, params = flax_pipeline
    out = os.path.join(bench["root"], "one-device")
    return out, _run(bench, out, pipeline, params, devices=1, real_images=True)


def _images(out):
    folder = os.path.join(out, "images")
    return {f"{s}/{name}": np.asarray(Image.open(os.path.join(folder, s, name)))
            for s in sorted(os.listdir(folder)) for name in sorted(os.listdir(os.path.join(folder, s)))}


def _scores(results):
    return np.array([[row["dino"], row["clip_i"], row["clip_t"]] for row in results["images"]])


def test_runs_end_to_end_and_writes_config_results_and_table(one_device):
    out, results = one_device
    images = _images(out)
    assert sorted(images) == ["dog/00-0.png", "dog/00-1.png", "dog/01-0.png", "dog/01-1.png",
                              "teapot/00-0.png", "teapot/00-1.png", "teapot/01-0.png", "teapot/01-1.png"]
    assert all(image.shape == (16, 16, 3) for image in images.values())
    assert np.abs(images["dog/00-0.png"].astype(int) - images["dog/00-1.png"]).max() > 10  # each image its own noise
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["prompt_template"] == "a {class} {prompt}" and config["steps"] == 2 and config["seed"] == 0
    assert config["references"] == {"dog": ["dog/00.png"], "teapot": ["teapot/00.png"]}
    assert config["prompts"]["teapot"][1] == {"template": "a red {0} {1}", "target": "red teapot", "prompt": "",
                                              "text": "a red teapot"}
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["overall"] == results["overall"] and saved["overall"]["images"] == 8
    scores = _scores(results)
    assert np.all(np.abs(scores) <= 1) and np.ptp(scores, axis=0).min() > 0
    np.testing.assert_allclose([results["overall"][m] for m in ("dino", "clip_i", "clip_t")], scores.mean(axis=0), atol=1e-7)
    dog = scores[:4].mean(axis=0)
    np.testing.assert_allclose([results["subjects"]["dog"][m] for m in ("dino", "clip_i", "clip_t")], dog, atol=1e-7)
    assert results["prompts"]["a red {class}"]["images"] == 2 and results["real_images"]["images"] == 5
    table = open(os.path.join(out, "results.md")).read()
    assert "| BLIP-Diffusion zero-shot (paper) | 0.594 | 0.779 | 0.300 | |" in table
    assert f"| {results['overall']['dino']:.3f} | {results['overall']['clip_i']:.3f} |" in table


def test_four_devices_make_the_same_images_and_scores(bench, flax_pipeline, one_device):
    if jax.local_device_count() < 4:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax starts")
    pipeline, params = flax_pipeline
    out = os.path.join(bench["root"], "four-devices")
    results = _run(bench, out, pipeline, params, devices=4)
    reference = _images(one_device[0])
    for name, image in _images(out).items():
        np.testing.assert_array_equal(image, reference[name], err_msg=name)
    np.testing.assert_allclose(_scores(results), _scores(one_device[1]), rtol=0, atol=1e-6)


class _Stopping:
    """The pipeline, stopped (KeyboardInterrupt) at call `stop_at`; counts the images it was asked for."""

    def __init__(self, pipeline, stop_at=None):
        self.pipeline, self.stop_at, self.calls, self.images = pipeline, stop_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, prompts, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(prompts)
        return self.pipeline(prompts, *args, **kwargs)


def test_a_stopped_run_resumes_without_regenerating(bench, flax_pipeline, one_device):
    pipeline, params = flax_pipeline
    out = os.path.join(bench["root"], "stopped")
    stopping = _Stopping(pipeline, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        _run(bench, out, stopping, params, devices=1)
    made = _images(out)
    assert len(made) == 3 and not any(name.endswith(".tmp") for name in os.listdir(os.path.join(out, "images", "dog")))
    times = {name: os.stat(os.path.join(out, "images", name)).st_mtime_ns for name in made}
    resumed = _Stopping(pipeline)
    results = _run(bench, out, resumed, params, devices=1)
    assert resumed.images == 5
    assert all(os.stat(os.path.join(out, "images", name)).st_mtime_ns == t for name, t in times.items())
    reference = _images(one_device[0])
    for name, image in _images(out).items():
        np.testing.assert_array_equal(image, reference[name], err_msg=name)
    np.testing.assert_allclose(_scores(results), _scores(one_device[1]), rtol=0, atol=1e-6)
    # Done: a third run generates nothing (and does not need the pipeline); other scoring settings rescore.
    again = _run(bench, out, None, None, devices=1, real_images=True)
    assert again["overall"] == one_device[1]["overall"] and again["real_images"] == one_device[1]["real_images"]


def test_finetuned_models_give_their_params_and_learned_subjects(bench, flax_pipeline, converted_model, one_device):
    """--finetuned ft/{subject}: each subject's images come from its own model's params and learned subject
    embeddings, as the pipeline makes them from those (the same job noise)."""
    import dataclasses

    from blipdiff_jax.checkpoint import save_converted
    from blipdiff_jax.evaluation.dreambench import load_dreambench
    from blipdiff_jax.evaluation.jobs import job_latents, make_jobs

    pipeline, params = flax_pipeline
    rng = np.random.RandomState(0)
    tuned = {}
    for i, subject in enumerate(("dog", "teapot")):
        unet = jax.tree_util.tree_map(lambda x: np.asarray(x) * (1 + 0.1 * (i + 1)), converted_model.params["unet"])
        learned = rng.standard_normal((1, pipeline.num_query_tokens, 32)).astype(np.float32)
        model = dataclasses.replace(converted_model, params={**converted_model.params, "unet": unet}, subject_embeddings=learned)
        save_converted(model, os.path.join(bench["root"], "ft", subject))
        tuned[subject] = ({**params, "unet": unet}, learned)
    out = os.path.join(bench["root"], "finetuned")
    results = _run(bench, out, pipeline, params, devices=1, finetuned=os.path.join(bench["root"], "ft", "{subject}"))
    images, zero_shot = _images(out), _images(one_device[0])
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))  # the program the runs compiled
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for job in make_jobs(load_dreambench(bench["dreambench"]), 2):
        subject_params, learned = tuned[job.subject.name]
        expected = pipeline([job.prompt.prompt], None, None, [job.prompt.target],
                            params=jax.device_put(subject_params, replicated),
                            subject_embeddings=learned, latents=job_latents(0, [job], (4, 8, 8)), height=16, width=16,
                            num_inference_steps=2, output_type="np", mesh=mesh).images[0]
        name = os.path.relpath(job.path(out), os.path.join(out, "images"))
        np.testing.assert_array_equal(images[name], np.round(np.clip(expected, 0, 1) * 255).astype(np.uint8), err_msg=name)
        assert np.abs(images[name].astype(int) - zero_shot[name]).max() > 10
    assert json.load(open(os.path.join(out, "config.json")))["finetuned"].endswith("{subject}")
    assert "fine-tuned" in open(os.path.join(out, "results.md")).read() and results["overall"]["images"] == 8


def test_a_run_into_an_out_made_with_other_settings_is_refused(bench, one_device):
    copy = os.path.join(bench["root"], "other-settings")
    shutil.copytree(one_device[0], copy)
    with pytest.raises(ValueError, match="--out: .* made with steps=2, not 3"):
        _run(bench, copy, None, None, steps=3)


def test_cli_rescores_a_finished_run_and_prints_the_table(bench, one_device, capsys):
    """`blipdiff-jax evaluate` into a finished OUT: nothing to generate (--model is not even loaded), the metric
    models read from their converted folders, the same scores, the table and the CLIP backbone printed."""
    out = os.path.join(bench["root"], "cli")
    shutil.copytree(one_device[0], out)
    os.remove(os.path.join(out, "results.json"))
    code = main(["evaluate", "--model", "tiny", "--dreambench", bench["dreambench"], "--out", out, "--clip", bench["clip_dir"],
                 "--dino", bench["dino_dir"], "--images-per-prompt", "2", "--steps", "2", "--height", "16", "--width", "16",
                 "--devices", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "8 of 8 images, 8 already in" in printed and "| BLIP-Diffusion fine-tuned (paper) | 0.670 | 0.805 | 0.302 | |" in printed
    assert f"CLIP backbone: {bench['clip_dir']}" in printed
    np.testing.assert_allclose(_scores(json.load(open(os.path.join(out, "results.json")))), _scores(one_device[1]), atol=1e-6)


def test_cli_errors_name_the_flag(bench, tmp_path, capsys):
    args = ["evaluate", "--model", "tiny", "--out", str(tmp_path / "out")]
    assert main(args + ["--dreambench", str(tmp_path / "missing")]) == 2
    assert "--dreambench: no folder" in capsys.readouterr().err
    assert main(args + ["--dreambench", bench["dreambench"], "--finetuned", "ft/dog"]) == 2
    assert "--finetuned: 'ft/dog' must contain {subject}" in capsys.readouterr().err
    assert main(args + ["--dreambench", bench["dreambench"], "--images-per-prompt", "0"]) == 2
    assert "--images-per-prompt=0 must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_make_the_same_images_and_scores(bench, converted_model, one_device, tmp_path):
    """`blipdiff-jax evaluate` in two JAX processes (jax.distributed on localhost, one CPU device each): each
    writes its share, process 0 gathers the scores."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from multiprocess import cpu_collectives_available, free_port, worker_env

    if not cpu_collectives_available():
        pytest.skip("this jaxlib has no CPU collectives (gloo)")
    from blipdiff_jax.checkpoint import save_converted

    model = save_converted(converted_model, str(tmp_path / "model"))
    out, port = str(tmp_path / "two-processes"), free_port()
    args = ["evaluate", "--model", model, "--dreambench", bench["dreambench"], "--out", out, "--clip", bench["clip_dir"],
            "--dino", bench["dino_dir"], "--images-per-prompt", "2", "--steps", "2", "--height", "16", "--width", "16",
            "--real-images", "--quiet", "--coordinator-address", f"localhost:{port}", "--num-processes", "2"]
    workers = [subprocess.Popen([sys.executable, "-m", "blipdiff_jax.cli", *args, "--process-id", str(i)], cwd=ROOT,
                                env=worker_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "process 1/2: 4 of 8 images" in logs[1] and "| BLIP-Diffusion zero-shot (paper)" in logs[0]
    reference = _images(one_device[0])
    for name, image in _images(out).items():
        np.testing.assert_array_equal(image, reference[name], err_msg=name)
    results = json.load(open(os.path.join(out, "results.json")))
    np.testing.assert_allclose(_scores(results), _scores(one_device[1]), rtol=0, atol=1e-6)
    assert results["real_images"] == pytest.approx(one_device[1]["real_images"])
