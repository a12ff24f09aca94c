"""Cluster jobs: the pure runtime_env builder, and `lookahead-ray submit` / `jobs` against a real Ray head that
this module starts (`ray start --head --block` with the dashboard's job server) and stops (only that head)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookahead_ray.errors import JobError
from lookahead_ray.jobs import runtime_env as env
from lookahead_ray.jobs.submit import auth_token
from lookahead_ray.jobs.versions import DEEPSPEED_VERSION, TORCH_VERSION

REPO = Path(__file__).resolve().parents[1]


def test_runtime_env_uploads_the_project_without_environments_outputs_or_weights(tmp_path):
    for name in ("lookahead_ray/a.py", "configs/x.yaml", ".venv/lib/big.so", "out/run/model.safetensors",
                 ".git/objects/pack", "sub/__pycache__/a.pyc", "weights/model.bin", "data/keep.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x" * 10)
    scan = env.check_upload(tmp_path, ["data"])
    assert scan.files == 2 and scan.total_bytes == 20  # lookahead_ray/a.py and configs/x.yaml only
    runtime_env = env.build_runtime_env(tmp_path, ["transformers>=4.57"], env_vars={"HF_HOME": "/mnt/hf"},
                                        excludes=["data"])
    assert runtime_env["working_dir"] == str(tmp_path) and runtime_env["excludes"][-1] == "data"
    assert runtime_env["pip"] == {"packages": ["transformers>=4.57"]} and runtime_env["env_vars"] == {"HF_HOME": "/mnt/hf"}
    assert "uv" in env.build_runtime_env(tmp_path, ["x"], use_uv=True) and "env_vars" not in env.build_runtime_env(
        tmp_path, [])


def test_upload_over_rays_limit_is_refused_and_large_files_are_named(tmp_path):
    with open(tmp_path / "shards.tar", "wb") as f:
        f.truncate(env.UPLOAD_LIMIT_BYTES + 1)  # sparse: the size counts, not the disk
    with pytest.raises(JobError, match=r"over Ray's 100 MiB limit; largest: shards.tar \(100 MiB\)"):
        env.check_upload(tmp_path)
    assert env.check_upload(tmp_path, ["*.tar"]).files == 0


def test_only_named_environment_variables_travel_and_ray_is_never_reinstalled(tmp_path):
    assert env.passed_env_vars(["HF_HOME"], {"HF_HOME": "/x", "AWS_SECRET_ACCESS_KEY": "s"}) == {"HF_HOME": "/x"}
    with pytest.raises(JobError, match="--env WANDB_API_KEY: not set"):
        env.passed_env_vars(["WANDB_API_KEY"], {})
    requirements = tmp_path / "req.txt"
    requirements.write_text("transformers==5.0  # models\n\nray[train]==2.40\n")
    with pytest.raises(JobError, match=r"req.txt:3: installs ray"):
        env.read_requirements(requirements)
    packages = env.project_requirements(["ray[default,data,train,tune]>=2.50", "deepspeed>=0.16", "torch>=2.4",
                                         "pytest>=8; extra == 'dev'"])
    assert packages == [f"deepspeed=={DEEPSPEED_VERSION}", f"torch=={TORCH_VERSION}"]


def test_config_on_the_command_line_must_travel_with_the_working_dir(tmp_path):
    (tmp_path / "proj" / "configs").mkdir(parents=True)
    (tmp_path / "proj" / "configs" / "a.yaml").write_text("{}")
    (tmp_path / "elsewhere.yaml").write_text("{}")
    env.check_config_paths(["train", "--config", "configs/a.yaml"], tmp_path / "proj")
    env.check_config_paths(["train", "--config", "/mnt/shared/b.yaml"], tmp_path / "proj")  # shared storage
    with pytest.raises(JobError, match="no such file in the working_dir"):
        env.check_config_paths(["train", "--config", "configs/missing.yaml"], tmp_path / "proj")
    with pytest.raises(JobError, match="outside the working_dir"):
        env.check_config_paths(["train", "--config", "../elsewhere.yaml"], tmp_path / "proj")


def test_auth_token_is_found_where_ray_looks_and_never_sent_when_auth_is_disabled(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    assert auth_token({"RAY_AUTH_TOKEN": "t1", "HOME": str(tmp_path)}) == "t1"
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}) == "abc"
    assert auth_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t1"}) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(tmp_path_factory, auth_mode: str, token: str | None = None):
    """`ray start --head --block` (2 CPUs) in its own process group: stopping it stops this head and nothing else.
    Returns the process, the dashboard's URL (jobs) and the GCS address (RAY_ADDRESS)."""
    temp_dir = tmp_path_factory.mktemp("head")
    head_env = {**os.environ, "RAY_AUTH_MODE": auth_mode,
                # the cluster's python is this environment's (an image's, on a real cluster)
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head_env.pop("RAY_ADDRESS", None)
    if token:
        head_env["RAY_AUTH_TOKEN"] = token
    ray_cli = str(Path(sys.executable).parent / "ray")
    # Every port of its own: the session's local Ray (ray_local) already holds the defaults, and a head whose
    # dashboard agent cannot bind 52365 answers every job submission with "No available agent".
    ports = [f"--{name}={_free_port()}" for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                     "metrics-export-port", "ray-client-server-port")]
    dashboard_port = int(ports[1].split("=")[1])
    process = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", *ports, "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=head_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address, gcs = f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{ports[0].split('=')[1]}"
    deadline = time.monotonic() + 120
    import requests

    while True:
        assert process.poll() is None, "ray start --head exited"
        try:
            requests.get(f"{address}/api/version", timeout=2)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(1)
    return process, address, gcs


