"""The console: stage lines and a summary on the terminal; Ray's and the libraries' output in the run's log file
(``-v`` puts it back on the console); a failure inside a Ray worker shows its last lines and where the rest is.

The CLI runs in a subprocess joined to the session's Ray (``RAY_ADDRESS``), as a user's command would, so Ray's
real worker-output stream and logging handlers are what is tested."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookahead_ray import console

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, ray_address: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lookahead_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def ray_address(ray_local):
    return ray_local.get_runtime_context().gcs_address


def test_training_progress_follows_the_board_that_rank_0_reports_to(ray_local, monkeypatch):
    """The bar reads steps from a Ray actor, not a file on the driver's disk: rank 0 may run on any node."""
    bars = []
    real_progress = console.progress
    monkeypatch.setattr(console, "progress", lambda *args, **kwargs: bars.append(
        real_progress(*args, disable=False, file=io.StringIO())) or bars[-1])
    console.configure(verbose=False)
    try:
        with console.training_progress(10, "train") as seen:
            board = console.progress_board(seen.name)  # what the training loop's rank 0 looks up
            ray_local.get(board.put.remote({"step": 3, "loss": 2.5, "tokens_per_second": 900.0}))
            ray_local.get(board.put.remote({"step": 4, "loss": 2.0, "tokens_per_second": 950.0}))
    finally:
        console.close()
    assert bars[0].n == 4 and "loss=2.000" in str(bars[0]) and seen.step == 4  # what a Ctrl-C line names
    assert console.progress_board(seen.name) is None  # the board is gone with the bar: training would go on without it


def test_each_warning_reaches_the_console_once_and_the_log_file_every_time(tmp_path, capsys):
    console.configure(verbose=False)
    try:
        log_path = console.use_output_dir(tmp_path)
        logger = logging.getLogger("lookahead_ray.data.test")
        for _ in range(3):
            logger.warning("12 rows truncated")
        logging.getLogger("ray.data").warning("a Ray Data warning")  # a library's: log file only
    finally:
        console.close()
    assert capsys.readouterr().err.count("12 rows truncated") == 1
    text = log_path.read_text()
    assert text.count("12 rows truncated") == 3 and "a Ray Data warning" in text
    assert log_path == tmp_path / "logs" / "lookahead.log"


def test_prepare_console_is_short_and_ray_output_goes_to_the_log_unless_verbose(ray_address, tmp_path):
    config = REPO / "configs" / "sample_prepare.yaml"
    quiet = run_cli(["prepare", "--config", str(config), f"data.output_dir={tmp_path / 'a' / 'prepared'}"],
                    REPO, ray_address)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    console_text = quiet.stdout + quiet.stderr
    assert "summary (" in quiet.stdout and "prepare: read" in quiet.stdout
    assert f"log: {tmp_path / 'a' / 'logs' / 'lookahead.log'}" in quiet.stdout
    assert len(console_text.splitlines()) <= 8, console_text
    log_text = (tmp_path / "a" / "logs" / "lookahead.log").read_text()
    assert "ray.data" in log_text  # Ray Data's own records (its plans and "execution finished") are in the file

    verbose = run_cli(["-v", "prepare", "--config", str(config), f"data.output_dir={tmp_path / 'b' / 'prepared'}"],
                      REPO, ray_address)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    verbose_text = verbose.stdout + verbose.stderr
    assert "Dataset" in verbose_text and len(verbose_text.splitlines()) > len(console_text.splitlines())


@pytest.mark.slow
def test_a_failure_inside_a_training_worker_shows_its_last_lines_and_the_log_holds_all(ray_address, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--output-dir", str(out),
                      "train.max_steps=2", "train.max_failures=0",
                      "train.deepspeed_overrides={zero_optimization: {stage: 7}}"], REPO, ray_address)
    assert result.returncode == 1
    log_file = out / "logs" / "lookahead.log"
    assert f"full traceback and Ray's worker output: {log_file}" in result.stderr
    assert "DeepSpeedZeroConfig" in result.stderr  # the worker's error (DeepSpeed rejects stage 7), in the last lines
    assert len(result.stderr.splitlines()) <= console.TRACEBACK_TAIL_LINES + 5, result.stderr
    log_text = log_file.read_text()
    assert "Traceback (most recent call last)" in log_text and "DeepSpeedZeroConfig" in log_text
    assert "pid=" in log_text  # Ray's worker output, routed into the file
