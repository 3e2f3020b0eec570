"""Progress bars that stay readable in a terminal and in `kubectl logs`."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from b3 import stage_metrics


class _MeteredBar(tqdm):
    """A bar that also sets b3_stage_progress_{done,total} while stage metrics are served."""

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        job = stage_metrics.active_job()
        if job is not None:
            stage_metrics.PROGRESS_TOTAL.labels(job, self.desc).set(self.total or 0)
            stage_metrics.PROGRESS_DONE.labels(job, self.desc).set(self.n)
        return shown


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr: live on a terminal, one line every 30 s in a pod's log."""
    interactive = sys.stderr.isatty()
    return _MeteredBar(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=interactive,
        file=sys.stderr,
    )
