"""Which checkpoints of a run are complete, wherever the run's storage is (a path or a URI).

Every rank writes ``complete-rank<R>.json`` (the step and the world size) into a checkpoint as its last file,
after its DeepSpeed state (and, for the final checkpoint, the export). A checkpoint is complete when the markers
of all its ranks are there with one step. Resuming uses the newest complete checkpoint found on storage, not
only the one Ray Train's snapshot recorded: a driver killed (or interrupted) right after the workers reported
leaves a complete checkpoint the snapshot does not know yet. A checkpoint without all its markers (a full disk,
a kill mid-write) is never resumed from; the next run into the same run directory removes it.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

from lookahead_ray import storage
from lookahead_ray.train.layout import CHECKPOINT_PREFIX, COMPLETE_MARKER, checkpoint, complete_marker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointOnStorage:
    location: str
    step: int


def mark_complete(directory: str, rank: int, world_size: int, step: int) -> None:
    """This rank's last write into a checkpoint: from here on its part of ``directory`` is whole."""
    with storage.atomic_file(complete_marker(directory, rank)) as f:
        f.write(json.dumps({"step": step, "world_size": world_size}) + "\n")


def survey(run_location: str) -> tuple[list[CheckpointOnStorage], list[str]]:
    """The complete checkpoints under a run's directory (oldest step first) and the incomplete ones."""
    files: dict[str, set[str]] = {}
    for relative, _, _ in storage.listing(run_location):
        top, _, rest = relative.partition("/")
        if top.startswith(CHECKPOINT_PREFIX) and rest:
            files.setdefault(top, set()).add(rest)
    complete, incomplete = [], []
    for name, names in sorted(files.items()):
        location = checkpoint(run_location, name)
        step = _complete_step(location, names)
        if step is None:
            incomplete.append(location)
        else:
            complete.append(CheckpointOnStorage(location, step))
    return sorted(complete, key=lambda c: c.step), incomplete


def newest_complete(run_location: str) -> CheckpointOnStorage | None:
    complete, _ = survey(run_location)
    return complete[-1] if complete else None


def remove_incomplete(run_location: str) -> list[str]:
    """Delete the checkpoints of this run that were never completely written; returns their locations.

    Only while no worker writes into the run (before training starts): an incomplete checkpoint is one this
    tool began and a fault (a full disk, a kill mid-write) ended."""
    if not storage.exists(run_location):
        return []
    _, incomplete = survey(run_location)
    for location in incomplete:
        storage.remove_tree(location)
    if incomplete:
        logger.warning("removed %d incomplete checkpoint(s) left by an interrupted run: %s", len(incomplete),
                       ", ".join(posixpath.basename(location) for location in incomplete))
    return incomplete


def _complete_step(location: str, names: set[str]) -> int | None:
    ranks = {int(m.group(1)): name for name in names if (m := COMPLETE_MARKER.fullmatch(name))}
    if not ranks:
        return None
    markers = [json.loads(storage.read_text(storage.join(location, name))) for name in ranks.values()]
    world_size, steps = markers[0]["world_size"], {m["step"] for m in markers}
    if set(ranks) != set(range(world_size)) or len(steps) != 1:
        return None
    return steps.pop()
