"""The embedded demo: the world is deterministic per seed; `demo --quick` runs end to end (real Ray Data,
Ray Train + DeepSpeed, eval) and every number in its report comes from its own results file."""

from __future__ import annotations

import json
import re

import pytest

from lookahead_ray.demo.world import generate_world


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
def test_quick_demo_end_to_end_report_numbers_come_from_results(ray_local, tmp_path, monkeypatch):
    from lookahead_ray.demo.run import SAFETY_COLUMNS
    from lookahead_ray.eval.report import results_table

    monkeypatch.setenv("LOOKAHEAD_RAY_CACHE", str(tmp_path / "cache"))
    from lookahead_ray.demo.run import run_demo

    out = tmp_path / "demo"
    results = run_demo(str(out), quick=True, seed=3)
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