def _stop_head(process) -> None:
    """Its process group is this head's raylet, GCS, dashboard and workers; nothing else is touched."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU Ray head: ``dashboard`` for jobs, ``gcs`` for RAY_ADDRESS."""
    import types

    process, address, gcs = _start_head(tmp_path_factory, os.environ.get("RAY_AUTH_MODE", "disabled"))
    yield types.SimpleNamespace(dashboard=address, gcs=gcs)
    _stop_head(process)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_follows_a_prepare_job_to_success_and_a_failing_job_exits_non_zero(ray_head, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "prepared"
    argv = ["submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--no-pip",
            "--submission-id", "ok-prepare",
            "--", "prepare", "--config", "configs/sample_prepare.yaml", f"data.output_dir={out}"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "submit: job ok-prepare" in stdout and "job ok-prepare: SUCCEEDED" in stdout
    assert "rows" in stdout  # the job's own output, followed live
    report = json.loads((out / "prepare_report.json").read_text())  # the job ran on the head and wrote it
    assert report["rows_written"] > 0 and report["rows_rejected"] == 0

    argv = ["submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--no-pip",
            "--submission-id", "bad-prepare",
            "--", "prepare", "--config", "configs/sample_prepare.yaml", "data.inputs=[/nonexistent/rows.jsonl]"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "job bad-prepare: FAILED" in err and "last log lines" in err and "/nonexistent/rows.jsonl" in err
    assert main(["jobs", "logs", "ok-prepare", "--address", ray_head.dashboard]) == 0
    assert "rows" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_wait_then_status_list_and_stop(ray_head, tmp_path, capsys):
    from lookahead_ray.cli import main

    argv = ["submit", "--address", ray_head.dashboard, "--working-dir", str(REPO), "--no-pip", "--no-wait",
            "--submission-id", "long-demo", "--", "demo", "--quick", "--output-dir", str(tmp_path / "demo")]
    assert main(argv) == 0
    assert "lookahead-ray jobs logs long-demo --follow" in capsys.readouterr().out
    assert main(["jobs", "status", "long-demo", "--address", ray_head.dashboard]) == 0
    assert capsys.readouterr().out.split(": ")[1].strip() in {"PENDING", "RUNNING"}
    assert main(["jobs", "list", "--address", ray_head.dashboard]) == 0
    assert "long-demo" in capsys.readouterr().out
    assert main(["jobs", "stop", "long-demo", "--address", ray_head.dashboard]) == 0
    from lookahead_ray.jobs.submit import connect, wait_for_end

    assert wait_for_end(connect(ray_head.dashboard), "long-demo", timeout_s=60) == "STOPPED"


def test_bad_addresses_and_commands_are_one_line_errors(capsys):
    from lookahead_ray.cli import main

    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "no Ray dashboard answers at" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:1", "--", "submit"]) == 2
    assert "give the command to run after --" in capsys.readouterr().err
    assert main(["submit", "--working-dir", str(REPO), "--", "train", "--config", "configs/missing.yaml"]) == 2
    assert "no such file in the working_dir" in capsys.readouterr().err


def test_missing_job_sdk_says_what_to_install(monkeypatch, capsys):
    from lookahead_ray.cli import main

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # a machine with ray[data,train,tune] only
    assert main(["jobs", "list", "--address", "http://127.0.0.1:1"]) == 2
    assert "pip install 'ray[default]==" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_token_cluster_without_the_token_is_a_clear_error_and_with_it_works(tmp_path_factory, monkeypatch, capsys):
    from lookahead_ray.cli import main

    process, address, _ = _start_head(tmp_path_factory, "token", token="s3cr3t-token-for-the-test-head-0123456789")
    try:
        monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # no ~/.ray/auth_token
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        assert main(["jobs", "list", "--address", address]) == 2
        assert "requires a Ray auth token and none was found" in capsys.readouterr().err
        monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token-wrong-token-wrong-token-0000")
        assert main(["jobs", "list", "--address", address]) == 2
        assert "refused the auth token" in capsys.readouterr().err
        monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-token-for-the-test-head-0123456789")
        assert main(["jobs", "list", "--address", address]) == 0
        assert "no jobs" in capsys.readouterr().out
    finally:
        _stop_head(process)


STARVED_BOUND_S = 60.0
"""A starved command's whole run: Python and Ray start-up (~10-20 s here) plus cluster.resource_wait_s."""


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_train_tune_and_eval_asking_more_than_a_joined_cluster_has_end_in_seconds_with_one_line(ray_head, tmp_path):
    """Joined through RAY_ADDRESS (as a Ray Job's entrypoint is) to a head with 2 CPUs that cannot grow: each
    command says it waits, then ends non-zero within the bound with one line naming what it asked for and what the
    cluster has."""
    from lookahead_ray.config import load_config
    from lookahead_ray.modeling import build_model, tokenizer_for

    tiny = load_config(REPO / "configs" / "tiny_cpu.yaml")
    tokenizer = tokenizer_for(tiny.model)
    build_model(tiny.model, tokenizer, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    configs = REPO / "configs"
    cases = {
        "train": (["--config", str(configs / "tiny_cpu.yaml"), "train.num_workers=3", "train.cpus_per_worker=1"],
                  15, "train.num_workers / train.cpus_per_worker / train.use_gpu: 3 worker(s) x 1 CPU needs 3 CPU but "
                      "the cluster has 2 after 15 s of waiting"),
        "tune": (["--config", str(configs / "tune_tiny_cpu.yaml"), "tune.modes=[vanilla]", "train.num_workers=2",
                  "train.cpus_per_worker=1", "cluster.resource_wait_s=4"],
                 4, "a trial (0.5 CPU) with 2 worker(s) x 1 CPU needs 2.5 CPU but the cluster has 2 after 4 s"),
        "eval": (["--config", str(configs / "eval_tiny_cpu.yaml"), "--model", str(tmp_path / "model"),
                  "eval.num_actors=1", "eval.cpus_per_actor=3", "cluster.resource_wait_s=4"],
                 4, "eval.num_actors / eval.cpus_per_actor / eval.gpus_per_actor: 1 generation actor(s) x 3 CPU needs "
                    "3 CPU but the cluster has 2 after 4 s of waiting"),
    }
    env = {**os.environ, "RAY_ADDRESS": ray_head.gcs, "PYTHONPATH": str(REPO)}
    for command, (args, wait_s, expected) in cases.items():
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "lookahead_ray", command, *args, "--output-dir",
                                 str(tmp_path / command)], env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if line.startswith("lookahead-ray") or "waiting up to" in line]
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert seconds < STARVED_BOUND_S, (command, seconds)
        assert seconds >= wait_s, (command, seconds)  # it did wait for the cluster to grow
        assert any(f"waiting up to {wait_s} s for the cluster to offer" in line for line in lines), lines
        errors = [line for line in lines if line.startswith(f"lookahead-ray {command}: error: ")]
        assert len(errors) == 1 and expected in errors[0], (command, lines)
        assert "raise cluster.resource_wait_s where the cluster autoscales" in errors[0]
