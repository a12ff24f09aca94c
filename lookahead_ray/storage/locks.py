"""One run per output at a time: a lock file beside the output (host, pid, start, command), taken over when its
process is gone, and the staging a killed run left removed by the next run that holds the output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lookahead_ray.storage.paths import absolute, exists, is_uri, join, name, parent, read_text, remove_tree, resolve
from lookahead_ray.storage.publish import write_text

LOCK_SUFFIX = ".lookahead-lock"


def lock_location(target: str) -> str:
    """The lock file of an output: beside it, so it exists before the output does and outlives a replace."""
    return join(parent(target), f".{name(target)}{LOCK_SUFFIX}")


@contextmanager
def held_output(target: str | Path, key: str) -> Iterator[None]:
    """Hold ``target`` for this run: one run at a time writes an output (prepare, train, eval, tune).

    The lock is a file beside the output naming its holder (host, pid, start, command). A second run fails at once,
    naming the holder; a lock whose process is gone (same host, no such pid) is stale and taken over. Local locks
    are created exclusively; on an object store, written and read back (a race within the same second between two
    runs is not excluded there).

    Raises:
        OutputInUseError: another live run holds ``target`` (names it and the lock file).
    """
    import datetime
    import socket
    import sys

    target = absolute(target)
    lock = lock_location(target)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.datetime.now().isoformat(
        timespec="seconds"), "token": uuid.uuid4().hex, "command": " ".join(["lookahead-ray", *sys.argv[1:]])[:300]}
    _take_lock(lock, mine, target, key)
    _remove_leftovers(target)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # never mask the run's own error; a leftover lock is detected as stale
            if _read_lock(lock).get("token") == mine["token"]:
                fs, path = resolve(lock)
                fs.delete_file(path)


_LEFTOVER = re.compile(r"^\.(.+)\.(tmp|old)-[0-9a-f]{12}$")


def _remove_leftovers(target: str) -> None:
    """Staged siblings of ``target`` and staged entries inside it (``.NAME.tmp-HEX``, ``.NAME.old-HEX``: only
    this tool names things so) are left by runs that died: with the output held, no live run is writing them."""
    import logging

    import pyarrow.fs as pafs

    removed = []
    for directory, only_name in ((parent(target), name(target)), (target, None)):
        fs, path = resolve(directory)
        try:
            entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        except OSError:
            continue
        for entry in entries:
            match = _LEFTOVER.match(entry.base_name)
            if match and (only_name is None or match.group(1) == only_name):
                leftover = join(directory, entry.base_name)
                remove_tree(leftover) if entry.type == pafs.FileType.Directory else fs.delete_file(entry.path)
                removed.append(leftover)
    if removed:
        logging.getLogger(__name__).warning("removed %d staging location(s) left by an interrupted run: %s",
                                            len(removed), ", ".join(removed))


def _read_lock(lock: str) -> dict[str, Any]:
    try:
        return json.loads(read_text(lock))
    except (OSError, ValueError):
        return {}


def _take_lock(lock: str, mine: dict[str, Any], target: str, key: str) -> None:
    from lookahead_ray.errors import OutputInUseError

    text = json.dumps(mine)
    if not is_uri(lock):
        Path(lock).parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                f.write(text)
            return
        except FileExistsError:
            pass
    holder = _read_lock(lock) if exists(lock) else {}
    if holder and _holder_alive(holder):
        raise OutputInUseError(f"{key}: {target} is being written by another run (host {holder.get('host')}, pid "
                          f"{holder.get('pid')}, since {holder.get('started')}: {holder.get('command')}); wait for it "
                          f"or choose another location. If that run is gone, delete {lock}")
    write_text(lock, text)  # free, or stale: taken over
    if _read_lock(lock).get("token") != mine["token"]:  # another run took it over in the same moment
        raise OutputInUseError(f"{key}: {target} was just taken by another run ({_read_lock(lock).get('command')})")


def _holder_alive(holder: dict[str, Any]) -> bool:
    """A holder on another host is taken to be alive (its process cannot be checked from here)."""
    import socket

    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid") or -1)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True
