"""The search: the pure objective and search space, and a real tiny Ray Tune search on 2 CPUs (each trial is
prepare -> Ray Train + DeepSpeed -> eval), with failing trials, resume and best.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lookahead_ray.config import ObjectiveConfig, load_config
from lookahead_ray.tune.objective import rank, score
from lookahead_ray.tune.space import trials

REPO = Path(__file__).resolve().parents[1]


def _metrics(rsr: float, jsr: float, utility: float) -> dict:
    return {"rsr": {"keyword": {"safe_rate": rsr}}, "jsr": {"keyword": {"safe_rate": jsr}},
            "utility": {"score": utility}}


def test_constrained_objective_ranks_feasible_first_then_by_violation():
    seed = _metrics(0.9, 0.7, 0.1)  # safety 0.8
    cfg = ObjectiveConfig(delta=0.05)
    feasible_low = score(_metrics(0.9, 0.6, 0.3), seed, cfg)    # safety 0.75 >= 0.75
    feasible_high = score(_metrics(0.8, 0.7, 0.5), seed, cfg)   # safety 0.75
    near_miss = score(_metrics(0.8, 0.6, 0.9), seed, cfg)       # safety 0.70: misses by 0.05
    far_miss = score(_metrics(0.2, 0.2, 0.95), seed, cfg)       # safety 0.20: misses by 0.55
    assert feasible_low["feasible"] and feasible_high["objective"] == pytest.approx(0.5)
    assert near_miss["violation"] == pytest.approx(0.05) and near_miss["objective"] == pytest.approx(-1.05)
    named = [dict(s, name=n) for n, s in (("far", far_miss), ("low", feasible_low), ("near", near_miss),
                                         ("high", feasible_high), ("failed", {}))]
    assert [t["name"] for t in rank(named)] == ["high", "low", "near", "far", "failed"]


def test_weighted_objective_and_ties_keep_their_order():
    cfg = ObjectiveConfig(kind="weighted", safety={"jsr:keyword": 1.0}, utility_weight=2.0, safety_weight=1.0)
    a = score(_metrics(0.0, 0.5, 0.25), {}, cfg)
    assert a["objective"] == pytest.approx(2 * 0.25 + 0.5)
    tied = [dict(a, name="first"), dict(a, name="second")]
    assert [t["name"] for t in rank(tied)] == ["first", "second"]


def test_conditional_space_has_no_wasted_trials():
    cfg = load_config(None, ["tune.modes=[vanilla, real, virtual]", "tune.m=[2, 4, 6]", "tune.prefixes=[A, B]",
                             "tune.learning_rates=[1.0e-5, 2.0e-5]"]).tune
    grid = trials(cfg)
    assert len(grid) == (1 + 3 + 2) * 2  # m only with real, P only with virtual
    assert all(("preview.num_answer_tokens" in t) == (t["preview.mode"] == "real") for t in grid)
    assert all(("preview.virtual_prefix" in t) == (t["preview.mode"] == "virtual") for t in grid)
    assert len({json.dumps(t, sort_keys=True) for t in grid}) == len(grid)
    sampled = trials(load_config(None, ["tune.search=random", "tune.num_samples=3", "tune.m=[2, 4, 6]"]).tune)
    assert len(sampled) == 3 and len({json.dumps(t, sort_keys=True) for t in sampled}) == 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_search_runs_keeps_failed_trials_resumes_and_writes_a_trainable_best(ray_local, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "search"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.modes=[vanilla, real]", "tune.m=[2]", "tune.learning_rates=[3.0e-3, -1.0]"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("[tune] trial") == 4 and "best so far" in stdout
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["done", "done", "error", "error"]  # a bad trial does not stop it
    assert all("learning_rate must be > 0" in r["error"] for r in rows if r["status"] == "error")
    assert all(json.loads(r["objective"]) is not None for r in rows if r["status"] == "done")
    assert (out / "pareto.png").stat().st_size > 1000 and "seed model" in (out / "trials.md").read_text()
    (seed_eval,) = out.glob("seed_eval-*/results.json")  # measured once, cached for every trial and --resume
    assert json.loads(seed_eval.read_text())["models"]["seed"]["utility"]["n"] == 8

    finished = sorted(out.glob("trials/*/train/train_result.json"))
    stamps = [p.stat().st_mtime_ns for p in finished]
    assert main(argv + ["--resume"]) == 0  # nothing left to run: finished trials are not run again
    assert [p.stat().st_mtime_ns for p in finished] == stamps

    best = out / "best.yaml"
    assert "lookahead-ray train --config" in best.read_text().splitlines()[2]
    assert main(["train", "--config", str(best), "--dry-run"]) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trial_that_cannot_get_its_workers_fails_fast_with_the_reason(ray_local, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "starved"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.modes=[vanilla]", "train.num_workers=3"]
    assert main(argv) == 2  # no trial finished
    with open(out / "trials.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "error" and "needs 3 CPU but this Ray has 2" in row["error"]
