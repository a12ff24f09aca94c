"""Every location lookahead-ray reads or writes: a local path or a URI that ``pyarrow.fs`` resolves.

``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` (credentials and endpoints from the usual environment, e.g.
``AWS_ENDPOINT_URL``, as Ray Train's own storage does) or a local path; locations are plain strings and keep
their scheme everywhere (results, messages). The guarantees hold on every filesystem:

- **Outputs appear only complete.** A file is written to a staged sibling (local) or to a local temporary file
  uploaded in one piece (object stores: an object appears whole or not at all). A directory is written under a
  unique staging location next to its target, then published: renamed (local), or copied server-side into the
  target with its marker (the report or config file every output of this tool holds) copied last (object
  stores). While an object-store target is being replaced it holds a claim object, and an output is complete
  only when it holds its marker and no claim.
- **Nothing this tool did not write is replaced or deleted:** a target must be empty, hold the marker, or hold
  this tool's claim (a publish that was interrupted).
- **Nodes never read each other's disks:** a remote directory a node needs (a model, the token data) is copied
  once per node into the node-local cache (:func:`cache_root`), keyed by its listing, safe against concurrent
  processes of one node.

Pure module (pyarrow and the standard library).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

COMPLETE = ".lookahead-complete"
"""Written last into a node-cache entry: the entry is whole."""
CLAIM = ".lookahead-publishing"
"""Held by an object-store target while it is being replaced; removed once the new output is complete."""


def cache_root() -> Path:
    """The node-local cache: built tokenizers, the demo's seed models, copies of remote models and token data
    (``LOOKAHEAD_RAY_CACHE`` overrides; on a cluster point it at each node's local disk)."""
    return Path(os.environ.get("LOOKAHEAD_RAY_CACHE", Path.home() / ".cache" / "lookahead_ray"))


def is_uri(location: str | os.PathLike | None) -> bool:
    """A URI with a scheme other than ``file://`` (those go through ``pyarrow.fs``)."""
    return location is not None and "://" in str(location) and not str(location).startswith("file://")


def absolute(location: str | os.PathLike) -> str:
    """A URI unchanged (no trailing slash); a local path made absolute (``~`` expanded, ``file://`` dropped)."""
    location = str(location)
    if is_uri(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def join(location: str | os.PathLike, *parts: str) -> str:
    location = str(location)
    if is_uri(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def parent(location: str) -> str:
    if is_uri(location):
        scheme, rest = location.rstrip("/").split("://", 1)
        head = posixpath.dirname(rest)
        return f"{scheme}://{head}" if head else location
    return os.path.dirname(os.path.abspath(location))


def name(location: str) -> str:
    return posixpath.basename(location.rstrip("/")) if is_uri(location) else os.path.basename(location.rstrip(os.sep))


@lru_cache(maxsize=32)
def _remote_filesystem(scheme_and_host: str, endpoint: str | None) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(scheme_and_host)[0]


def resolve(location: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path within it)`` for ``location``.

    Raises:
        ConfigError: a URI whose scheme pyarrow cannot resolve (the message names it).
    """
    import pyarrow.fs as pafs

    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    scheme, rest = location.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if "?" in location:
        from lookahead_ray.errors import ConfigError

        raise ConfigError(f"{location}: options in the URI (?...) are not supported: set them in the environment "
                          "(e.g. AWS_ENDPOINT_URL, AWS_DEFAULT_REGION), which every node's processes inherit")
    try:
        fs = _remote_filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL"))
        path = pafs.FileSystem.from_uri(location)[1] if scheme not in ("s3", "gs", "gcs") else rest.rstrip("/")
    except Exception as exc:
        from lookahead_ray.errors import ConfigError

        raise ConfigError(f"{location}: cannot open this storage location ({type(exc).__name__}: {exc}); "
                          "check the scheme and the credentials in the environment") from exc
    return fs, path


def _info(location: str) -> Any:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def size(location: str) -> int:
    return _info(location).size


def list_files(location: str, recursive: bool = True) -> list[str]:
    """The files below ``location`` (full locations, sorted); empty when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted(join(location, posixpath.relpath(i.path, path)) for i in infos if i.type == pafs.FileType.File)


def listing(location: str, recursive: bool = True) -> list[tuple[str, int, int | None]]:
    """``(relative name, size, modification time in ns)`` of every file below ``location``: what a copy of it
    is keyed by."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted((posixpath.relpath(i.path, path), i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)


def glob(pattern: str) -> list[str]:
    """Files matching a glob, as Python's glob matches: ``*`` and ``?`` within one path segment, ``**`` any number
    of segments, hidden names only when the pattern spells the dot. On an object store the prefix before the first
    wildcard is listed."""
    if not is_uri(pattern):
        import glob as globlib

        return sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    literal = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    base = literal if literal.endswith("/") else parent(literal)
    matcher = _glob_regex(pattern)
    return [f for f in list_files(base) if matcher.fullmatch(f)]


def _glob_regex(pattern: str) -> re.Pattern:
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append("(?:[^/.][^/]*/)*")
            continue
        regex, i = "" if segment.startswith(".") else "(?![.])", 0
        while i < len(segment):
            char = segment[i]
            end = segment.find("]", i + 2) if char == "[" else -1
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif end > 0:
                body = segment[i + 1:end]
                regex += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                i = end
            else:
                regex += re.escape(char)
            i += 1
        parts.append(regex + "/")
    return re.compile("".join(parts)[:-1])


def open_input(location: str, native: bool = False) -> Any:
    """A binary, seekable file object (lines iterate, as with ``open(path, "rb")``); ``native``: pyarrow's own
    random-access file (for pyarrow readers such as Parquet's)."""
    if not is_uri(location):
        return _native_local(location) if native else open(absolute(location), "rb")  # noqa: SIM115
    fs, path = resolve(location)
    remote = fs.open_input_file(path)
    return remote if native else io.BufferedReader(remote, buffer_size=1 << 20)


def _native_local(location: str) -> Any:
    import pyarrow as pa

    return pa.OSFile(absolute(location), "rb")


def read_bytes(location: str) -> bytes:
    with open_input(location) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_text(target: str, text: str) -> None:
    with atomic_file(target) as f:
        f.write(text)


def staging_location(target: str, kind: str = "tmp") -> str:
    """A unique hidden sibling of ``target`` (same filesystem: a local rename or a server-side copy away)."""
    return join(parent(target), f".{name(target)}.{kind}-{uuid.uuid4().hex[:12]}")


def staging_path(target: str | Path, kind: str = "tmp") -> Path:
    """:func:`staging_location` of a local target, as a Path."""
    return Path(staging_location(absolute(target), kind))


def make_dirs(location: str) -> None:
    if not is_uri(location):
        os.makedirs(absolute(location), exist_ok=True)  # object stores have no directories to create


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


def remove_tree(location: str) -> None:
    """Delete a directory this tool created (a staging location, an old copy); missing is fine."""
    if not is_uri(location):
        shutil.rmtree(absolute(location), ignore_errors=True)
        return
    fs, path = resolve(location)
    for file in list_files(location):
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(resolve(file)[1])
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)


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


def node_cached(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/kind/key``, built by ``build(staging_dir)`` the first time on this node. Concurrent
    processes of the node build it once (a file lock; the others wait, then find it complete)."""
    import fcntl

    target = cache_root() / kind / key
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / COMPLETE).exists():
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # a build killed midway (under this lock)
                shutil.rmtree(stale, ignore_errors=True)
            staging = staging_path(target)
            staging.mkdir()
            try:
                build(staging)
                (staging / COMPLETE).write_text("")
                _publish_local(staging, target, replace=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def local_copy(location: str, kind: str = "remote", marker: str | None = None, weights: bool = True) -> str:
    """A local directory with the contents of ``location``: itself when local, else a copy in this node's cache
    (:func:`node_cached`), downloaded once per node and reused while the remote listing (names, sizes,
    modification times) is unchanged. ``weights=False`` copies everything but weight files (a tokenizer, a
    config).

    Raises:
        FileNotFoundError: ``location`` holds no files (or, with ``marker``, is not a complete output).
        RuntimeError: ``location`` changed while it was being copied (nothing is cached; run again).
    """
    if not is_uri(location):
        return absolute(location)
    wanted = listing(location)
    if not weights:
        wanted = [entry for entry in wanted if not entry[0].endswith(WEIGHT_SUFFIXES)]
    if not wanted or (marker is not None and not is_complete(location, marker)):
        raise FileNotFoundError(f"{location}: no such directory (or an incomplete output: no {marker})"
                                if marker else f"{location}: no such directory, or it holds no files")
    key = hashlib.sha256(json.dumps([location, wanted], default=str).encode()).hexdigest()[:20]

    def download(staging: Path) -> None:
        for relative, _, _ in wanted:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with open_input(join(location, relative)) as source, open(destination, "wb") as sink:
                shutil.copyfileobj(source, sink, length=8 << 20)
        now = {entry for entry in listing(location) if entry[0] in {w[0] for w in wanted}}
        if now != set(wanted):  # a publish replaced it meanwhile: a copy of two versions must not be cached
            raise RuntimeError(f"{location} changed while it was being copied to this node; run again")

    return str(node_cached(kind, f"{name(location)}-{key}", download))
