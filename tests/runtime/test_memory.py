"""Loading returns freed memory to the OS (blipdiff_jax.host_memory), once the application turned the tuning on."""

import os
import subprocess
import sys

import pytest
from support.paths import ROOT

from blipdiff_jax import checkpoint, host_memory

pytestmark = pytest.mark.cpu_only  # the host allocator (glibc), tuned around CPU compiles

FRAGMENTED_HEAP = """
import os
from blipdiff_jax.host_memory import release_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [bytes(4000) for _ in range(60000)]  # 240 MB through malloc: over pymalloc's sizes, under mmap's
pinned = blocks[::100]  # live blocks all along the heap, so free() alone cannot shrink it
del blocks
before = rss()
assert release_freed_memory()
print(before - rss())
"""


def test_freed_heap_memory_goes_back_to_the_os():
    if not host_memory.release_freed_memory():
        pytest.skip("no glibc malloc_trim on this platform: nothing to release")
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    released = int(done.stdout.split()[-1])
    assert released > 150 * 2**20, f"released only {released / 2**20:.0f} MB of ~235 MB freed"


@pytest.fixture
def tuned(monkeypatch):
    """`tune_host_memory()` for one test, undone after it."""
    monkeypatch.delenv(host_memory.OPT_OUT_ENV, raising=False)
    monkeypatch.setitem(host_memory._tuning, "on", True)


def test_loading_a_converted_directory_releases_freed_memory(converted_model, tmp_path, monkeypatch, tuned):
    directory = checkpoint.save_converted(converted_model, str(tmp_path / "flax"))
    calls = []
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: calls.append("trim") or True)
    monkeypatch.setattr(host_memory, "return_large_blocks_to_os",
                        lambda threshold=host_memory.MMAP_THRESHOLD: calls.append(threshold) or True)
    monkeypatch.setattr(host_memory, "keep_freed_scratch", lambda keep: calls.append(("keep", keep)) or True)
    monkeypatch.setattr(checkpoint, "_restore_params", lambda *args: calls.append("read") or converted_model.params)
    checkpoint.load_converted(directory)
    # Pinned low for the reads, raised for what follows (generation), then the heap trimmed.
    assert calls == [128 * 1024, "read", 32 * 2**20, ("keep", True), "trim"]


def test_loading_leaves_the_heap_alone_until_tuning_is_asked_for(converted_model, tmp_path, monkeypatch):
    monkeypatch.setitem(host_memory._tuning, "on", False)  # as never asked (the CLI, run in-process by other tests, asks)
    directory = checkpoint.save_converted(converted_model, str(tmp_path / "flax"))
    calls = []
    monkeypatch.setattr(host_memory, "_glibc", lambda: calls.append("glibc"))
    checkpoint.load_converted(directory)
    assert calls == [] and not host_memory.host_memory_tuned()


def test_tuning_is_refused_when_opted_out(monkeypatch):
    monkeypatch.setitem(host_memory._tuning, "on", False)
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert host_memory.tune_host_memory() is False and not host_memory.host_memory_tuned()


# One process per case: the threshold is process-wide. A freed 16 MiB block makes glibc raise its mmap
# threshold past 1 MiB; 1 MiB blocks then come from the heap, and with every 20th kept alive, freeing the
# others returns nothing to the OS unless the threshold was pinned first.
LARGE_BLOCKS = """
import os, sys
from blipdiff_jax.host_memory import return_large_blocks_to_os

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

pinned = return_large_blocks_to_os() if sys.argv[1] == "pin" else False
big = bytearray(16 << 20)
del big
before = rss()
blocks = [bytearray(1 << 20) for _ in range(200)]
kept = blocks[::20]
del blocks
print(pinned, rss() - before)
"""


