"""Every script in benchmarks/ still runs (its --smoke mode: the smallest sizes): a benchmark cannot rot unseen.
Each variant is a case of its own (a skipped one hides no other), joined to the session's Ray through RAY_ADDRESS
as a user's script on a cluster would be. The numbers are not checked here; benchmarks are run by hand for those."""

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
CASES = [pytest.param(script, extra, id=" ".join([script, *extra])) for script in SCRIPTS
         for extra in EXTRA.get(script, [[]])]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("script, extra", CASES)
def test_every_benchmark_runs_in_its_smoke_mode(script, extra, ray_local, tmp_path):
    from conftest import SHARED_DATA

    if (script in NEEDS_SHARED_DATA or "--layouts" in extra) and not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (the benchmark reads ../shared/data)")
    args = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", *extra]
    if script == "tune_overhead.py":
        args += ["--out", str(tmp_path / "tune")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "x" in result.stdout.splitlines()[-1] or "ratio" in result.stdout, result.stdout  # it got to its ratios
