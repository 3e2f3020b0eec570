"""Connecting to Ray: the cluster at RAY_ADDRESS when set (KubeRay sets it), else a local one."""

from __future__ import annotations

import os


def use_ray(workers: int) -> bool:
    """Work is spread over Ray when several workers are asked for or a cluster is given."""
    return workers > 1 or "RAY_ADDRESS" in os.environ


def ensure_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
