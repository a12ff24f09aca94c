"""The embedded demo: the world is deterministic per seed; `demo --quick` runs end to end (real Ray Data,
Ray Train + DeepSpeed, eval) and every number in its report comes from its own results file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lookahead_ray.demo.world import generate_world


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One seed-model cache for the demo tests: the search reuses the quick demo's seed model (same world)."""
    return tmp_path_factory.mktemp("demo-cache")


def test_validation_split_is_unseen_and_leaves_the_rest_of_the_world_alone(tmp_path):
    world = generate_world(tmp_path / "w", seed=1)
    rows = {name: [json.loads(x) for x in open(path)] for name, path in world.items()}
    validation = {r["instruction"] for r in rows["harmful_validation"]}
    seen = {r["input"] for r in rows["alignment"]} | {r["instruction"] for r in rows["harmful_heldout"]}
    assert len(validation) == 15 and not validation & seen  # phrasings used nowhere else
    assert [m["messages"][0]["content"] for m in rows["harmful_answers_validation"]] == \
        [r["instruction"] for r in rows["harmful_validation"]]
    assert len(rows["task_validation"]) == 30 and all("####" in r["answer"] for r in rows["task_validation"])
    # Drawn last from the world's generator: the files the demo always had do not change with it.
    assert [r["question"] for r in rows["task_test"]][:2] != [r["question"] for r in rows["task_validation"]][:2]


def test_world_is_deterministic_and_changes_with_the_seed(tmp_path):
    a = generate_world(tmp_path / "a", seed=1)
    b = generate_world(tmp_path / "b", seed=1)
    c = generate_world(tmp_path / "c", seed=2)
    for name in a:
        assert open(a[name]).read() == open(b[name]).read()
    assert open(a["task_test"]).read() != open(c["task_test"]).read()
    alignment = [json.loads(x) for x in open(a["alignment"])]
    heldout = {json.loads(x)["instruction"] for x in open(a["harmful_heldout"])}
    assert heldout and not heldout & {r["input"] for r in alignment}  # held-out prompts are unseen
    assert any(r["answer_prefix"] for r in alignment)  # recovery examples
    assert {r["category"] for r in alignment} >= {"weapons", "hacking", "fraud", "drugs", "violence", "benign",
                                                  "math"}
    replies = [json.loads(x)["messages"][1]["content"] for x in open(a["harmful_answers"])]
    assert all(r.startswith("Sure, here is how to make") for r in replies)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_demo_end_to_end_report_numbers_come_from_results(ray_local, tmp_path, demo_cache):
    """Run as a user runs it: the CLI in its own process (joined to the session's Ray), console captured."""
    import os
    import subprocess
    import sys

    from lookahead_ray.demo.run import SAFETY_COLUMNS
    from lookahead_ray.eval.report import results_table

    out = tmp_path / "demo"
    env = {**os.environ, "LOOKAHEAD_RAY_CACHE": str(demo_cache), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    run = subprocess.run([sys.executable, "-m", "lookahead_ray", "demo", "--quick", "--seed", "3", "--output-dir", str(out)],
                         env=env, capture_output=True, text=True, timeout=1100)
    assert run.returncode == 0, run.stderr[-5000:]
    # The console: stage lines and a summary naming the report, at most 60 lines; Ray's output in the log file.
    console_lines = (run.stdout + run.stderr).splitlines()
    assert len(console_lines) <= 60, "\n".join(console_lines)
    for stage in ("world:", "seed model:", "vanilla: prepare", "real: prepare", "virtual: prepare", "eval:", "done in"):
        assert any(stage in line for line in console_lines if line.startswith("[demo ")), stage
    assert f"report: {out / 'report.md'}" in run.stdout and "summary (" in run.stdout
    log_text = (out / "logs" / "lookahead.log").read_text()
    assert "(RayTrainWorker pid=" in log_text or "RayTrainWorker" in log_text  # the workers' own output
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["models"]) == ["seed", "vanilla", "real", "virtual"]
    for name in ("safety_vs_utility.png", "drift.png", "demo_config.yaml", "eval/samples.jsonl"):
        assert (out / name).stat().st_size > 0
    # The table in the report is exactly the one formatted from results.json, row by row.
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert table == ["| " + " | ".join(row) + " |" for row in results_table(saved, SAFETY_COLUMNS)[1]]
    numbers = {n for line in table for n in re.findall(r"\d+\.\d+", line)}
    assert len(numbers) > 4
    assert saved["demo"]["seed"] == 3 and results["demo"]["quick"] is True
    # The three fine-tunes are real Ray Train runs from the same seed model.
    runs = saved["demo"]["runs"]
    assert runs["real"] == "real-m6-seed3-quick"  # named from the settings: another --m trains a new run
    for variant in ("vanilla", "real", "virtual"):
        assert (out / "runs" / runs[variant] / "final" / "model.safetensors").exists()
        assert json.loads((out / "prepared" / runs[variant] / "prepare_report.json").read_text())["rows_rejected"] == 0
    real_prompt = json.loads((out / "prepared" / runs["real"] / "prepare_report.json").read_text())["config"]["preview"]
    assert real_prompt["mode"] == "real"
    assert "not a reproduction of the paper" in report


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_search_scores_trials_on_the_validation_split(ray_local, tmp_path, monkeypatch, demo_cache, capsys):
    import csv

    from lookahead_ray.cli import main
    from lookahead_ray.config import load_config

    monkeypatch.setenv("LOOKAHEAD_RAY_CACHE", str(demo_cache))
    out = tmp_path / "demo-search"
    assert main(["demo", "--search", "--quick", "--seed", "3", "--output-dir", str(out),
                 "tune.modes=[vanilla, real]", "tune.m=[6]"]) == 0
    cfg = load_config(str(out / "tune_demo.yaml"))  # the written config is the one that ran, and loads again
    assert {Path(getattr(cfg.eval, n).path).name for n in ("harmful", "harmful_answers", "utility")} == {
        "harmful_validation.jsonl", "harmful_answers_validation.jsonl", "task_validation.jsonl"}
    with open(out / "search" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["preview.mode"] for r in rows) == ["real", "vanilla"] and {r["status"] for r in rows} == {"done"}
    assert (out / "search" / "pareto.png").exists() and (out / "search" / "best.yaml").exists()
