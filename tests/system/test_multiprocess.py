"""Two JAX processes on localhost (jax.distributed, CPU collectives over gloo), one global mesh of one CPU device
per process: the same images as one process. Runs benchmarks/multiprocess.py, the multi-host path of TPU pods."""

import os
import re
import subprocess
import sys

import pytest
from support.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from multiprocess import cpu_collectives_available  # noqa: E402


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not cpu_collectives_available(), reason="this jaxlib has no CPU collectives (no gloo TCP collectives)")
def test_two_processes_match_one_process():
    env = dict(os.environ)
    # One CPU device per worker keeps this under a minute on 2 cores (the script's default is 2 each, a mesh
    # of 4); conftest's 4 fake devices are for this process.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=1").strip()
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "multiprocess.py"), "--processes", "2",
           "--local-devices", "1", "--timeout", "240"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global mesh of 2" in proc.stdout
    assert re.search(r"max abs difference vs single process: \S+ \(atol 1e-05\): EQUAL", proc.stdout), proc.stdout
