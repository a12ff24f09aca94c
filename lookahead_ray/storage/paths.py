"""Locations: a local path or a URI that ``pyarrow.fs`` resolves, kept as plain strings with their scheme;
reading, listing and globbing them the same way on every filesystem. Pure (pyarrow and the standard library)."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import shutil
from functools import lru_cache
from typing import Any


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


def make_dirs(location: str) -> None:
    if not is_uri(location):
        os.makedirs(absolute(location), exist_ok=True)  # object stores have no directories to create


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
