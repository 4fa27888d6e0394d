"""The benchmark's generation jobs: one per (subject, prompt, image index), each with its own noise.

A job's starting latents come from `fold_in(PRNGKey(seed), job_hash)`, `job_hash` a CRC-32 of
"subject/prompt/image": an image depends on the seed and its job only, never on which batch, device or
process made it, so a run split any way (or stopped and resumed) makes the same images. Jobs are dealt to
processes round-robin in one fixed order, and a process skips the jobs whose image is already in OUT.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from .dreambench import DreamBench, Prompt, Subject

IMAGES_DIR = "images"


@dataclasses.dataclass(frozen=True)
class Job:
    index: int  # position in the benchmark's fixed job order
    subject: Subject
    prompt: Prompt
    image: int  # 0 .. images_per_prompt - 1

    @property
    def name(self) -> str:
        return f"{self.subject.name}/{self.prompt.index}/{self.image}"

    @property
    def hash(self) -> int:
        """A stable 31-bit hash of the job (CRC-32, the same on every machine and Python)."""
        return zlib.crc32(self.name.encode("utf-8")) & 0x7FFFFFFF

    def path(self, out: str) -> str:
        return os.path.join(out, IMAGES_DIR, self.subject.name, f"{self.prompt.index:02d}-{self.image}.png")


def make_jobs(bench: DreamBench, images_per_prompt: int) -> list[Job]:
    """Every job, subject by subject, prompt by prompt, image by image."""
    jobs = []
    for subject in bench.subjects:
        for prompt in subject.prompts:
            for image in range(images_per_prompt):
                jobs.append(Job(len(jobs), subject, prompt, image))
    return jobs


def process_share(jobs: list[Job], process_index: int, process_count: int) -> list[Job]:
    """The jobs of one process: every `process_count`-th, starting at its index (the same share on every run,
    so each process finds its own images again on a disk only it sees)."""
    return jobs[process_index::process_count]


def pending(jobs: list[Job], out: str) -> list[Job]:
    """The jobs whose image is not in `out` yet."""
    return [job for job in jobs if not os.path.isfile(job.path(out))]


def batches(jobs: list[Job], size: int, by_subject: bool = False) -> list[list[Job]]:
    """`jobs` in batches of `size` (the last one shorter); with `by_subject`, no batch mixes subjects (each
    subject has its own fine-tuned params)."""
    if not by_subject:
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.subject.name, []).append(job)
    return [batch for group in groups.values() for batch in batches(group, size)]


_latents_fns = {}


def job_latents(seed: int, jobs: list[Job], shape: tuple[int, int, int]) -> np.ndarray:
    """(len(jobs), *shape) float32 starting noise, job i's drawn from fold_in(PRNGKey(seed), jobs[i].hash)."""
    import jax

    fn = _latents_fns.get(shape)
    if fn is None:
        def draw(base, hashes):
            keys = jax.vmap(lambda h: jax.random.fold_in(base, h))(hashes)
            return jax.vmap(lambda key: jax.random.normal(key, shape, dtype=np.float32))(keys)

        fn = _latents_fns[shape] = jax.jit(draw)
    hashes = np.array([job.hash for job in jobs], dtype=np.uint32)
    return np.asarray(fn(jax.random.PRNGKey(seed), hashes))
