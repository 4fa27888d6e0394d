"""DreamBench read as DreamBooth published it, the jobs' seeds and shares, and the tables (host side only)."""

import os

import numpy as np
import pytest
from support.metric_models import PROMPTS_AND_CLASSES, make_dreambench

from blipdiff_jax.evaluation import report
from blipdiff_jax.evaluation.dreambench import load_dreambench, parse_prompts_and_classes, split_template
from blipdiff_jax.evaluation.jobs import job_latents, make_jobs, pending, process_share

# Lines as DreamBooth's dataset/prompts_and_classes.txt writes them (its first and last prompts).
DREAMBOOTH_EXCERPT = """Classes

subject_name,class
backpack,backpack
bear_plushie,stuffed animal
dog8,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in a purple wizard outfit'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""


def test_prompts_and_classes_file_is_read_as_published():
    classes, lists = parse_prompts_and_classes(DREAMBOOTH_EXCERPT)
    assert classes == {"backpack": "backpack", "bear_plushie": "stuffed animal", "dog8": "dog"}
    assert lists["object"] == ["a {0} {1} in the jungle", "a cube shaped {0} {1}"]
    assert lists["live"][0] == "a {0} {1} in a purple wizard outfit"


def test_prompts_become_the_pipelines_target_and_prompt():
    """The pipeline writes "a {target} {prompt}": the benchmark's sentence without the unique token."""
    jungle = split_template("a {0} {1} in the jungle", "stuffed animal")
    assert (jungle.target, jungle.prompt, jungle.text) == ("stuffed animal", "in the jungle", "a stuffed animal in the jungle")
    cube = split_template("a cube shaped {0} {1}", "dog", index=24)
    assert (cube.target, cube.prompt, cube.text, cube.index) == ("cube shaped dog", "", "a cube shaped dog", 24)
    assert cube.key == "a cube shaped {class}"
    with pytest.raises(ValueError, match="start with 'a '"):
        split_template("the {0} {1} on a boat", "dog")


def test_subjects_get_their_list_and_photos(tmp_path):
    bench = load_dreambench(make_dreambench(str(tmp_path / "db")))
    dog, teapot = bench.subjects
    assert (dog.name, dog.live, teapot.live) == ("dog", True, False)
    assert [p.text for p in dog.prompts] == ["a dog in the snow", "a dog wearing a red hat"]
    assert [p.text for p in teapot.prompts] == ["a teapot in the jungle", "a red teapot"]
    assert [os.path.basename(p) for p in teapot.images] == ["00.png", "01.jpg", "02.png"]
    assert [s.name for s in load_dreambench(bench.root, subjects=["teapot"]).subjects] == ["teapot"]


def test_missing_files_and_classes_are_named(tmp_path):
    root = make_dreambench(str(tmp_path / "db"))
    with pytest.raises(ValueError, match="--subjects: cat"):
        load_dreambench(root, subjects=["dog", "cat"])
    os.makedirs(os.path.join(root, "vase"))
    with pytest.raises(ValueError, match="vase have no class"):
        load_dreambench(root)
    os.rmdir(os.path.join(root, "vase"))
    with open(os.path.join(root, "prompts_and_classes.txt"), "w") as f:
        f.write(PROMPTS_AND_CLASSES.replace("teapot,teapot", "teapot,"))
    with pytest.raises(ValueError, match="'teapot' has no class"):
        load_dreambench(root)
    os.remove(os.path.join(root, "prompts_and_classes.txt"))
    with pytest.raises(FileNotFoundError, match="no prompts_and_classes.txt"):
        load_dreambench(root)
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_dreambench(str(tmp_path / "nowhere"))


def test_a_jobs_noise_does_not_depend_on_its_batch_or_process(tmp_path):
    jobs = make_jobs(load_dreambench(make_dreambench(str(tmp_path / "db"))), images_per_prompt=3)
    assert len(jobs) == 2 * 2 * 3 and len({job.hash for job in jobs}) == len(jobs)
    together = job_latents(0, jobs, (4, 2, 2))
    alone = np.concatenate([job_latents(0, [job], (4, 2, 2)) for job in jobs[::-1]])[::-1]
    np.testing.assert_array_equal(together, alone)
    assert np.abs(together[0] - together[1]).max() > 0.1
    assert np.abs(job_latents(1, jobs[:1], (4, 2, 2)) - together[:1]).max() > 0.1  # another --seed
    shares = [process_share(jobs, i, 3) for i in range(3)]
    assert sorted(job.index for share in shares for job in share) == list(range(len(jobs)))
    out = str(tmp_path / "out")
    os.makedirs(os.path.dirname(jobs[4].path(out)))
    open(jobs[4].path(out), "wb").close()
    assert jobs[4] not in pending(jobs, out) and len(pending(jobs, out)) == len(jobs) - 1


def test_results_table_puts_the_papers_rows_beside_ours():
    rows = [{"subject": s, "prompt_key": k, "dino": d, "clip_i": i, "clip_t": t}
            for s, k, d, i, t in [("dog", "a {class}", 0.5, 0.7, 0.2), ("dog", "b {class}", 0.7, 0.9, 0.3),
                                  ("vase", "a {class}", 0.6, 0.8, 0.31)]]
    settings = {"model": "/models/blipdiffusion-flax", "steps": 50, "guidance": 7.5, "scheduler": "pndm",
                "images_per_prompt": 4, "reference": "first", "clip": "ViT-B-32", "dino": "facebook/dino-vits16"}
    results = report.summarise(rows, settings, {"dino": 0.77, "clip_i": 0.88, "clip_t": None, "images": 10})
    assert results["overall"] == pytest.approx({"dino": 0.6, "clip_i": 0.8, "clip_t": 0.27, "images": 3})
    assert results["subjects"]["dog"]["clip_t"] == pytest.approx(0.25)
    assert results["prompts"]["a {class}"]["images"] == 2
    table = report.markdown(results).splitlines()
    assert "| BLIP-Diffusion zero-shot (paper) | 0.594 | 0.779 | 0.300 | |" in table
    assert "| BLIP-Diffusion fine-tuned (paper) | 0.670 | 0.805 | 0.302 | |" in table
    assert "| ours: blipdiffusion-flax, zero-shot, 50 steps, guidance 7.5, pndm | 0.600 | 0.800 | 0.270 | 3 |" in table
    assert "| real images against each other (upper bound) | 0.770 | 0.880 | – | 10 |" in table
    assert "| vase | 0.600 | 0.800 | 0.310 | 1 |" in table
    assert "CLIP ViT-B-32" in table[0]


def test_scheduler_flag_builds_on_the_models_noise_schedule():
    from diffusers import FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler

    from blipdiff_jax import tiny
    from blipdiff_jax.evaluation.runner import EvaluationSettings, build_scheduler

    config = tiny.scheduler_config()
    assert build_scheduler("pndm", config) is None  # the model's own
    for name, cls in (("ddim", FlaxDDIMScheduler), ("dpm-solver", FlaxDPMSolverMultistepScheduler)):
        scheduler = build_scheduler(name, config)
        assert type(scheduler) is cls
        assert (scheduler.config.beta_end, scheduler.config.beta_schedule) == (0.012, "scaled_linear")
    with pytest.raises(ValueError, match="--scheduler: one of pndm, ddim, dpm-solver, euler, not 'ddpm'"):
        EvaluationSettings(model="m", dreambench="d", out="o", scheduler="ddpm").validate({"scheduler": "--scheduler"})
