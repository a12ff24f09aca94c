"""Starting (or joining) Ray: one place, so every command and test gets the same settings."""

from __future__ import annotations

import os
from typing import Any


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster in ``RAY_ADDRESS`` if set, else start a local Ray; no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