def _large_blocks_retained(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", host_memory.OPT_OUT_ENV)}
    done = subprocess.run([sys.executable, "-c", LARGE_BLOCKS, mode], capture_output=True, text=True, cwd=ROOT,
                          env=dict(env, PYTHONPATH=ROOT), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    pinned, retained = done.stdout.split()[-2:]
    return pinned, int(retained)


def test_pinned_mmap_threshold_returns_freed_large_blocks():
    if host_memory._glibc() is None:
        pytest.skip("not glibc: its mmap threshold does not exist here")
    default_pinned, default_retained = _large_blocks_retained("default")
    pinned, retained = _large_blocks_retained("pin")
    assert (default_pinned, pinned) == ("False", "True")
    # 180 MiB freed: glibc's default keeps it, the pinned threshold gives it back (10 MiB stay alive).
    assert default_retained > 150 * 2**20, f"control: glibc kept only {default_retained / 2**20:.0f} MiB"
    assert retained < 40 * 2**20, f"kept {retained / 2**20:.0f} MiB of 180 MiB freed"


def test_the_threshold_is_left_alone_when_asked(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert host_memory.return_large_blocks_to_os() is False
    monkeypatch.delenv(host_memory.OPT_OUT_ENV)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # glibc's own tunable: the user's choice
    assert host_memory.return_large_blocks_to_os() is False
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threshold"):
            host_memory.return_large_blocks_to_os(bad)


# A 12 MiB block comes from the heap once the mmap threshold is 32 MiB; freed at the top of the heap, glibc
# keeps it with the running trim threshold (16 MiB) and hands it back with the compiling one (128 KiB).
SCRATCH = """
import os, sys
from blipdiff_jax.host_memory import keep_freed_scratch, return_large_blocks_to_os

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

return_large_blocks_to_os(32 << 20)
set_ = keep_freed_scratch(sys.argv[1] == "keep")
before = rss()
block = bytearray(12 << 20)
del block
print(set_, rss() - before)
"""


def test_scratch_is_kept_while_running_and_returned_while_compiling(monkeypatch):
    if host_memory._glibc() is None:
        pytest.skip("not glibc: its trim threshold does not exist here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != host_memory.OPT_OUT_ENV}
    kept = {}
    for mode in ("keep", "return"):
        done = subprocess.run([sys.executable, "-c", SCRATCH, mode], capture_output=True, text=True, cwd=ROOT,
                              env=dict(env, PYTHONPATH=ROOT), timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        was_set, kept[mode] = done.stdout.split()[-2:]
        assert was_set == "True"
    assert int(kept["keep"]) > 10 * 2**20, f"kept only {int(kept['keep']) / 2**20:.1f} MiB of a freed 12 MiB block"
    assert int(kept["return"]) < 2 * 2**20, f"kept {int(kept['return']) / 2**20:.1f} MiB of a freed 12 MiB block"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # glibc's own tunable: the user's choice
    assert host_memory.keep_freed_scratch(True) is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert host_memory.keep_freed_scratch(True) is False


def test_compiling_inside_the_scope_releases_freed_memory(monkeypatch, tuned):
    """JAX still reports each compile (the event host_memory listens for), and only inside the scope does
    the heap get trimmed, before the program runs; outside it no listener of ours is registered."""
    import jax
    import jax.numpy as jnp

    if host_memory._glibc() is None:
        pytest.skip("no glibc malloc_trim on this platform: nothing to release")
    calls = []
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: calls.append("trim") or True)
    monkeypatch.setattr(host_memory, "keep_freed_scratch", lambda keep: calls.append(("keep", keep)) or True)
    ran = []

    def program(x):
        jax.debug.callback(lambda: ran.append(len(calls)))  # how many calls had happened when it ran
        return x * 2

    scoped = host_memory.trimmed_after_compiling(jax.jit(program))
    assert float(scoped(jnp.float32(1.5))) == 3.0
    # lowered: freed blocks go back while XLA compiles; compiled: trimmed, scratch kept; then run
    assert calls == [("keep", False), "trim", ("keep", True)] and ran == [3]
    scoped(jnp.float32(2.0))
    assert len(calls) == 3  # no compile, no trim
    jax.jit(lambda x: x + 1)(jnp.float32(1.0))  # compiled outside the scope
    assert len(calls) == 3
    assert scoped._cache_size() == 1  # the jitted function's own attributes
    assert not host_memory.listening_to_compiles()


def test_compiles_are_not_listened_to_without_tuning(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.setitem(host_memory._tuning, "on", False)
    heard = []
    monkeypatch.setattr(host_memory, "_after_compile", lambda *args, **kwargs: heard.append(args))
    host_memory.trimmed_after_compiling(jax.jit(lambda x: x * 5))(jnp.float32(1.0))
    assert heard == [] and not host_memory.listening_to_compiles()


def test_compile_trimming_is_left_alone_when_asked(monkeypatch, tuned):
    import jax
    import jax.numpy as jnp

    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    calls = []
    monkeypatch.setattr(host_memory, "release_freed_memory", lambda: calls.append("trim") or True)
    host_memory.trimmed_after_compiling(jax.jit(lambda x: x - 3))(jnp.float32(1.0))
    assert calls == []


def test_pipeline_programs_trim_after_compiling(flax_pipeline):
    pipeline, _ = flax_pipeline
    assert isinstance(pipeline._generate_jit, host_memory.trimmed_after_compiling)
    assert isinstance(pipeline._generate_pmap, host_memory.trimmed_after_compiling)
    assert isinstance(pipeline._encode_subject, host_memory.trimmed_after_compiling)
