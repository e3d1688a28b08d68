"""Keep freed CPU memory for the next training step instead of faulting it in again.

A CPU training step frees and re-allocates the same large activations every micro-batch.
glibc's malloc hands blocks above its mmap threshold (at most 32 MB) back to the kernel at
once, and trims the top of its heap when more than M_TRIM_THRESHOLD is free there, so the
next step touches fresh pages and pays one page fault per 4 KB: on a 2-core virtual machine
a bf16 step of the small config took 40,000 faults, and train.py ran 1.1x to 1.4x faster
once they were gone (docs/benchmarks.md). Two process-wide settings remove them:

- glibc keeps what is freed (`mallopt`: mmap threshold at its 32 MB ceiling, trim threshold
  at the largest value mallopt takes), as a caching allocator would;
- PyTorch asks for transparent huge pages for its CPU buffers of 2 MB and more
  (`THP_MEM_ALLOC_ENABLE=1`, read by PyTorch at its first CPU allocation), so what is still
  faulted in comes 2 MB at a time.

Neither changes a number the model computes. Both are skipped where the user has chosen
(the environment names either setting, or preloads another allocator), off Linux and glibc,
and with --allocator system. This module imports nothing heavy: train.py's command line
calls it before torch is imported.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass, field

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the highest mmap threshold glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
THP_ENV = "THP_MEM_ALLOC_ENABLE"
# glibc reads these at a process's start: the same settings as mallopt, for another process
_MALLOPT_ENV = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
                M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_"}
# environment variables by which a user sets glibc's malloc up themselves
_GLIBC_ENV = (*_MALLOPT_ENV.values(), "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class AllocatorPlan:
    mallopt: tuple[tuple[int, int], ...] = ()  # (param, value) pairs for glibc's mallopt
    env: dict[str, str] = field(default_factory=dict)  # to set before torch allocates
    note: str = "system allocator"  # for train.py's first log line


def plan_allocator(choice: str, system: str, libc: str, environ) -> AllocatorPlan:
    """What --allocator `choice` does on this OS (`platform.system()`), C library
    (`platform.libc_ver()[0]`) and environment (pure)."""
    if choice == "system" or system != "Linux":
        return AllocatorPlan()
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return AllocatorPlan(note="system allocator (LD_PRELOAD sets another malloc)")
    user_glibc = (any(k in environ for k in _GLIBC_ENV)
                  or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))
    mallopt = ()
    if libc == "glibc" and not user_glibc:
        mallopt = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    env = {} if THP_ENV in environ else {THP_ENV: "1"}
    parts = (["freed memory kept (glibc mallopt)"] if mallopt else []) + (
        ["huge pages for tensors of 2 MB and more"] if env else [])
    return AllocatorPlan(mallopt, env, "; ".join(parts) or "system allocator (as set by "
                         "the environment)")


def plan_environment(plan: AllocatorPlan) -> dict[str, str]:
    """The environment that gives a process started with it what `plan` gives this one
    (pure): how the benchmark hands train.py's allocator settings to a peer trainer."""
    return {**{_MALLOPT_ENV[p]: str(v) for p, v in plan.mallopt}, **plan.env}


_applied = AllocatorPlan()


def tune_allocator(choice: str = "auto") -> AllocatorPlan:
    """Apply plan_allocator's plan to this process; the huge-page setting only acts if
    torch has not allocated CPU memory yet. Returns the plan (its note is logged)."""
    global _applied
    plan = plan_allocator(choice, platform.system(), platform.libc_ver()[0], os.environ)
    if plan.mallopt:
        libc = ctypes.CDLL(None)
        refused = [p for p, v in plan.mallopt if libc.mallopt(p, v) != 1]
        if refused:  # not worth failing a run for: say so and carry on with the rest
            print(f"chitchat: glibc refused mallopt({refused}); freed memory is returned to "
                  "the system as usual", file=sys.stderr)
            plan = AllocatorPlan((), plan.env, plan.note.replace(
                "freed memory kept (glibc mallopt)", "mallopt refused"))
    os.environ.update(plan.env)
    _applied = plan
    return plan


def applied() -> AllocatorPlan:
    """What tune_allocator did in this process (the system allocator if it did not run)."""
    return _applied
