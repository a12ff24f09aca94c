"""Import hygiene and size: pure modules load without ray, torch, transformers or deepspeed, importing a
package is cheap, and no function grows past ~60 lines without a reason written beside it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lookahead_ray"
PURE = ["lookahead_ray", "lookahead_ray.errors", "lookahead_ray.config", "lookahead_ray.storage", "lookahead_ray.prompts",
        "lookahead_ray.data", "lookahead_ray.data.records", "lookahead_ray.data.preview", "lookahead_ray.data.report",
        "lookahead_ray.train", "lookahead_ray.train.deepspeed_config", "lookahead_ray.train.data_order",
        "lookahead_ray.train.run_guard", "lookahead_ray.tune", "lookahead_ray.tune.objective",
        "lookahead_ray.tune.space", "lookahead_ray.eval", "lookahead_ray.eval.safety", "lookahead_ray.eval.intervals",
        "lookahead_ray.eval.utility", "lookahead_ray.demo", "lookahead_ray.demo.world", "lookahead_ray.demo.compare",
        "lookahead_ray.methods", "lookahead_ray.data.adaptive", "lookahead_ray.data.safety_mix", "lookahead_ray.cli"]
HEAVY = ["ray", "torch", "transformers", "deepspeed"]
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # a function may exceed the limit when this comment says why


def test_pure_modules_do_not_import_heavy_frameworks():
    code = (f"import sys; import {', '.join(PURE)}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"pure modules pulled in: {loaded}"


def test_no_function_is_longer_than_the_limit_without_a_reason():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_MARK not in "\n".join(lines[node.lineno - 1:node.end_lineno]):
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions over the limit with no '# long:' reason: " + "; ".join(too_long)
