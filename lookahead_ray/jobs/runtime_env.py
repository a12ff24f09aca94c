"""The runtime_env a submitted job carries, built by pure functions: what is uploaded (working_dir with
excludes, checked against Ray's upload limit), what is installed (the project's dependencies with Ray left to
the image), and which environment variables travel (only those named: never secrets by default)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lookahead_ray.errors import JobError
from lookahead_ray.jobs.versions import DEEPSPEED_VERSION, RAY_VERSION, TORCH_VERSION

UPLOAD_LIMIT_BYTES = 100 * 2**20
"""Ray refuses a working_dir package over 100 MiB uploaded through the dashboard."""
LARGE_FILE_BYTES = 10 * 2**20
DEFAULT_EXCLUDES = [".git", ".venv", "venv", ".env", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
                    "*.egg-info", "out", "outputs", "ray_results", "checkpoints", "wandb", "*.safetensors", "*.bin",
                    "*.pt", "*.ckpt", "*.arrow", "*.parquet"]
"""Gitignore-style names (Ray applies them at any depth): environments, caches, run outputs and weights."""


@dataclass
class WorkingDirScan:
    """What Ray would upload from a working_dir."""

    total_bytes: int = 0
    files: int = 0
    large_files: list[tuple[str, int]] = field(default_factory=list)
    """Files over LARGE_FILE_BYTES that are uploaded (worth an exclude or shared storage)."""


def excluded(relative: str, patterns: Sequence[str]) -> bool:
    """Whether a path relative to the working_dir matches an exclude: a name pattern matches any component."""
    parts = Path(relative).parts
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if "/" in pattern:
            if fnmatch.fnmatch(relative, pattern.lstrip("/")) or relative.startswith(pattern.lstrip("/") + "/"):
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def scan_working_dir(root: str | Path, excludes: Sequence[str]) -> WorkingDirScan:
    scan = WorkingDirScan()
    root = Path(root)
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root)
        dirs[:] = [d for d in dirs if not excluded(str(base / d), excludes)]
        for name in files:
            relative = str(base / name)
            if excluded(relative, excludes) or Path(directory, name).is_symlink():
                continue
            size = (Path(directory) / name).stat().st_size
            scan.total_bytes += size
            scan.files += 1
            if size > LARGE_FILE_BYTES:
                scan.large_files.append((relative, size))
    return scan


def check_upload(working_dir: str | Path, extra_excludes: Sequence[str] = ()) -> WorkingDirScan:
    """What Ray will upload (DEFAULT_EXCLUDES and ``extra_excludes`` left out).

    Raises:
        JobError: the upload would exceed Ray's limit; the message names the largest files.
    """
    scan = scan_working_dir(working_dir, [*DEFAULT_EXCLUDES, *extra_excludes])
    if scan.total_bytes > UPLOAD_LIMIT_BYTES:
        biggest = ", ".join(f"{p} ({s / 2**20:.0f} MiB)" for p, s in sorted(scan.large_files, key=lambda x: -x[1])[:3])
        raise JobError(f"--working-dir {working_dir}: {scan.total_bytes / 2**20:.0f} MiB to upload, over Ray's "
                       f"{UPLOAD_LIMIT_BYTES // 2**20} MiB limit{'; largest: ' + biggest if biggest else ''}. "
                       "Leave out what the job does not read (--exclude PATTERN); keep data and weights on shared storage")
    return scan


def project_requirements(requires: Sequence[str]) -> list[str]:
    """The project's runtime dependencies for the job's environment: Ray is the image's (never reinstalled
    over it); DeepSpeed and torch are pinned to the versions the manifests use."""
    packages = []
    for requirement in requires:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        if name == "ray":
            continue
        pinned = {"deepspeed": f"deepspeed=={DEEPSPEED_VERSION}", "torch": f"torch=={TORCH_VERSION}"}
        packages.append(pinned.get(name, requirement.split(";")[0].strip()))
    return packages


def read_requirements(path: str | Path) -> list[str]:
    """A requirements file's packages; one that installs Ray is refused (it would replace the image's Ray)."""
    lines = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    packages = [line for line in lines if line]
    for number, line in enumerate(lines, 1):
        if line and re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower() == "ray":
            raise JobError(f"{path}:{number}: installs ray; the cluster's image runs Ray {RAY_VERSION} and a job "
                           "must not install another over it. Remove the line")
    return packages


def passed_env_vars(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    missing = [n for n in names if n not in environ]
    if missing:
        raise JobError(f"--env {missing[0]}: not set in this shell; set it or drop --env {missing[0]}")
    return {n: environ[n] for n in names}


def build_runtime_env(working_dir: str | Path, packages: Sequence[str], *, use_uv: bool = False,
                      env_vars: Mapping[str, str] | None = None, excludes: Sequence[str] = ()) -> dict:
    """The job's runtime_env: the working_dir (uploaded, minus excludes), packages through pip or uv, and the
    named environment variables."""
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes]}
    if packages:
        runtime_env["uv" if use_uv else "pip"] = {"packages": list(packages)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def check_config_paths(args: Sequence[str], working_dir: str | Path) -> None:
    """A ``--config`` on the job's command line must exist here and travel with the working_dir (or be
    absolute, on storage the cluster shares), because the job reads it on the cluster."""
    root = Path(working_dir).resolve()
    for flag, value in zip(args, args[1:], strict=False):
        if flag != "--config":
            continue
        path = Path(value)
        if path.is_absolute():
            continue
        local = (root / path).resolve()
        if not local.is_file():
            raise JobError(f"--config {value}: no such file in the working_dir {root} (the job runs there)")
        if root not in local.parents:
            raise JobError(f"--config {value}: outside the working_dir {root}, so it is not uploaded; move it in "
                           "or give an absolute path on shared storage")


def entrypoint(args: Sequence[str]) -> str:
    """The job's shell command: the package from the uploaded working_dir, whatever the image's PATH holds."""
    return shlex.join(["python", "-m", "lookahead_ray", *args])
