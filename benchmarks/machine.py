"""What CPU a benchmark ran on. The benchmarks run on different 2-core machines (an AMD EPYC with AVX2, an
Intel Xeon with AVX-512 and AMX), and the ratios depend on which: every table names it."""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """e.g. "Intel(R) Xeon(R) Processor, 2 cores, AVX-512, AMX" (Linux: from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    isa = isa or (["AVX2"] if "avx2" in flags else [])
    return ", ".join([model, f"{os.cpu_count()} cores", *isa])
