"""Faults a person can act on (issue 23): one clear line on the console, exit 2, nothing lost or left behind.
Each case runs the CLI as a user does (a subprocess joined to the tests' local Ray)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ray's C++ core worker writes its own log lines straight to the driver's stderr (not through Python logging).
RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+ \d+\] ")


def run_cli(args: list[str], ray_address: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lookahead_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line and not RAY_CORE_LOG.match(line)]


def _rows(n: int = 30) -> list[bytes]:
    return [json.dumps({"input": f"What is {i} plus {i}?", "output": f"It is {2 * i}."}).encode() for i in range(n)]


@pytest.mark.parametrize(("case", "bad_row", "expected"), [
    ("null answer", json.dumps({"input": "q", "output": None}).encode(),
     "row 18, field 'output': not_a_string: expected a string, got NoneType"),
    ("latin-1 bytes", b'{"input": "caf\xe9", "output": "x"}', "row 18: invalid_utf8"),
    ("prompt too long", json.dumps({"input": "word " * 400, "output": "x"}).encode(),
     "row 18: prompt_too_long: prompt is"),
])
def test_a_bad_row_raised_inside_ray_data_is_one_line_naming_file_row_and_field(ray_local, tmp_path, case, bad_row,
                                                                                 expected):
    rows = _rows()
    rows[17] = bad_row
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "prepared"
    result = run_cli(["prepare", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"data.inputs=[{data}]",
                      "data.on_error=fail", f"data.output_dir={out}"], ray_local.get_runtime_context().gcs_address,
                     tmp_path)
    lines = console_lines(result)
    assert result.returncode == 2, result.stderr
    assert lines == [f"lookahead-ray prepare: error: {data}, {lines[0].split(f'{data}, ', 1)[-1]}"], lines
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()  # nothing written, nothing staged beside it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]
