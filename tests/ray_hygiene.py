"""A pytest plugin: every test that uses the session's Ray leaves it as it found it.

After each such test, nothing that test started may still be alive: no placement group, no actor, no running task,
and no CPU or GPU reserved that was free when it began. A leftover fails *that* test (an error at teardown naming
what was left), is removed, and, if Ray still has not given its resources back, the session's Ray is restarted, so
the next test starts clean instead of waiting forever for CPUs a dead test holds (a cascade of timeouts).

A test that times out (pytest-timeout) reaches its teardown too: what it held is released here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import pytest

RAY_FIXTURE = "ray_local"
GRACE_S = float(os.environ.get("LOOKAHEAD_TEST_RAY_GRACE_S", "30"))
"""Ray frees a finished trainer's placement group and actors asynchronously (Ray Train's controller, a Ray Data
actor pool): what is still held after this long is held."""

RAY_SINGLETONS = {"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker", "_ProxyActor",
                  "ServeController", "TrainStateActor"}
"""Ray's own per-cluster actors, created once on first use and kept for the cluster's life (Ray Data's stats and
autoscaling coordinator, Ray Train's state actor): not a test's leftovers."""

RAY_JANITORS = {"PlacementGroupCleaner"}
"""Ray Train's detached janitor, which outlives a driver killed on purpose (SIGKILL, Ctrl-C) to remove its placement
groups and then exits on its own, a minute or so later; it holds no CPU, and a placement group or CPU it failed to
free is still reported."""

RESTARTS: list[str] = []
"""Why the session's Ray was restarted, one entry per restart (read by the plugin's own test)."""


@dataclass
class RayState:
    actors: dict[str, str] = field(default_factory=dict)  # id -> class name
    placement_groups: dict[str, str] = field(default_factory=dict)  # id -> bundles
    tasks: dict[str, str] = field(default_factory=dict)  # id -> name
    reserved: dict[str, float] = field(default_factory=dict)  # resource -> amount in use

    def new_since(self, before: RayState) -> list[str]:
        found = [f"actor {cls} ({actor_id[:12]})" for actor_id, cls in self.actors.items()
                 if actor_id not in before.actors and cls not in RAY_SINGLETONS | RAY_JANITORS]
        found += [f"placement group {pg_id[:12]} {bundles}" for pg_id, bundles in self.placement_groups.items()
                  if pg_id not in before.placement_groups]
        found += [f"running task {name} ({task_id[:12]})" for task_id, name in self.tasks.items()
                  if task_id not in before.tasks]
        found += [f"{amount - before.reserved.get(resource, 0.0):g} {resource} still reserved"
                  for resource, amount in self.reserved.items()
                  if amount - before.reserved.get(resource, 0.0) > 1e-6]
        return found


def ray_state() -> RayState:
    import ray
    from ray.util import state

    address = ray.get_runtime_context().gcs_address  # this session's: another Ray may run on the machine
    actors = {a.actor_id: a.class_name for a in
              state.list_actors(address, filters=[("state", "!=", "DEAD")], limit=10_000)}
    groups = {g.placement_group_id: str([b.get("unit_resources") for b in g.bundles or []]) for g in
              state.list_placement_groups(address, filters=[("state", "!=", "REMOVED")], limit=10_000, detail=True)}
    tasks = {t.task_id: t.name for t in state.list_tasks(address, filters=[("state", "=", "RUNNING")], limit=10_000)
             if t.type == "NORMAL_TASK"}
    total, free = ray.cluster_resources(), ray.available_resources()
    reserved = {r: total.get(r, 0.0) - free.get(r, 0.0) for r in ("CPU", "GPU") if total.get(r)}
    return RayState(actors, groups, tasks, reserved)


def leftovers(before: RayState, grace_s: float = GRACE_S) -> list[str]:
    """What the test left behind (empty when nothing), after up to ``grace_s`` for Ray to release it."""
    deadline = time.monotonic() + grace_s
    while True:
        found = ray_state().new_since(before)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def clean_up(before: RayState) -> str | None:
    """Remove the test's placement groups and kill its actors; restart Ray if that does not free its resources.
    Returns why Ray was restarted, or None."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util import state
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    now = ray_state()
    # By the process Ray names, not by handle: an actor another driver made (a CLI joined through RAY_ADDRESS) has no
    # handle in this process, and asking the core worker for one aborts the whole pytest process (a Ray check fails).
    for actor in state.list_actors(ray.get_runtime_context().gcs_address, filters=[("state", "!=", "DEAD")],
                                   limit=10_000, detail=True):
        if actor.actor_id not in before.actors and actor.class_name not in RAY_SINGLETONS and actor.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(actor.pid, signal.SIGKILL)
    for pg_id in now.placement_groups:
        if pg_id not in before.placement_groups:
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    still = leftovers(before, grace_s=10.0)
    if not still:
        return None
    restart_ray()
    RESTARTS.append("; ".join(still))
    return "; ".join(still)


def restart_ray() -> None:
    """The session's Ray, stopped and started again with the same settings."""
    import ray

    settings = SESSION_RAY_SETTINGS
    ray.shutdown()
    ray.init(**settings)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


SESSION_RAY_SETTINGS: dict = {}
"""The ``ray.init`` keyword arguments of the session's Ray (set by the fixture that starts it)."""


def start_session_ray(**settings) -> None:
    import ray
    from ray.data import DataContext

    SESSION_RAY_SETTINGS.clear()
    SESSION_RAY_SETTINGS.update(settings)
    ray.init(**settings)
    DataContext.get_current().enable_progress_bars = False


@pytest.fixture(autouse=True)
def ray_left_as_found(request):
    """Fails the test that leaves anything of its own alive in the session's Ray, then cleans it up."""
    uses_ray = RAY_FIXTURE in request.fixturenames
    before = None
    if uses_ray:
        import ray

        if ray.is_initialized():
            before = ray_state()
    yield
    if not uses_ray:
        return
    import ray

    if not ray.is_initialized():
        return
    found = leftovers(before or RayState())
    if found:
        restarted = clean_up(before or RayState())
        pytest.fail(f"{request.node.nodeid} left in the session's Ray: {'; '.join(found)} (removed"
                    f"{'; Ray restarted: it had not released them' if restarted else ''})", pytrace=False)
