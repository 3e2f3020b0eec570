"""numba compilation for the mining kernels (b3.graph, b3.ranking).

Compiled code is cached on disk where numba finds a writable place: beside the module in
__pycache__, else ~/.cache/numba, or NUMBA_CACHE_DIR when set. With none (a read-only image
and a read-only home) numba refuses cache=True at import time ("no locator available"); the
kernels are then compiled in every process instead (a few seconds) rather than failing.
"""

from __future__ import annotations

import os

import numba

# numba's default layer on Linux, GNU OpenMP, kills a forked child that runs a parallel kernel
# after its parent ran one ("fork() called from a process already using GNU OpenMP"), and
# multiprocessing forks by default there. "forksafe" takes TBB where it is installed, else
# numba's workqueue (no slower for these kernels here; it refuses concurrent calls from two
# threads of one process, which b3 never makes). NUMBA_THREADING_LAYER, when set, decides.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "forksafe"


def compiled(**options):
    """numba.njit(**options), cached where possible."""

    def compile_(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(function)

    return compile_


def use_threads(threads: int) -> None:
    """Threads for the next parallel kernel; numba's pool holds at most one per core."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
