"""Starting (or joining) Ray: one place, so every command and test gets the same settings."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train V2 reads it in its controller: how long a worker group may wait for resources before failing."""


def init_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Join the cluster in ``RAY_ADDRESS`` if set, else start a local Ray; no-op when already connected.

    ``env_vars`` go into the job's runtime environment (every task and actor, Ray Train's controller
    included); when Ray is already connected they cannot change, and a debug line says so.
    """
    import ray

    if ray.is_initialized():
        if env_vars:
            logger.debug("Ray is already initialized; job environment variables %s not applied", sorted(env_vars))
        return
    if env_vars:
        kwargs["runtime_env"] = {**kwargs.get("runtime_env", {}),
                                 "env_vars": {**kwargs.get("runtime_env", {}).get("env_vars", {}), **env_vars}}
    from lookahead_ray import console

    console.quiet_libraries()  # before ray.init, which announces itself through the "ray" logger
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        _init_local(ray, num_cpus, kwargs)
    console.after_ray_init()


def _init_local(ray: Any, num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    # The dashboard serves Ray's state API, which Ray Train's PlacementGroupCleaner polls to free the workers'
    # placement group when a controller dies (a Tune trial stopped early, a killed driver). Without it that
    # placement group leaks and the next trial waits for its CPUs forever.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def check_resources(need: dict[str, float], key: str, what: str) -> None:
    """Fail before starting work that needs more CPUs or GPUs than a local Ray has: it would wait for them
    forever. A cluster joined through RAY_ADDRESS may autoscale, so there the bounded worker-group start
    timeout is the guard instead.

    Raises:
        ConfigError: names ``key`` (what to change), what is needed and what Ray reports.
    """
    import ray

    from lookahead_ray.errors import ConfigError

    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0):
            raise ConfigError(f"{key}: {what} needs {amount:g} {resource} but this Ray has "
                              f"{have.get(resource, 0.0):g}; lower it so the work can be scheduled instead of "
                              "waiting forever")
