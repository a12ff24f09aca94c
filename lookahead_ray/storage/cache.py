"""The node-local cache: a remote directory a node needs (a model, the token data) copied once per node, keyed by
its listing, safe against concurrent processes of one node (``LOOKAHEAD_RAY_CACHE``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lookahead_ray.storage.paths import absolute, is_uri, join, listing, name, open_input
from lookahead_ray.storage.publish import _publish_local, is_complete, staging_path

COMPLETE = ".lookahead-complete"
"""Written last into a node-cache entry: the entry is whole."""


def cache_root() -> Path:
    """The node-local cache: built tokenizers, the demo's seed models, copies of remote models and token data
    (``LOOKAHEAD_RAY_CACHE`` overrides; on a cluster point it at each node's local disk)."""
    return Path(os.environ.get("LOOKAHEAD_RAY_CACHE", Path.home() / ".cache" / "lookahead_ray"))


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
