"""200 generations at the tiny size, varied shapes and batch sizes: no memory growth past warm-up."""

import os
import sys

import pytest
from support.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from soak import soak  # noqa: E402

GROWTH_LIMIT_MB = 64  # measured here: 16 MB over 196 calls (allocator and dispatch caches settling)


@pytest.mark.slow
def test_two_hundred_generations_do_not_grow_memory():
    result = soak(200, log=lambda r: print(r))
    assert result["generations"] == 200
    assert result["growth_mb"] < GROWTH_LIMIT_MB, result
