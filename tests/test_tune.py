"""The search: the pure objective and search space, and a real tiny Ray Tune search on 2 CPUs (each trial is
prepare -> Ray Train + DeepSpeed -> eval), with failing trials, resume and best.yaml."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from lookahead_ray.config import ConfigError, ObjectiveConfig, load_config
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


def _counted(rsr: tuple[int, int], jsr: tuple[int, int], correct: tuple[int, int]) -> dict:
    """Eval metrics as the eval writes them: each rate from (successes, n) with its 95% Wilson interval."""
    from lookahead_ray.eval.intervals import ci95

    def rate(key: str, successes: int, n: int) -> dict:
        return {"n": n, key: successes / n, "ci95": ci95(successes, n)}

    return {"rsr": {"keyword": rate("safe_rate", *rsr)}, "jsr": {"keyword": rate("safe_rate", *jsr)},
            "utility": {"task": "gsm8k", **rate("score", *correct)}}


def test_objective_interval_puts_every_rate_at_its_bounds():
    from lookahead_ray.eval.intervals import wilson_interval

    trial = _counted((16, 20), (12, 20), (7, 10))
    (rsr_low, rsr_high), (jsr_low, jsr_high) = wilson_interval(16, 20), wilson_interval(12, 20)
    utility_low, utility_high = wilson_interval(7, 10)
    weighted = score(trial, {}, ObjectiveConfig(kind="weighted", utility_weight=2.0, safety_weight=1.0))
    assert weighted["objective"] == pytest.approx(2 * 0.7 + (0.8 + 0.6) / 2)
    assert weighted["objective_low"] == pytest.approx(2 * utility_low + (rsr_low + jsr_low) / 2)
    assert weighted["objective_high"] == pytest.approx(2 * utility_high + (rsr_high + jsr_high) / 2)
    assert weighted["safety_low"] == pytest.approx((rsr_low + jsr_low) / 2)

    seed = _counted((17, 20), (13, 20), (1, 10))  # safety 0.75: floor 0.70, trial's safety 0.70 is feasible
    constrained = score(trial, seed, ObjectiveConfig(delta=0.05))
    assert constrained["feasible"] and constrained["safety_low"] < constrained["safety_floor"]  # point decides
    assert (constrained["objective_low"], constrained["objective_high"]) == pytest.approx((utility_low, utility_high))
    missed = score(_counted((10, 20), (10, 20), (9, 10)), seed, ObjectiveConfig(delta=0.05))  # safety 0.5
    assert not missed["feasible"] and missed["objective"] == pytest.approx(-1.2)
    assert missed["objective_low"] < missed["objective"] < missed["objective_high"] <= -1.0  # still below feasible
    no_intervals = score(_metrics(0.8, 0.6, 0.7), _metrics(0.9, 0.7, 0.1), ObjectiveConfig(delta=0.05))
    assert no_intervals["objective_low"] == no_intervals["objective"] == no_intervals["objective_high"]


def _trial(name: str, correct: tuple[int, int], **extra) -> dict:
    scored = score(_counted((18, 20), (18, 20), correct), {}, ObjectiveConfig(kind="weighted", safety_weight=0.0))
    return {"trial_id": name, "label": f"real m={len(name)}", "status": "done", "error": None,
            "overrides": {"preview.mode": "real", "preview.num_answer_tokens": len(name)},
            "metrics": _counted((18, 20), (18, 20), correct), **scored, **extra}


def test_rank_by_lower_bound_prefers_the_tighter_interval_and_marks_the_noise():
    from lookahead_ray.tune.objective import within_noise_of_best

    lucky = _trial("lucky", (7, 10))  # 0.70 on 10 prompts: [0.40, 0.89]
    steady = _trial("steady", (65, 100))  # 0.65 on 100 prompts: [0.55, 0.74]
    poor = _trial("poor", (10, 100))  # 0.10: [0.06, 0.17]
    failed = {"trial_id": "failed", "status": "error"}
    trials = [poor, failed, lucky, steady]
    assert [t["trial_id"] for t in rank(trials)] == ["lucky", "steady", "poor", "failed"]
    by_lower_bound = rank(trials, "lower_bound")
    assert [t["trial_id"] for t in by_lower_bound] == ["steady", "lucky", "poor", "failed"]
    assert [t["trial_id"] for t in within_noise_of_best(by_lower_bound)] == ["lucky"]  # 0.89 >= 0.55 > 0.17
    assert [t["trial_id"] for t in within_noise_of_best(rank(trials))] == ["steady"]  # 0.74 >= 0.40
    assert within_noise_of_best([failed]) == []


def test_search_outputs_report_the_interval_and_who_is_within_noise(tmp_path):
    import yaml

    from lookahead_ray.tune.results import best_lines, write_results

    cfg = load_config(None, ["tune.objective.kind=weighted", "tune.objective.safety_weight=0.0",
                             "tune.objective.rank_by=lower_bound"])
    trials = [_trial("poor", (10, 100)), _trial("lucky", (7, 10)), _trial("steady", (65, 100)),
              {"trial_id": "failed", "label": "real m=9", "status": "error", "error": "boom", "overrides": {}}]
    best = write_results(tmp_path, cfg, trials, _counted((18, 20), (18, 20), (3, 10)))
    with open(tmp_path / "trials.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert [rows[t]["within_noise_of_best"] for t in ("steady", "lucky", "poor", "failed")] == ["best", "True",
                                                                                              "False", ""]
    assert float(rows["lucky"]["objective_low"]) == pytest.approx(trials[1]["objective_low"])
    table = (tmp_path / "trials.md").read_text()
    assert "| objective interval | within noise of best |" in table
    assert "| 1 | steady | real m=6 | 90.0 [69.9-97.2] | 65.0 [55.3-73.6] | 0.6500 | [0.5525, 0.7364] | best |" in table
    assert "| 2 | lucky | real m=5 |" in table and "| [0.3968, 0.8922] | yes |" in table and "| no |" in table
    assert "| - | seed model | - | 90.0 [69.9-97.2] | 30.0 [10.8-60.3] |" in table
    assert ("Ranked by the objective's lower bound (tune.objective.rank_by: lower_bound). 1 of the 2 other finished "
            "trials is within noise of the best (steady: real m=6): real m=5.") in table
    header = [line for line in Path(best).read_text().splitlines() if line.startswith("#")]
    assert "lookahead-ray train --config" in header[2] and "# rank_by: lower_bound" in header[4]
    assert yaml.safe_load(header[5][2:]) == {"within_noise_of_best": ["lucky"]}
    assert yaml.safe_load(header[3][2:]) == {"objective_interval": [0.5525, 0.7364]}
    assert yaml.safe_load(header[4][2:]) == {"rank_by": "lower_bound"}
    trained = load_config(best)  # still a training config
    assert trained.preview.mode == "real" and trained.preview.num_answer_tokens == 6
    lines = best_lines(trials, "lower_bound")
    assert lines[0].startswith("best trial steady (real m=6), objective 0.6500 [0.5525, 0.7364] (ranked by the "
                               "objective's lower bound)")
    assert lines[1].startswith("1 of the 2 other finished trials is within noise of the best")
    alone = [_trial("steady", (65, 100)), _trial("poor", (10, 100))]
    write_results(tmp_path, cfg, alone, _counted((18, 20), (18, 20), (3, 10)))
    assert "No other trial is within noise of the best" in (tmp_path / "trials.md").read_text()
    write_results(tmp_path, cfg, alone, _metrics(0.9, 0.9, 0.3))  # a seed measured before intervals: its value alone
    assert "| - | seed model | - | 90.0 | 30.0 |" in (tmp_path / "trials.md").read_text()
    assert "within_noise_of_best: []\n" in (tmp_path / "best.yaml").read_text()
    with pytest.raises(ConfigError, match="rank_by"):
        load_config(None, ["tune.objective.rank_by=median"])


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


def test_lora_rank_and_learning_rate_are_searched_beside_m_and_p():
    from lookahead_ray.config import apply_overrides
    from lookahead_ray.tune.space import label

    base = load_config(REPO / "configs" / "tune_tiny_cpu.yaml", ["tune.modes=[real]", "tune.m=[2, 6]",
                                                                 "tune.lora_ranks=[4, 16]", "tune.learning_rates=[1.0e-3]"])
    grid = trials(base.tune)
    assert len(grid) == 2 * 2 and {t["train.lora.r"] for t in grid} == {4, 16}
    trial_cfg = apply_overrides(base, grid[-1])
    assert trial_cfg.train.lora is not None and trial_cfg.train.lora.r == 16 and trial_cfg.train.learning_rate == 1e-3
    assert label(grid[-1]) == "real m=6 lr=0.001 r=16"
    with pytest.raises(ConfigError, match="tune.lora_ranks must be >= 1"):
        load_config(None, ["tune.lora_ranks=[0]"])


def test_methods_are_trials_of_their_own_with_their_knobs(tmp_path):
    from lookahead_ray.methods import trial_config
    from lookahead_ray.tune.search import _plan
    from lookahead_ray.tune.space import label

    base = load_config(REPO / "configs" / "tune_tiny_cpu.yaml", [
        "tune.modes=[real]", "tune.m=[6]", "tune.methods=[constrained_sft, mixed_preview, real+ptst]",
        "tune.method_knobs={constrained_sft: {train.constrained.beta: [0.1, 0.5]}}", "tune.learning_rates=[1.0e-3]",
        "eval.system_prompt=Be safe.", "tokenization.system_prompt=Be safe."])
    grid = trials(base.tune)
    assert [label(t) for t in grid] == ["real m=6 lr=0.001", "constrained_sft train.constrained.beta=0.1 lr=0.001",
                                        "constrained_sft train.constrained.beta=0.5 lr=0.001",
                                        "mixed_preview lr=0.001", "real+ptst lr=0.001"]
    constrained = trial_config(base, grid[2], "test")
    assert constrained.train.constrained.beta == 0.5 and constrained.preview.mode == "vanilla"
    ptst = trial_config(base, grid[4], "test")
    assert ptst.preview.mode == "real" and ptst.tokenization.system_prompt is None
    assert trial_config(base, grid[3], "test").preview.mix_plain_share == 0.5
    _plan(base, str(tmp_path / "search"))  # every method trial can run on this base
    with pytest.raises(ConfigError, match="set data.safety_mix.inputs"):
        _plan(load_config(REPO / "configs" / "tune_tiny_cpu.yaml", ["tune.methods=[safety_mix]"]), str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="tune.method_knobs names methods not in tune.methods"):
        load_config(None, ["tune.method_knobs={ptst: {train.epochs: [1]}}"])
    with pytest.raises(ConfigError, match="tune.method_knobs.ptst.train.epochs is empty"):
        load_config(None, ["tune.methods=[ptst]", "tune.method_knobs={ptst: {train.epochs: []}}"])
    with pytest.raises(ConfigError, match="tune.methods: method 'nope'"):
        load_config(None, ["tune.methods=[nope]"])
    with pytest.raises(ConfigError, match="asha compares training losses"):
        load_config(None, ["tune.methods=[ptst]", "tune.early_stopping.kind=asha"])
    with pytest.raises(ConfigError, match="set model.liger_kernel=false|liger"):
        _plan(load_config(REPO / "configs" / "tune_tiny_cpu.yaml", ["tune.methods=[constrained_sft]",
                                                                    "model.liger_kernel=true"]), str(tmp_path / "s"))


def test_optuna_space_asks_each_mode_only_its_own_knob():
    optuna = pytest.importorskip("optuna", reason="optuna is the optional [optuna] extra")
    from lookahead_ray.tune.space import suggest

    cfg = load_config(None, ["tune.modes=[vanilla, real, virtual]", "tune.m=[2, 4, 6]", "tune.prefixes=[A, B]",
                             "tune.learning_rates=[1.0e-5, 2.0e-5]"]).tune
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        overrides = suggest(trial, cfg)["overrides"]
        study.tell(trial, 1.0)
        assert ("preview.num_answer_tokens" in overrides) == (overrides["preview.mode"] == "real")
        assert ("preview.virtual_prefix" in overrides) == (overrides["preview.mode"] == "virtual")
        assert set(trial.params) == {"mode", "learning_rate"} | ({"m"} if "preview.num_answer_tokens" in overrides
                                                                 else {"P"} if "preview.virtual_prefix" in overrides
                                                                 else set())
    assert {t.params["mode"] for t in study.trials} == {"vanilla", "real", "virtual"}


def test_optuna_asked_for_but_missing_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    from lookahead_ray.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)  # this machine without the extra
    monkeypatch.delitem(sys.modules, "lookahead_ray.tune.optuna_search", raising=False)
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(tmp_path / "s"),
            "tune.search=optuna"]
    assert main(argv) == 2
    assert "pip install 'lookahead-ray[optuna]'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # checked before anything is written or trained


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_search_keeps_failed_trials_survives_a_kill_resumes_and_writes_a_trainable_best(ray_local, tmp_path, capsys):
    """One search, as a user meets it: two compared methods train, each as its own method, and two trials fail on a
    bad learning rate without stopping it; the driver is killed once a trial has finished, `--resume` runs only the
    trials that had not ended, and a second `--resume` runs nothing; the winner's config, its method applied, loads
    as a training config."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lookahead_ray.cli import main

    out = tmp_path / "search"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.modes=[]", "tune.methods=[constrained_sft, mixed_preview]",
            "tune.method_knobs={mixed_preview: {preview.mix_plain_share: [0.25]}}", "tune.learning_rates=[3.0e-3, -1.0]"]
    # Its own Ray: the whole search is killed, Ray included. Unbuffered: the lines it printed before the kill stay.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    console = tmp_path / "killed-console.txt"
    with open(console, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-m", "lookahead_ray", *argv], env=env, start_new_session=True,
                                  stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        try:
            # Killed once Tune's saved state holds one finished trial, while the next is running.
            while not _terminated_trials(out):
                assert driver.poll() is None and time.monotonic() < deadline, "the search ended before it was killed"
                time.sleep(1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    finished, ended = _terminated_trials(out), _ended_trials(out)  # the state as the kill left it
    assert finished and set(finished) <= set(ended) and len(ended) < 4
    results = {t: out / "trials" / t / "train" / "train_result.json" for t in finished}
    stamps = {t: p.stat().st_mtime_ns for t, p in results.items()}
    killed_lines = re.findall(r"\[tune \d\d:\d\d:\d\d\] trial (\S+) ", console.read_text())

    assert main(argv + ["--resume"]) == 0
    stdout = capsys.readouterr().out
    resumed_lines = re.findall(r"\[tune \d\d:\d\d:\d\d\] trial (\S+) ", stdout)
    assert len(resumed_lines) == 4 - len(ended)  # only the trials that had not ended ran
    assert not set(resumed_lines) & set(ended)
    # Every trial reported, in the run it ended in; a trial the kill caught between its line and Tune's next save of
    # its state had not ended for Tune and is run again (seen once in 2,000 s of suite).
    assert set(killed_lines) <= set(ended) | set(resumed_lines) and len(set(killed_lines) | set(resumed_lines)) == 4
    assert {p.stat().st_mtime_ns for p in results.values()} == set(stamps.values())  # finished trials not run again
    assert "best so far" in stdout
    counts = re.findall(r"\[(\d+)/(\d+) ended\]", stdout)  # out of the search's 4 trials, not Tune's list so far
    assert counts and {total for _, total in counts} == {"4"}
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["done", "done", "error", "error"]  # a bad trial does not stop it
    assert all("learning_rate must be > 0" in r["error"] for r in rows if r["status"] == "error")
    assert all(json.loads(r["objective"]) is not None for r in rows if r["status"] == "done")
    assert all(float(r["objective_low"]) <= float(r["objective"]) <= float(r["objective_high"])
               for r in rows if r["status"] == "done")  # the interval travelled from the trial through Tune
    assert "within noise of the best" in (out / "trials.md").read_text() and "within noise of the best" in stdout
    assert (out / "pareto.png").stat().st_size > 1000 and "seed model" in (out / "trials.md").read_text()
    (seed_eval,) = out.glob("seed_eval-*/results.json")  # measured once, cached for every trial and --resume
    assert json.loads(seed_eval.read_text())["models"]["seed"]["utility"]["n"] == 8

    finished = sorted(out.glob("trials/*/train/train_result.json"))
    assert len(finished) == 2 and all((p.parent / "final" / "model.safetensors").is_file() for p in finished)
    assert not [p for p in out.glob("trials/*/train/*/checkpoint_*") if p.is_dir()]  # their export only
    stamps = [p.stat().st_mtime_ns for p in finished]
    assert main(argv + ["--resume"]) == 0  # nothing left to run: finished trials are not run again
    assert not re.findall(r"\[tune \d\d:\d\d:\d\d\] trial ", capsys.readouterr().out)
    assert [p.stat().st_mtime_ns for p in finished] == stamps

    done = {r["label"] for r in rows if r["status"] == "done"}
    assert done == {"constrained_sft lr=0.003", "mixed_preview preview.mix_plain_share=0.25 lr=0.003"}, done
    assert {json.loads(p.read_text())["loss_objective"] for p in finished} == {"constrained_sft", "sft"}
    best = out / "best.yaml"
    assert "lookahead-ray train --config" in best.read_text().splitlines()[2]
    assert main(["train", "--config", str(best), "--dry-run"]) == 0
    winner = load_config(best)  # the winner's method applied
    assert winner.train.constrained is not None or winner.preview.mix_plain_share == 0.25


@pytest.mark.timeout(300)
def test_a_search_whose_trials_cannot_get_their_workers_fails_fast_with_the_reason(ray_local, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "starved"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.modes=[vanilla]", "train.num_workers=3"]
    assert main(argv) == 2  # before the seed model is evaluated or any trial starts
    err = capsys.readouterr().err
    assert "a trial (0.5 CPU) with 3 worker(s) x 1 CPU needs 3.5 CPU but this Ray has 2" in err, err
    assert not (out / "trials").exists() and not list(out.glob("seed_eval-*"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_stops_a_trial_whose_training_loss_lags(ray_local, tmp_path, capsys):
    from lookahead_ray.cli import main

    out = tmp_path / "asha"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.modes=[vanilla]", "tune.learning_rates=[1.0e-2, 1.0e-7, 1.1e-2]", "train.warmup_steps=0",
            "train.report_every_steps=3",  # rungs to compare before the last report
            "tune.early_stopping.kind=asha", "tune.early_stopping.grace_reports=1"]
    assert main(argv) == 0
    assert "stopped early after 1 training reports" in capsys.readouterr().out
    with open(out / "trials.csv") as f:
        rows = {float(r["train.learning_rate"]): r for r in csv.DictReader(f)}
    # At the first rung (report 1), the 1e-7 trial's loss is above the median of the trials that reached it;
    # the third trial is at or below that median, so it runs on: the stopped trial released its workers.
    assert [rows[lr]["status"] for lr in (1.0e-2, 1.0e-7, 1.1e-2)] == ["done", "stopped early", "done"]
    assert "stopped early by ASHA after 1 training reports" in (out / "trials.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_optuna_search_proposes_trials_from_the_conditional_space(ray_local, tmp_path):
    pytest.importorskip("optuna", reason="optuna is the optional [optuna] extra")
    from lookahead_ray.cli import main

    out = tmp_path / "optuna"
    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(out),
            "tune.search=optuna", "tune.num_samples=2", "tune.modes=[real, virtual]", "tune.m=[2, 6]"]
    assert main(argv) == 0
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}
    for row in rows:
        assert bool(row["preview.num_answer_tokens"]) == (row["preview.mode"] == "real")
        assert bool(row["preview.virtual_prefix"]) == (row["preview.mode"] == "virtual")


def _terminated_trials(search_dir: Path) -> list[str]:
    """Trial ids Tune's saved experiment state lists as finished."""
    return _trials_in_state(search_dir, ("TERMINATED",))


def _ended_trials(search_dir: Path) -> list[str]:
    """Trial ids Tune's saved experiment state lists as finished or failed (a resume runs neither again)."""
    return _trials_in_state(search_dir, ("TERMINATED", "ERROR"))


def _trials_in_state(search_dir: Path, statuses: tuple[str, ...]) -> list[str]:
    for state in search_dir.glob("search/experiment_state-*.json"):
        try:
            trials = [json.loads(t) for t, _ in json.loads(state.read_text())["trial_data"]]
        except (ValueError, KeyError, OSError):  # caught mid-write: read it again next time
            return []
        return [t["trial_id"] for t in trials if t["status"] in statuses]
    return []


def test_a_search_whose_trials_cannot_fit_their_gpus_fails_before_any_trial(tmp_path, capsys):
    from lookahead_ray.cli import main

    argv = ["tune", "--config", str(REPO / "configs" / "tune_tiny_cpu.yaml"), "--output-dir", str(tmp_path / "s"),
            "train.use_gpu=true", "train.gpu_memory_gb=0.001"]  # the tiny model needs ~0.01 GB per GPU
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.gpu_memory_gb: the run needs about" in err and "more than the 0.001 GB given" in err
    assert not (tmp_path / "s").exists()  # the trial's plan is made before anything is written or started


def test_pareto_labels_of_close_trials_do_not_overprint_each_other(tmp_path):
    from lookahead_ray.eval.report import pyplot
    from lookahead_ray.tune.results import spread_labels

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [(80.0, 40.0)] * 3 + [(80.2, 40.1), (80.1, 39.9), (20.0, 10.0)]  # equal and near-equal scores
    ax.scatter(*zip(*points, strict=True))
    labels = [ax.annotate(f"real m={m} lr=2e-5", p, fontsize=7, xytext=(4, 3), textcoords="offset points")
              for m, p in enumerate(points)]
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    before = [a.get_window_extent(renderer) for a in labels]  # no leader lines here: the text alone
    assert any(b.overlaps(c) for i, b in enumerate(before) for c in before[i + 1:])  # what the plot used to show
    boxes = spread_labels(fig, labels)
    assert not any(b.overlaps(c) for i, b in enumerate(boxes) for c in boxes[i + 1:])
    assert labels[-1].xyann == (4, 3)  # a label with room stays beside its point
    figure = fig.get_window_extent()
    assert all(figure.x0 <= b.x0 and b.x1 <= figure.x1 and figure.y0 <= b.y0 and b.y1 <= figure.y1 for b in boxes)
    fig.savefig(tmp_path / "pareto.png")
    plt.close(fig)
