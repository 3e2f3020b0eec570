"""Progress bars that stay readable in a terminal and in `kubectl logs`."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr: live on a terminal, one line every 30 s in a pod's log."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=interactive,
        file=sys.stderr,
    )
