"""Import hygiene: the pure modules load without ray, torch, transformers or deepspeed."""

from __future__ import annotations

import subprocess
import sys

PURE = ["lookahead_ray.config", "lookahead_ray.records", "lookahead_ray.preview", "lookahead_ray.cli"]
HEAVY = ["ray", "torch", "transformers", "deepspeed"]


def test_pure_modules_do_not_import_heavy_frameworks():
    code = (f"import sys; import {', '.join(PURE)}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"pure modules pulled in: {loaded}"
