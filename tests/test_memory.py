"""Loading returns the read buffers' freed memory to the OS (blipdiff_jax.checkpoint.release_freed_memory)."""

import os
import subprocess
import sys

import pytest

from blipdiff_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FRAGMENTED_HEAP = """
import os
from blipdiff_jax.checkpoint import release_freed_memory

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
    if not checkpoint.release_freed_memory():
        pytest.skip("no glibc malloc_trim on this platform: nothing to release")
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    released = int(done.stdout.split()[-1])
    assert released > 150 * 2**20, f"released only {released / 2**20:.0f} MB of ~235 MB freed"


def test_loading_a_converted_directory_releases_freed_memory(converted_model, tmp_path, monkeypatch):
    directory = checkpoint.save_converted(converted_model, str(tmp_path / "flax"))
    calls = []
    monkeypatch.setattr(checkpoint, "release_freed_memory", lambda: calls.append(1) or True)
    checkpoint.load_converted(directory)
    assert calls == [1]
