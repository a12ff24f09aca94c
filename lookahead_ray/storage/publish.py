"""Writing so that outputs appear only complete: a file through a staged sibling or one upload, a directory staged
beside its target and published (renamed, or copied server-side with its marker last under a claim), and never over
what this tool did not write (:func:`check_output_dir`)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lookahead_ray.storage.paths import (
    absolute,
    is_file,
    is_uri,
    join,
    list_files,
    name,
    parent,
    read_text,
    remove_tree,
    resolve,
)

CLAIM = ".lookahead-publishing"
"""Held by an object-store target while it is being replaced; removed once the new output is complete."""


def write_text(target: str, text: str) -> None:
    with atomic_file(target) as f:
        f.write(text)


def staging_location(target: str, kind: str = "tmp") -> str:
    """A unique hidden sibling of ``target`` (same filesystem: a local rename or a server-side copy away)."""
    return join(parent(target), f".{name(target)}.{kind}-{uuid.uuid4().hex[:12]}")


def staging_path(target: str | Path, kind: str = "tmp") -> Path:
    """:func:`staging_location` of a local target, as a Path."""
    return Path(staging_location(absolute(target), kind))


@contextmanager
def atomic_file(target: str | Path, binary: bool = False) -> Iterator[IO]:
    """Write ``target`` (a path or a URI) so that it appears only once the block succeeded.

    Local: a staged sibling, fsynced and renamed over ``target``, with the user's normal permissions (umask).
    Object store: a local temporary file, uploaded in one piece at the end (an object appears whole or not).
    """
    target = str(target)
    if is_uri(target):
        with tempfile.TemporaryDirectory(prefix="lookahead-upload-") as scratch:
            local = os.path.join(scratch, name(target))
            with open(local, "xb" if binary else "x", encoding=None if binary else "utf-8") as f:
                yield f
            upload_file(local, target)
        return
    path = Path(absolute(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    f = open(staging, "xb" if binary else "x", encoding=None if binary else "utf-8")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(staging, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):  # closing flushes the buffer: on a full disk that fails again
            f.close()
        staging.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: name the one being written
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        staging.unlink(missing_ok=True)
        raise


def upload_file(local: str, target: str) -> None:
    """Copy the local file ``local`` to ``target`` (one object, complete or absent on an object store)."""
    if not is_uri(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return
    fs, path = resolve(target)
    with open(local, "rb") as source, fs.open_output_stream(path) as sink:
        shutil.copyfileobj(source, sink, length=8 << 20)


def upload_dir(local_dir: str | Path, target: str) -> None:
    """Copy every file of ``local_dir`` to ``target`` (no publishing: see :func:`publish_dir`)."""
    local_dir = Path(local_dir)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        relative = file.relative_to(local_dir).as_posix()
        if is_uri(target):
            upload_file(str(file), join(target, relative))
        else:
            destination = Path(target, relative)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, destination)


def check_output_dir(target: str | Path, marker: str, key: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse to write ``target`` where that would destroy what this tool did not create.

    An existing ``target`` may be replaced only when it is empty, holds ``marker`` (the report or config file this
    tool writes into each of its outputs) or holds this tool's claim (an interrupted publish). ``target`` may not
    be, contain, or sit inside an input.

    Raises:
        ConfigError: names ``key`` and what is in the way.
    """
    from lookahead_ray.errors import ConfigError

    target = absolute(target)
    if is_uri(target) and parent(target) == target:
        raise ConfigError(f"{key}: {target} is a bucket's root; name a prefix below it (e.g. {target}/run), where "
                          "lookahead-ray can stage its output beside the target")
    compared = target if is_uri(target) else os.path.realpath(target)
    for item in inputs:
        item = absolute(item) if is_uri(item) else os.path.realpath(absolute(item))
        if compared == item or item.startswith(compared.rstrip("/") + "/") or compared.startswith(item.rstrip("/") + "/"):
            raise ConfigError(f"{key}: {target} overlaps the input {item}; write the output somewhere else")
    if is_file(target):
        raise ConfigError(f"{key}: {target} is a file, not an output directory of lookahead-ray")
    if not _is_empty(target) and not is_file(join(target, marker)) and not is_file(join(target, CLAIM)):
        raise ConfigError(f"{key}: {target} holds files lookahead-ray did not write (no {marker}); refusing to "
                          "replace it: choose an empty or new location")


def _is_empty(location: str) -> bool:
    """No entry directly below ``location`` (or it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))


def is_complete(target: str, marker: str) -> bool:
    """``target`` is a finished output: it holds ``marker`` and no claim of an interrupted publish."""
    return is_file(join(target, marker)) and not is_file(join(target, CLAIM))


def publish_dir(staging: str | Path, target: str | Path, marker: str | None = None, replace: bool = True) -> str:
    """Make the finished ``staging`` directory the output ``target``.

    ``staging`` is a :func:`staging_location` of ``target`` (same filesystem), or, for a remote ``target``, a
    local directory. Local: an existing ``target`` is renamed aside and deleted only once the new one is in
    place. Object store: ``target`` is claimed (the claim names the staging location), its old objects are
    removed, the staged files are copied in (server-side from a staging prefix, uploaded from a local directory:
    no server-side copy, which S3 limits to 5 GiB an object) with ``marker`` last, then the claim and the staging
    are removed. With ``replace=False`` an existing ``target`` wins (another process published the same content).
    """
    staging, target = str(staging), absolute(target)
    if not is_uri(target):
        return str(_publish_local(Path(staging), Path(target), replace))
    fs, target_path = resolve(target)
    if list_files(target) and not replace:
        remove_tree(staging)
        return target
    staged = sorted(posixpath.relpath(f, staging) if is_uri(staging) else os.path.relpath(f, staging)
                    for f in list_files(staging))
    claim = join(target, CLAIM)
    if is_file(claim):  # an interrupted publish: its staging is ours to remove
        with contextlib.suppress(Exception):
            previous = json.loads(read_text(claim)).get("staging")
            if previous and previous != staging and is_uri(previous):
                remove_tree(previous)
    write_text(claim, json.dumps({"staging": staging}))
    for old in list_files(target):
        if old != claim:
            fs.delete_file(resolve(old)[1])
    for relative in [f for f in staged if f != marker] + [f for f in staged if f == marker]:
        if is_uri(staging):
            fs.copy_file(resolve(join(staging, relative))[1], posixpath.join(target_path, relative))
        else:
            upload_file(os.path.join(staging, relative), join(target, relative))
    fs.delete_file(resolve(claim)[1])
    remove_tree(staging)
    return target


def _publish_local(staging: Path, target: Path, replace: bool) -> Path:
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
