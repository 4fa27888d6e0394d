"""Two JAX processes on localhost (jax.distributed, CPU collectives over gloo), one global mesh of one CPU device
per process: the same images as one process. Runs benchmarks/multiprocess.py, the multi-host path of TPU pods."""

import os
import re
import sys

import pytest
from support.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import multiprocess  # noqa: E402
from multiprocess import cpu_collectives_available  # noqa: E402


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not cpu_collectives_available(), reason="this jaxlib has no CPU collectives (no gloo TCP collectives)")
def test_two_processes_match_one_process(capsys):
    # The driver runs here (its one-process generation too); its two workers are new processes with one CPU
    # device each (the script's default is 2 each, a mesh of 4), which keeps this under a minute on 2 cores.
    code = multiprocess.main(["--processes", "2", "--local-devices", "1", "--timeout", "240"])
    out, err = capsys.readouterr()
    print(out, err[-4000:])
    assert code == 0, err[-4000:]
    assert "global mesh of 2" in out
    assert re.search(r"max abs difference vs single process: \S+ \(atol 1e-05\): EQUAL", out), out
