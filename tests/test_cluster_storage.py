"""Two Ray nodes that share no disk (the second cannot see a directory of the driver's machine) and one real S3
API server: the bucket-only path end to end, and the preflight that stops a head-local run directory at once.

The second node runs in its own mount namespace with an empty tmpfs over ``hidden`` (see ``services``): what the
driver writes there does not exist on that node, exactly as on a cluster without NFS. Each node's cache
(``LOOKAHEAD_RAY_CACHE``) lies inside ``hidden``, so each node has its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lookahead_ray import storage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    from services import TwoNodeCluster, unshare_works

    why_not = unshare_works()
    if why_not:
        pytest.skip(f"a node without the driver's disk needs a private mount namespace (root): {why_not}")
    root = tmp_path_factory.mktemp("two-nodes")
    started = time.perf_counter()
    nodes = TwoNodeCluster(root / "hidden", root / "logs", dict(os.environ))
    nodes.start_seconds = time.perf_counter() - started
    try:
        yield nodes
    finally:
        nodes.stop()


def _cli(cluster, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    return subprocess.run([sys.executable, "-m", "lookahead_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_run_directory_only_the_head_sees_fails_at_once_naming_the_node(cluster, tmp_path):
    run_dir = cluster.hidden / "head-only-run"  # on the driver's machine; the second node has an empty tmpfs there
    started = time.perf_counter()
    inputs = f"data.inputs=[{REPO / 'examples' / 'sample_tasks.jsonl'}]"
    result = _cli(cluster, ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", str(run_dir),
                            inputs, "train.cpus_per_worker=1"], tmp_path, timeout=300)
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) <= 5, result.stderr[-3000:]
    assert re.search(rf"train.output_dir: {run_dir} \(a local path\) is not visible on node \S+ \(node id "
                     r"[0-9a-f]{8}: not found there\)", errors[0]), errors[0]
    assert "s3://" in errors[0] and "shared volume" in errors[0]
    assert not list(run_dir.glob("prepared_*")) and not list(run_dir.glob("run_*.json"))  # no work started
    assert not [p for p in run_dir.rglob("*") if ".lookahead-probe" in p.name]  # the probe is cleaned up
    print(f"preflight failed in {seconds:.1f} s: {errors[0]}")

    dry = _cli(cluster, ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", str(run_dir),
                         inputs, "--dry-run"], tmp_path, timeout=300)
    assert dry.returncode == 2 and "is not visible on node" in dry.stdout, dry.stdout[-3000:]
    shutil.rmtree(run_dir)  # the next test checks nothing but the nodes' caches is left on this disk


def _checkpoint_registered(run: str) -> bool:
    snapshot = storage.join(run, "tiny_cpu", "checkpoint_manager_snapshot.json")
    try:
        return "checkpoint_dir_name" in storage.read_text(snapshot)
    except (FileNotFoundError, OSError):
        return False


def test_bucket_only_run_prepare_train_export_eval_across_two_nodes_and_a_killed_worker(cluster, s3, tmp_path):
    """prepare -> train (2 workers, one per node, ZeRO-2) -> export -> eval with every location in the bucket; a
    worker on the second node is killed after the first checkpoint and the resumed run trains exactly the batches
    of an uninterrupted one."""
    import psutil

    base = f"{s3}/e2e"
    data = f"{base}/data/sample_tasks.jsonl"
    storage.upload_file(str(REPO / "examples" / "sample_tasks.jsonl"), data)
    for name in ("harmful.jsonl", "harmful_replies.jsonl", "math.jsonl"):
        storage.upload_file(str(REPO / "examples" / "eval" / name), f"{base}/eval_sets/{name}")
    run, workdir = f"{base}/run", tmp_path / "cwd"
    workdir.mkdir()
    killed: list[int] = []

    def kill_a_worker_on_the_second_node() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not _checkpoint_registered(run):
            time.sleep(0.5)
        for proc in cluster.worker_node_processes():
            with contextlib.suppress(psutil.Error):
                if any("RayTrainWorker" in part for part in proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
                    return

    killer = threading.Thread(target=kill_a_worker_on_the_second_node, daemon=True)
    killer.start()
    started = time.perf_counter()
    train = _cli(cluster, ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", run,
                           f"data.inputs=[{data}]", "train.cpus_per_worker=1", "train.checkpoint_every_steps=10",
                           "train.max_steps=60", "train.max_failures=2"], workdir)
    train_seconds = time.perf_counter() - started
    killer.join(timeout=5)
    assert train.returncode == 0, train.stderr[-4000:]
    assert killed, "no Ray Train worker ran on the second node"
    assert psutil.pid_exists(killed[0]) is False or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE

    result = json.loads(storage.read_text(f"{run}/train_result.json"))
    assert result["step"] == 60 and result["resumed_from_step"] in (10, 20, 30, 40, 50)
    assert result["checkpoint_dir"].startswith(f"{run}/tiny_cpu/checkpoint_")  # the scheme is kept
    assert result["export_check_passed"] is True
    assert result["checkpoints_written_in_place"] is False  # an object store: staged on the node, then uploaded
    from test_training import _expected_data_sha

    assert result["data_sha"] == _expected_data_sha(f"{run}/prepared_tiny_cpu", steps=60, world_size=2,
                                                    micro_batch_size=4, seed=0)
    final = f"{run}/final"
    assert storage.is_complete(final, "lookahead_config.yaml")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {storage.name(f) for f in storage.list_files(final)}
    assert any("tfevents" in f for f in storage.list_files(f"{run}/tensorboard/tiny_cpu"))
    assert "lookahead-ray train" in storage.read_text(f"{run}/logs/lookahead.log")
    assert f"model (Hugging Face): {final}" in train.stdout

    started = time.perf_counter()
    evaluation = _cli(cluster, ["eval", "--config", str(REPO / "configs" / "eval_tiny_cpu.yaml"), "--model",
                                f"tuned={final}", "--output-dir", f"{base}/eval", "eval.cpus_per_actor=1",
                                f"eval.harmful.path={base}/eval_sets/harmful.jsonl",
                                f"eval.harmful_answers.path={base}/eval_sets/harmful_replies.jsonl",
                                f"eval.utility.path={base}/eval_sets/math.jsonl"], workdir)
    eval_seconds = time.perf_counter() - started
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    results = json.loads(storage.read_text(f"{base}/eval/results.json"))
    assert 0.0 <= results["models"]["tuned"]["rsr"]["keyword"]["safe_rate"] <= 1.0
    assert "| tuned |" in storage.read_text(f"{base}/eval/report.md")

    # Nothing was written outside the bucket but the nodes' caches (and Ray's own session directory).
    assert not list(workdir.iterdir())
    assert sorted(p.name for p in cluster.hidden.iterdir()) == ["node-cache"]
    print(f"two nodes: cluster start {cluster.start_seconds:.0f} s, train (prepare, 60 steps, a worker killed on "
          f"node 2, export) {train_seconds:.0f} s, eval {eval_seconds:.0f} s; bucket: "
          f"{len(storage.list_files(base))} objects")
