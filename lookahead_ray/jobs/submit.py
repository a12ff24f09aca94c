"""`lookahead-ray submit` and `lookahead-ray jobs`: Ray's Job Submission SDK with the errors a user can act on.

Authentication: Ray 2.60 clusters started with token authentication want ``Authorization: Bearer <token>``
on every dashboard request, and Ray's own client sends it only when ``RAY_AUTH_MODE=token`` is set in the
client's environment. Here the token is looked up the way Ray does (``RAY_AUTH_TOKEN``, the file in
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and sent whenever one exists; a cluster without
authentication ignores it, and a 401/403 becomes one line saying which of the two went wrong.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookahead_ray.errors import JobError
from lookahead_ray.jobs.versions import RAY_VERSION

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LAST_LINES = 20
AGENT_WAIT_S = 120.0


@dataclass
class SubmitRequest:
    """One job: the `lookahead-ray` command to run on the cluster and how to send it."""

    args: list[str]
    runtime_env: dict[str, Any]
    submission_id: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def auth_token(environ: dict[str, str] | None = None) -> str | None:
    """The cluster token, found where Ray looks for it; None when there is none or auth is disabled here."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN"):
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.read_text().strip() or None if path.is_file() else None


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for ``address`` (else ``RAY_ADDRESS``, else the local dashboard).

    Raises:
        JobError: the job SDK is not installed, the address does not answer, or the token is missing or refused.
    """
    try:
        import aiohttp  # noqa: F401  (the job SDK's own dependencies: ray[default])
        import requests  # noqa: F401
        from ray.job_submission import JobSubmissionClient
    except ImportError as error:
        raise JobError(f"submitting jobs needs Ray's job SDK ({error.name} is missing): "
                       f"pip install 'ray[default]=={RAY_VERSION}'") from error
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return _call(lambda: JobSubmissionClient(address, headers=headers), address, token)


def _call(action: Callable[[], Any], address: str, token: str | None) -> Any:
    """Run one SDK call, turning its connection and authentication failures into one-line JobErrors."""
    from ray.exceptions import AuthenticationError

    try:
        return action()
    except AuthenticationError as error:
        if token is None:
            raise JobError(f"{address} requires a Ray auth token and none was found: set RAY_AUTH_TOKEN, or "
                           "copy the head's ~/.ray/auth_token to this machine") from error
        raise JobError(f"{address} refused the auth token (from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / "
                       "~/.ray/auth_token): use the token of that cluster") from error
    except ConnectionError as error:
        raise JobError(f"no Ray dashboard answers at {address}: check --address / RAY_ADDRESS (the dashboard "
                       "port, 8265 by default) and that the cluster is up") from error


def submit(client: Any, request: SubmitRequest) -> str:
    """Submit the job; returns its id."""
    from lookahead_ray.jobs.runtime_env import entrypoint

    command = request.args[0] if request.args else "job"
    job_id = request.submission_id or f"lookahead-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    metadata = {"lookahead_ray_command": " ".join(request.args), **request.metadata}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return _call(lambda: client.submit_job(entrypoint=entrypoint(request.args), runtime_env=request.runtime_env,
                                                   submission_id=job_id, metadata=metadata,
                                                   entrypoint_num_cpus=request.num_cpus,
                                                   entrypoint_num_gpus=request.num_gpus), client.get_address(), None)
        except RuntimeError as error:
            # A head that has just started serves the dashboard before its job agent is up: Ray answers 500
            # "No available agent to submit job, please try again later".
            if "No available agent" not in str(error):
                raise
            if time.monotonic() > deadline:
                raise JobError(f"{client.get_address()}: the cluster's job agent did not come up within "
                               f"{AGENT_WAIT_S:.0f} s; check the head node's dashboard_agent log") from error
            time.sleep(2)


def follow(client: Any, job_id: str, out: Any = None) -> str:
    """Stream the job's logs (to ``out``, default stdout) until it ends; returns its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait_for_end(client, job_id)


def wait_for_end(client: Any, job_id: str, timeout_s: float = 30.0) -> str:
    """The job's terminal status (the log stream can close a moment before the status is final)."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def last_lines(client: Any, job_id: str, count: int = LAST_LINES) -> list[str]:
    return client.get_job_logs(job_id).rstrip("\n").splitlines()[-count:]


def job_rows(jobs: Sequence[Any]) -> list[str]:
    """`jobs list`: one line per job, newest first."""
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        command = (job.metadata or {}).get("lookahead_ray_command") or job.entrypoint
        rows.append(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {started}  {command}")
    return rows
