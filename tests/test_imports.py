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
        "lookahead_ray.train.run_guard", "lookahead_ray.train.layout", "lookahead_ray.tune", "lookahead_ray.tune.objective",
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


STAGES = ["data", "train", "eval", "tune", "demo", "jobs", "cli", "__main__"]
"""The pipeline's order: a stage may import the stages before it and the core (config, storage, errors, ...), never
one after it; the core imports no stage."""


def _imports() -> dict[str, set[str]]:
    """Every package-internal import of every module, at module level or inside a function."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lookahead_ray"):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)  # `from package import module`
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("lookahead_ray"))
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def _stage(module: str) -> int | None:
    name = module.split(".")[1] if "." in module else ""
    return STAGES.index(name) if name in STAGES else None


def test_the_imports_have_no_cycle_and_no_arrow_back_up_the_pipeline():
    graph = _imports()
    backwards = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
                 if _stage(t) is not None and (_stage(m) is None or _stage(t) > _stage(m))]
    assert not backwards, backwards
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
