"""Real services for the storage tests, started on 127.0.0.1 and stopped by their own process groups.

- :class:`S3Server`: moto's standalone S3 API server (``moto[server]``, which Ray's own storage tests use).
- :class:`TwoNodeCluster`: a Ray head and a second Ray node on this machine; the second runs in its own mount
  namespace with an empty tmpfs over ``hidden``, so, as on a cluster without a shared disk, it cannot read what
  the driver writes there, and has its own node-local cache (``LOOKAHEAD_RAY_CACHE`` points inside ``hidden``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, what: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:  # a test's own Ray node or server: nothing of it is kept, so a short grace (ray stop's own is 10 s+)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class S3Server:
    """moto_server on a free port; ``env`` is what a client needs (pyarrow and Ray read it)."""

    def __init__(self, port: int, log: Path):
        # The server installed beside this Python first: another moto_server on PATH (a system-wide, older moto)
        # may not speak the S3 protocol pyarrow's SDK speaks.
        beside = Path(sys.executable).parent / "moto_server"
        binary = str(beside) if beside.exists() else shutil.which("moto_server") or str(beside)
        self.port, self.endpoint = port, f"http://127.0.0.1:{port}"
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_port(port, "moto_server", self.process)

    def create_bucket(self, name: str) -> str:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=30).read()
        return f"s3://{name}"

    def stop(self) -> None:
        _stop(self.process)
        self.log.close()


class TwoNodeCluster:
    """A Ray head (1 CPU) and a second node (1 CPU) that cannot see ``hidden``; ``address`` for RAY_ADDRESS."""

    def __init__(self, hidden: Path, logs: Path, env: dict[str, str]):
        self.hidden, self.port = hidden, free_port()
        self.address = f"127.0.0.1:{self.port}"
        hidden.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
                    "LOOKAHEAD_RAY_CACHE": str(hidden / "node-cache")}
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--num-cpus", "1", "--block", "--disable-usage-stats"]
        # Their own temp dirs: `ray start --head` records the cluster in its temp dir, where a plain ray.init() in
        # the test process would otherwise find it and join it instead of starting the session's local Ray. Short
        # paths: Ray's sockets live there (AF_UNIX paths stop at 107 bytes).
        self.temp_dirs = [tempfile.mkdtemp(prefix="lkr-head-"), tempfile.mkdtemp(prefix="lkr-node-")]
        self.head = subprocess.Popen(
            [ray, "start", "--head", "--temp-dir", self.temp_dirs[0], "--port", str(self.port),
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
             *common], env=self.env, stdout=open(logs / "head.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        self.worker = None
        try:
            _wait_for_port(self.port, "the Ray head", self.head)
            join = " ".join([ray, "start", "--address", self.address, "--temp-dir", self.temp_dirs[1], *common])
            self.worker = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "bash", "-c",
                 f"mount -t tmpfs tmpfs {hidden} && exec {join}"], env=self.env,
                stdout=open(logs / "worker-node.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                start_new_session=True)
            self._wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise

    def _wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        script = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the second Ray node exited with {self.worker.returncode}")
            out = subprocess.run([sys.executable, "-c", script], env={**self.env, "RAY_ADDRESS": self.address},
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} alive nodes in {timeout} s")

    def worker_node_processes(self) -> list:
        """Every process of the second node: those in its mount namespace (``ray start`` detaches the raylet, so
        they are not all its children)."""
        import psutil

        theirs = os.readlink(f"/proc/{self.worker.pid}/ns/mnt")
        found = []
        for proc in psutil.process_iter():
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/mnt") == theirs:
                    found.append(proc)
            except OSError:
                continue
        return found

    def stop(self) -> None:
        _stop(self.worker)
        _stop(self.head)
        for directory in self.temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def unshare_works() -> str | None:
    """None when a private mount namespace with a tmpfs can be made here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = Path("/tmp") / f"lookahead-unshare-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c",
                                 f"mount -t tmpfs tmpfs {probe}"], capture_output=True, text=True, timeout=30)
    finally:
        probe.rmdir()
    return None if result.returncode == 0 else f"cannot make a mount namespace here: {result.stderr.strip()}"
