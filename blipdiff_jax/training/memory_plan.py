"""The memory plan of a compiled training step: XLA's memory analysis of the program each device runs,
against the device's memory, before the first step allocates anything.

    plan = MemoryPlan.of(jitted.lower(*abstract_args).compile(), mesh, budget_gib)
    print(plan.line()); plan.check("--device-memory-gib")

The per-device total is arguments + outputs + temporaries - what donation aliases (outputs written into
argument buffers); on GPU and TPU the device reports its own limit, on CPU (fake devices included) a budget
is given (`--device-memory-gib`), else nothing is checked.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


def device_limit(devices) -> int | None:
    """Bytes one device may allocate, as its runtime reports it (None where it does not: CPU)."""
    try:
        stats = devices[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: dict  # axis -> size
    arguments: int  # bytes per device
    outputs: int
    temporaries: int
    aliased: int
    limit: int | None  # bytes per device, None: unknown

    @classmethod
    def of(cls, compiled, mesh, budget_gib: float | None = None) -> "MemoryPlan":
        analysis = compiled.memory_analysis()
        limit = int(budget_gib * GIB) if budget_gib is not None else device_limit(mesh.devices.flat)
        return cls(dict(mesh.shape), analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                   analysis.temp_size_in_bytes, analysis.alias_size_in_bytes, limit)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def line(self) -> str:
        mesh = ",".join(f"{axis}={size}" for axis, size in self.mesh.items())
        limit = "no device limit known" if self.limit is None else f"of {self.limit / GIB:.2f} GiB"
        return (f"memory plan per device (mesh {mesh}): arguments {self.arguments / GIB:.2f} GiB, outputs "
                f"{self.outputs / GIB:.2f} GiB, temporaries {self.temporaries / GIB:.2f} GiB, aliased "
                f"{self.aliased / GIB:.2f} GiB; total {self.total / GIB:.2f} GiB {limit}")

    def check(self, name: str = "device memory") -> None:
        if not self.fits():
            raise ValueError(f"{name}: the step needs {self.total / GIB:.2f} GiB per device, more than the "
                             f"{self.limit / GIB:.2f} GiB available ({self.line()}); shard more (--mesh fsdp=...), "
                             f"use --remat, --grad-accum or a smaller --batch-size")

    def as_dict(self) -> dict:
        return {"mesh": self.mesh, **{k: round(getattr(self, k) / GIB, 3) for k in
                                      ("arguments", "outputs", "temporaries", "aliased", "total")},
                "limit": None if self.limit is None else round(self.limit / GIB, 3)}
