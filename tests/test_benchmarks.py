"""Every script in benchmarks/ still runs (its --smoke mode: the smallest sizes): a benchmark cannot rot unseen.
The numbers are not checked here; benchmarks are run by hand for those."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
NEEDS_SHARED_DATA = {"preview_throughput.py"}
EXTRA = {"train_throughput.py": [[], ["--layouts"], ["--layouts", "--one-engine", "--lora"]]}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_runs_in_its_smoke_mode(script, tmp_path):
    from conftest import SHARED_DATA

    for extra in EXTRA.get(script, [[]]):
        if (script in NEEDS_SHARED_DATA or "--layouts" in extra) and not SHARED_DATA.exists():
            pytest.skip(f"{SHARED_DATA} is absent (the benchmark reads ../shared/data)")
        args = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", *extra]
        if script == "tune_overhead.py":
            args += ["--out", str(tmp_path / "tune")]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
        result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert "x" in result.stdout.splitlines()[-1] or "ratio" in result.stdout, result.stdout  # it got to its ratios
