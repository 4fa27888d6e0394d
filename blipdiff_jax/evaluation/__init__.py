"""DreamBench evaluation (`blipdiff-jax evaluate`): the benchmark read as published (dreambench.py), jobs
seeded one by one and shared over processes (jobs.py), generation over every device and scoring with DINO,
CLIP-I and CLIP-T in JAX (runner.py, metrics.py), the tables (report.py). See docs/evaluation.md."""

from .dreambench import DreamBench, load_dreambench
from .runner import EvaluationSettings, evaluate

__all__ = ["DreamBench", "EvaluationSettings", "evaluate", "load_dreambench"]
