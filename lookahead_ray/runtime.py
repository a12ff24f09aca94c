"""Starting (or joining) Ray: one place, so every command and test gets the same settings."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train V2 reads it in its controller: how long a worker group may wait for resources before failing."""


TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
"""Ray Train V2's controller polls its workers every 2 s by default, and a fit's start, each report and its end each
wait for the next poll. On a local Ray (one machine, a few workers) a poll costs next to nothing: there it is 0.25 s,
which takes 5-10 s off a short CPU run. A cluster keeps Ray's default (or whatever its environment sets)."""


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
        os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # inherited by the local Ray's processes
        _init_local(ray, num_cpus, kwargs)
    console.after_ray_init()


def _init_local(ray: Any, num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    # The dashboard serves Ray's state API, which Ray Train's PlacementGroupCleaner polls to free the workers'
    # placement group when a controller dies (a Tune trial stopped early, a killed driver). Without it that
    # placement group leaks and the next trial waits for its CPUs forever.
    # address="local": a new Ray, as documented, even where `ray start` left its address in /tmp/ray (ray.init()
    # would join that cluster, or fail on a stale address).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def check_resources(need: dict[str, float], key: str, what: str, *, bundles: list[dict[str, float]] | None = None,
                    wait_s: float = 0.0) -> None:
    """Fail before starting work that needs more CPUs or GPUs than the cluster has: it would wait for them forever
    (Ray Train retries a worker group that cannot start, Ray Data waits for its actors).

    ``need`` is the total; ``bundles`` (one per worker), when given, must also each fit on one node. A local Ray
    cannot grow, so there the check fails at once. A cluster joined through ``RAY_ADDRESS`` may autoscale: it gets
    ``wait_s`` seconds (``cluster.resource_wait_s``) to offer them, while the autoscaler is asked for them and the
    console says what is awaited.

    Raises:
        ConfigError: names ``key`` (what to change), what is needed and what the cluster has.
    """
    from lookahead_ray.errors import ConfigError

    short = _shortfall(need, bundles)
    if short is None:
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"{key}: {what} needs {short[0]} but this Ray has {short[1]}; lower it so the work can be "
                          "scheduled instead of waiting forever")
    logger.warning("waiting up to %g s for the cluster to offer %s for %s (it has %s)", wait_s, short[0], key, short[1])
    _request_from_autoscaler(bundles or [need])
    try:
        deadline = time.monotonic() + wait_s
        while short is not None and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            short = _shortfall(need, bundles)
    finally:
        _request_from_autoscaler([])
    if short is not None:
        raise ConfigError(f"{key}: {what} needs {short[0]} but the cluster has {short[1]} after {wait_s:g} s of "
                          "waiting; lower it, or raise cluster.resource_wait_s where the cluster autoscales")


def _shortfall(need: dict[str, float], bundles: list[dict[str, float]] | None) -> tuple[str, str] | None:
    """None when the cluster's nodes hold ``need`` and every bundle fits on one node, else (what is asked, what the
    cluster has), e.g. ("3 CPU", "2")."""
    import ray

    have = ray.cluster_resources()
    for resource, amount in need.items():
        if amount > have.get(resource, 0.0) + 1e-9:
            return f"{amount:g} {resource}", f"{have.get(resource, 0.0):g}"
    if not bundles:
        return None
    # First fit, largest first, into the nodes' totals: a worker's resources all come from one node.
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)), reverse=True):
        node = next((n for n in nodes if all(n.get(r, 0.0) + 1e-9 >= a for r, a in bundle.items())), None)
        if node is None:
            each = ", ".join(f"{a:g} {r}" for r, a in bundle.items())
            return f"{len(bundles)} x ({each}), each on one node", f"{len(nodes)} node(s), the largest with {largest:g} CPU"
        for r, a in bundle.items():
            node[r] = node.get(r, 0.0) - a
    return None


def _request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaling cluster for ``bundles`` (an empty list withdraws the request); nothing without one."""
    with contextlib.suppress(Exception):
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])


def check_visible_on_every_node(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """On a cluster of several nodes, before any work: every node must see the run's locations as this
    process does. A probe file is written into each output location and every node (a tiny task pinned to
    it) must find it; every input must exist there. A local path that only this machine has fails here, in
    one line, instead of deep inside a Ray Data write task or a training worker.

    Args:
        outputs / inputs: config key -> location (local path or URI).

    Raises:
        ConfigError: names the key, the location, the node that cannot see it and what to use instead.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lookahead_ray import storage
    from lookahead_ray.errors import ConfigError

    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) < 2:
        return
    probes = {}
    for key, location in outputs.items():
        probe = storage.join(location, f".lookahead-probe-{uuid.uuid4().hex[:12]}")
        storage.make_dirs(location)
        storage.write_text(probe, "written by lookahead-ray's storage preflight; safe to delete\n")
        probes[key] = probe
    wanted = {**probes, **inputs}
    try:
        sees = ray.remote(num_cpus=0)(_visible)
        answers = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(wanted) for n in nodes], timeout=120)
    finally:
        for probe in probes.values():
            with contextlib.suppress(OSError):
                fs, path = storage.resolve(probe)
                fs.delete_file(path)
    for node, answer in zip(nodes, answers, strict=True):
        for key, error in answer.items():
            location = outputs.get(key) or inputs[key]
            where = "a local path" if not storage.is_uri(location) else "a URI"
            raise ConfigError(f"{key}: {location} ({where}) is not visible on node {node['NodeManagerAddress']} "
                              f"(node id {node['NodeID'][:8]}: {error}); every node must reach it: use storage "
                              "every node mounts (NFS, EFS, a shared volume) or an object-store URI such as "
                              "s3://BUCKET/run")


def _visible(locations: dict[str, str]) -> dict[str, str]:
    """The locations this node cannot see, with why (runs on each node)."""
    from lookahead_ray import storage

    missing = {}
    for key, location in locations.items():
        try:
            if not storage.exists(location):
                missing[key] = "not found there"
        except Exception as exc:  # noqa: BLE001 - e.g. no credentials on that node: reported, not raised
            missing[key] = f"{type(exc).__name__}: {exc}"
    return missing
