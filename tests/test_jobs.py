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
    """`ray start --head --block` in its own process group: stopping it stops this head and nothing else."""
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
    address = f"http://127.0.0.1:{dashboard_port}"
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
    return process, address


def _stop_head(process) -> None:
    """Its process group is this head's raylet, GCS, dashboard and workers; nothing else is touched."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    process, address = _start_head(tmp_path_factory, os.environ.get("RAY_AUTH_MODE", "disabled"))
    yield address
    _stop_head(process)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_follows_a_prepare_job_to_success_and_a_failing_job_exits_non_zero(ray_head, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "prepared"
    argv = ["submit", "--address", ray_head, "--working-dir", str(REPO), "--no-pip", "--submission-id", "ok-prepare",
            "--", "prepare", "--config", "configs/sample_prepare.yaml", f"data.output_dir={out}"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "submit: job ok-prepare" in stdout and "job ok-prepare: SUCCEEDED" in stdout
    assert "rows" in stdout  # the job's own output, followed live
    report = json.loads((out / "prepare_report.json").read_text())  # the job ran on the head and wrote it
    assert report["rows_written"] > 0 and report["rows_rejected"] == 0

    argv = ["submit", "--address", ray_head, "--working-dir", str(REPO), "--no-pip", "--submission-id", "bad-prepare",
            "--", "prepare", "--config", "configs/sample_prepare.yaml", "data.inputs=[/nonexistent/rows.jsonl]"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "job bad-prepare: FAILED" in err and "last log lines" in err and "/nonexistent/rows.jsonl" in err
    assert main(["jobs", "logs", "ok-prepare", "--address", ray_head]) == 0
    assert "rows" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_wait_then_status_list_and_stop(ray_head, tmp_path, capsys):
    from lookahead_ray.cli import main

    argv = ["submit", "--address", ray_head, "--working-dir", str(REPO), "--no-pip", "--no-wait",
            "--submission-id", "long-demo", "--", "demo", "--quick", "--output-dir", str(tmp_path / "demo")]
    assert main(argv) == 0
    assert "lookahead-ray jobs logs long-demo --follow" in capsys.readouterr().out
    assert main(["jobs", "status", "long-demo", "--address", ray_head]) == 0
    assert capsys.readouterr().out.split(": ")[1].strip() in {"PENDING", "RUNNING"}
    assert main(["jobs", "list", "--address", ray_head]) == 0
    assert "long-demo" in capsys.readouterr().out
    assert main(["jobs", "stop", "long-demo", "--address", ray_head]) == 0
    from lookahead_ray.jobs.submit import connect, wait_for_end

    assert wait_for_end(connect(ray_head), "long-demo", timeout_s=60) == "STOPPED"


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

    process, address = _start_head(tmp_path_factory, "token", token="s3cr3t-token-for-the-test-head-0123456789")
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
