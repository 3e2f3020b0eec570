"""numba compilation for the mining kernels (b3.graph, b3.ranking).

Compiled code is cached on disk where numba finds a writable place: beside the module in
__pycache__, else ~/.cache/numba, or NUMBA_CACHE_DIR when set. With none (a read-only image
and a read-only home) numba refuses cache=True at import time ("no locator available"); the
kernels are then compiled in every process instead (a few seconds) rather than failing.

Parallel kernels run on numba's default threading layer, GNU OpenMP on Linux: the fork-safe
alternative (numba's workqueue) made ranking, whose heaps alternate with torch's matmul,
1.2-1.5x slower in bench/rank_vs_faiss.py. GNU OpenMP kills a forked child that runs a
parallel kernel after its parent ran one ("fork() called from a process already using GNU
OpenMP"), and multiprocessing forks by default on Linux: such a child runs a sequential twin
of each kernel instead (compiled there, not cached: the cache does not tell the two apart).
"""

from __future__ import annotations

import functools
import os

import numba

_parallel_ran = False  # this process has run a parallel kernel
_forked_after_parallel = False  # ... and is a forked child of one that had


def _after_fork_in_child() -> None:
    global _forked_after_parallel
    _forked_after_parallel = _forked_after_parallel or _parallel_ran


os.register_at_fork(after_in_child=_after_fork_in_child)


def _njit(function, options: dict, cache: bool = True):
    if cache:
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            pass
    return numba.njit(**options)(function)


def compiled(**options):
    """numba.njit(**options), cached where possible; with parallel=True, sequential in a
    forked child of a process that ran a parallel kernel."""

    def compile_(function):
        kernel = _njit(function, options)
        if not options.get("parallel"):
            return kernel
        sequential = _njit(function, {**options, "parallel": False}, cache=False)

        @functools.wraps(function)
        def run(*args):
            global _parallel_ran
            if _forked_after_parallel:
                return sequential(*args)
            _parallel_ran = True
            return kernel(*args)

        return run

    return compile_


def use_threads(threads: int) -> None:
    """Threads for the next parallel kernel; numba's pool holds at most one per core."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
