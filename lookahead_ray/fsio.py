"""Publishing outputs atomically: stage next to the target, fsync, rename; never delete the old one first.

Every writer of a directory or file that a user (or a later stage) reads goes through here, so a crash leaves
either the old output or the new one, never a half-written mix. Staging names are unique per call, so two
concurrent runs never share one. Pure module (standard library only).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def cache_root() -> Path:
    """Where built tokenizers and the demo's seed models are cached (``LOOKAHEAD_RAY_CACHE`` overrides)."""
    return Path(os.environ.get("LOOKAHEAD_RAY_CACHE", Path.home() / ".cache" / "lookahead_ray"))


def staging_path(target: str | Path, kind: str = "tmp") -> Path:
    """A unique hidden sibling of ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def check_output_dir(target: str | Path, marker: str, key: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse to write ``target`` where that would destroy what this tool did not create.

    An existing ``target`` may be replaced only when it is empty or holds ``marker`` (the report or config file
    this tool writes into each of its outputs). ``target`` may not be, contain, or sit inside an input.

    Raises:
        ConfigError: names ``key`` and what is in the way.
    """
    from lookahead_ray.errors import ConfigError

    target = Path(target).resolve()
    for item in inputs:
        item = Path(item).resolve()
        if target == item or target in item.parents or item in target.parents:
            raise ConfigError(f"{key}: {target} overlaps the input {item}; write the output somewhere else")
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{key}: {target} is a file, not an output directory of lookahead-ray")
    if any(target.iterdir()) and not (target / marker).exists():
        raise ConfigError(f"{key}: {target} holds files lookahead-ray did not write (no {marker}); refusing to "
                          "replace it: choose an empty or new directory")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(staging: str | Path, target: str | Path, replace: bool = True) -> Path:
    """Move the finished ``staging`` directory to ``target``.

    An existing ``target`` is renamed aside first and deleted only once the new one is in place. With
    ``replace=False`` an existing ``target`` wins (another process published the same content first) and
    ``staging`` is removed.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        if not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return target
        old = staging_path(target, "old")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if not replace and target.exists():  # lost a race to an identical copy
            shutil.rmtree(staging, ignore_errors=True)
            return target
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_file(target: str | Path, binary: bool = False) -> Iterator[IO]:
    """Write ``target`` through a staged sibling renamed over it only when the block succeeds.

    The file gets the user's normal permissions (umask), unlike ``tempfile.mkstemp``'s 0600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    f = open(staging, "xb" if binary else "x", encoding=None if binary else "utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(staging, target)
        _fsync_dir(target.parent)
    except BaseException:
        f.close()
        staging.unlink(missing_ok=True)
        raise
