"""Importing blipdiff_jax, building a pipeline and generating leave the process as they found it: no glibc
setting, no `jax.monitoring` listener, flax's `Scope.param`, diffusers' UNet block classes and the
diffusers/transformers loggers unchanged; the patches we scope to our own tracing are restored, and the
third-party code they rely on is the pinned one."""

import json
import logging
import os
import subprocess
import sys

import pytest
from support.paths import ROOT

from blipdiff_jax.runtime import pinned
from blipdiff_jax.runtime.quiet import DropFlaxDeprecation, quiet_flax_notices
from blipdiff_jax.runtime.remat import UNET_BLOCKS, remat_unet_blocks

# Runs in a fresh process: what the process looks like before `import blipdiff_jax` and after a generation.
FRESH_PROCESS = r"""
import json, logging, sys, tempfile
import jax, numpy as np
from jax._src import monitoring
from flax.core.scope import Scope
from diffusers.models.unets import unet_2d_condition_flax as unet_module

BLOCKS = %(blocks)r

def library_filters():
    out = {}
    for name, log in sorted(logging.root.manager.loggerDict.items()):
        if isinstance(log, logging.Logger) and name.split(".")[0] in ("diffusers", "transformers"):
            targets = [log] + list(log.handlers)
            out[name] = [type(f).__name__ for t in targets for f in t.filters]
    return out

FIRST = set(library_filters())  # the libraries' own later imports add loggers (with their own filters)

def snapshot():
    filters = library_filters()
    return {"scope_param": id(Scope.param), "blocks": [id(getattr(unet_module, n)) for n in BLOCKS],
            "listeners": len(monitoring.get_event_duration_listeners()),
            "filters": {k: v for k, v in filters.items() if k in FIRST},
            "ours": sorted(k for k, v in filters.items() if "DropFlaxDeprecation" in v)}

before = snapshot()
print("OURS FROM HERE", file=sys.stderr, flush=True)  # importing diffusers' UNet above logged its own notices
# Every glibc call of ours goes through host_memory._glibc (imported first: only the standard library).
from blipdiff_jax import host_memory
glibc_calls = []
class RecordingLibc:
    def mallopt(self, *args):
        glibc_calls.append(["mallopt", *args]); return 1
    def malloc_trim(self, *args):
        glibc_calls.append(["malloc_trim", *args]); return 1
host_memory._glibc = lambda: RecordingLibc()

import blipdiff_jax
after_import = snapshot()
from blipdiff_jax import FlaxBlipDiffusionPipeline, checkpoint, tiny
with tempfile.TemporaryDirectory() as workdir:
    directory = checkpoint.save_converted(tiny.build_tiny_model(workdir), workdir + "/model")
    pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(directory)
    after_construction = snapshot()
    out = pipeline("a", tiny.demo_reference_image(), "dog", "dog", params=params, prng_seed=jax.random.PRNGKey(0),
                   height=64, width=64, num_inference_steps=2, output_type="np")
assert np.isfinite(out.images).all()
print("RESULT " + json.dumps({"before": before, "after_import": after_import, "after_construction": after_construction,
                              "after_generation": snapshot(), "glibc_calls": glibc_calls,
                              "tuned": host_memory.host_memory_tuned()}))
"""


@pytest.mark.slow
def test_importing_building_and_generating_change_nothing_process_wide():
    # a user's process: no tuning asked for, the CPU rewrites on (their patches are scoped too)
    env = {k: v for k, v in os.environ.items() if k not in ("BLIPDIFF_JAX_TUNE_MALLOC", "BLIPDIFF_JAX_CPU_REWRITES")}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS % {"blocks": UNET_BLOCKS}], capture_output=True,
                          text=True, cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ")[-1])
    assert result["glibc_calls"] == [] and result["tuned"] is False
    for moment in ("after_import", "after_construction", "after_generation"):
        assert result[moment] == result["before"], moment
    # and the libraries' notices were dropped while our code ran them
    assert "Flax classes are deprecated" not in done.stderr.split("OURS FROM HERE")[-1]


def test_patched_third_party_code_is_the_pinned_one():
    changed = pinned.changed_code()
    assert not changed, (f"{changed} changed in the installed flax/diffusers: check runtime/param_check.py and "
                         "runtime/remat.py against the new code, then update runtime/pinned.py")


def test_scope_param_is_flax_own_outside_our_tracing():
    from flax.core.scope import Scope

    from blipdiff_jax.runtime import param_check

    assert Scope.param is param_check._flax_param
    with param_check.fast_param_check():
        assert Scope.param is param_check._param
    assert Scope.param is param_check._flax_param


def test_remat_rebinds_the_unet_blocks_only_while_inside():
    from diffusers.models.unets import unet_2d_condition_flax as module

    original = {name: getattr(module, name) for name in UNET_BLOCKS}
    with pytest.raises(RuntimeError):
        with remat_unet_blocks():
            assert all(getattr(module, name) is not cls for name, cls in original.items())
            raise RuntimeError("restored on the way out")
    assert {name: getattr(module, name) for name in UNET_BLOCKS} == original


def test_notices_are_dropped_inside_the_scope_only():
    from diffusers.models import resnet_flax

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger(resnet_flax.__name__)
    log.addHandler(handler)
    try:
        with quiet_flax_notices():
            with quiet_flax_notices():  # re-entrant
                log.warning("Flax classes are deprecated and will be removed")
            log.warning("Flax classes are deprecated and will be removed")
            log.warning("something else")
        assert seen == ["something else"]
        log.warning("Flax classes are deprecated and will be removed")
        assert seen == ["something else", "Flax classes are deprecated and will be removed"]
    finally:
        log.removeHandler(handler)
    assert not any(isinstance(f, DropFlaxDeprecation) for f in log.filters)
