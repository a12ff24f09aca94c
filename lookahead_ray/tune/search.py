"""`lookahead-ray tune`: search m and P (and training knobs) on Ray Tune; each trial = prepare -> train -> eval.

The current Ray pattern (Train V2): a Tune function trainable (:func:`run_trial`) that runs the library's
own ``run_training`` with a ``TuneReportCallback`` created inside the trial and a deterministic run name
(``train-trial_id=<id>``), so a restored trial resumes its inner run. Training metrics reach Tune through
the callback; after training the trial evaluates on the eval sets the config names (validation splits,
never the test split) and reports the objective. The seed model is evaluated once per search and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig, apply_overrides
from lookahead_ray.errors import ConfigError
from lookahead_ray.methods import trial_config
from lookahead_ray.train import layout
from lookahead_ray.tune import objective, space

logger = logging.getLogger(__name__)
SEARCH_NAME = "search"
MARKER = "search_config.yaml"


@dataclass
class SearchResult:
    search_dir: str
    trials: list[dict[str, Any]]
    """Every trial, best first: overrides, label, raw metrics, objective and its interval, rank,
    within_noise_of_best, status, error."""
    seed_metrics: dict[str, Any]
    best_config: str | None
    """best.yaml: the training config of the best trial."""
    rank_by: str = "point"
    """``tune.objective.rank_by``: what ``trials`` are ordered by."""


def run_search(cfg: LookaheadConfig, resume: bool = False) -> SearchResult:
    """Run (or, with ``resume``, continue) the search ``cfg.tune`` describes, holding its directory (a second
    search into it fails at once, naming this one); see :func:`_search`."""
    with storage.held_output(_search_dir(cfg), "tune.output_dir"):
        return _search(cfg, resume)


def _search(cfg: LookaheadConfig, resume: bool = False) -> SearchResult:
    """Run (or, with ``resume``, continue) the search ``cfg.tune`` describes; writes the search directory.

    Raises:
        ConfigError: no search directory, no eval sets, or an unresumable ``resume``.
    """
    from ray import tune

    from lookahead_ray import console
    from lookahead_ray.runtime import WORKER_START_TIMEOUT_ENV, init_ray
    from lookahead_ray.tune.results import write_results

    search_dir = _search_dir(cfg)
    cfg = _absolute_paths(cfg)
    if not cfg.eval.utility or not (cfg.eval.harmful or cfg.eval.harmful_answers):
        raise ConfigError("tune: the trials are scored on eval.utility and eval.harmful / eval.harmful_answers "
                          "(validation sets, not the test split); configure them")
    if cfg.train.prepared_dir:
        raise ConfigError("train.prepared_dir: a search prepares each trial's data itself (the preview differs "
                          "per trial); unset it and set data.inputs")
    if cfg.model.tiny is None and not storage.is_dir(cfg.model.name_or_path or "."):
        raise ConfigError(f"model.name_or_path: the search evaluates the seed model from a directory; download "
                          f"{cfg.model.name_or_path!r} to shared storage and point model.name_or_path at it")
    if cfg.tune.search == "optuna":
        import lookahead_ray.tune.optuna_search  # noqa: F401  (fails now, with what to install, if optuna is missing)
    _plan(cfg, search_dir)
    storage.check_output_dir(search_dir, MARKER, "tune.output_dir")
    import yaml

    with storage.atomic_file(storage.join(search_dir, MARKER)) as f:
        f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    console.use_output_dir(search_dir)
    init_ray(env_vars={WORKER_START_TIMEOUT_ENV: str(cfg.train.worker_start_timeout_s)})
    _check_trial_fits(cfg)
    base = _seeded_base(cfg, search_dir)
    seed_metrics = _seed_metrics(base, search_dir)
    objective.safety(seed_metrics, cfg.tune.objective.safety)  # every rate the objective names was measured:
    objective.utility(seed_metrics)  # fail now, not after every trial has trained
    trainable = tune.with_resources(run_trial, {"CPU": cfg.tune.cpus_per_trial})
    path = storage.join(search_dir, SEARCH_NAME)
    if cfg.tune.search == "optuna" or cfg.tune.early_stopping.kind == "asha":
        # A trial's intermediate results are training metrics and only its last holds the objective; Tune's
        # strict check wants every metric a searcher or scheduler names in every result.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if resume:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"tune --resume: no search to resume in {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        constants = {"base": base.to_dict(), "seed_metrics": seed_metrics, "search_dir": search_dir}
        progress = progress_line(_trial_count(cfg), cfg.tune.objective.rank_by)
        tuner = tune.Tuner(trainable, param_space=_param_space(cfg, constants), tune_config=_tune_config(cfg),
                           run_config=tune.RunConfig(name=SEARCH_NAME, storage_path=search_dir, verbose=0,
                                                     callbacks=[progress]))
    grid = tuner.fit()
    rows = [_trial_row(result) for result in grid]
    best = write_results(search_dir, cfg, rows, seed_metrics)
    rank_by = cfg.tune.objective.rank_by
    return SearchResult(search_dir, objective.rank(rows, rank_by), seed_metrics, best, rank_by)


def _check_trial_fits(cfg: LookaheadConfig) -> None:
    """One trial (its driver and its Train workers) fits the cluster, or the search fails before any trial starts
    (on a cluster joined through RAY_ADDRESS, after ``cluster.resource_wait_s``)."""
    from lookahead_ray.runtime import check_resources

    train = cfg.train
    worker = {"CPU": train.cpus_per_worker} | ({"GPU": 1.0} if train.use_gpu else {})
    trial = [{"CPU": cfg.tune.cpus_per_trial}] + [worker] * train.num_workers
    check_resources({r: sum(b.get(r, 0.0) for b in trial) for r in worker},
                    "tune.cpus_per_trial / train.num_workers / train.cpus_per_worker / train.use_gpu",
                    f"a trial ({cfg.tune.cpus_per_trial:g} CPU) with {train.num_workers} worker(s) x "
                    f"{train.cpus_per_worker:g} CPU" + (" and 1 GPU each" if train.use_gpu else ""), bundles=trial,
                    wait_s=cfg.cluster.resource_wait_s)


def _plan(cfg: LookaheadConfig, search_dir: str) -> None:
    """The plan of a trial (``train.plan``, as each trial's ``run_training`` makes it) and the storage of the
    whole search, before Ray starts: a trial that cannot run fails the search now, not once per trial.

    Raises:
        ConfigError / FileNotFoundError: the trials' training cannot run (the plan's first failure).
    """
    from lookahead_ray.train.plan import plan_search

    count = _trial_count(cfg)
    trial = apply_overrides(cfg, {"output_dir": storage.join(search_dir, "trials", "a-trial"), "train.output_dir": None,
                                  "train.storage_path": None})
    # A method the base cannot run, or whose trials cannot (Liger with constrained SFT, its reference's memory), fails now.
    for choice in space.method_choices(cfg.tune):
        plan_search(trial_config(trial, choice, f"tune.methods: {choice['method']}"), count).check()
    plan = plan_search(trial, count).check()
    for warning in plan.warnings:
        logger.warning("%s", warning)
    if plan.cost is not None:
        logger.info("each trial: %s; the search's %d trial(s) need about %.1f GB of storage", plan.cost_line(), count,
                    plan.search_disk_bytes / 1e9)


def _param_space(cfg: LookaheadConfig, constants: dict[str, Any]) -> dict[str, Any]:
    """grid / random: Tune's grid over the enumerated trials; optuna: constants only (the searcher proposes)."""
    from ray import tune

    if cfg.tune.search == "optuna":
        return constants
    return {**constants, "overrides": tune.grid_search(space.trials(cfg.tune))}


def _tune_config(cfg: LookaheadConfig) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    search_alg, num_samples = None, 1
    if cfg.tune.search == "optuna":
        from lookahead_ray.tune.optuna_search import optuna_searcher  # raises ConfigError without optuna

        search_alg, num_samples = optuna_searcher(cfg.tune), cfg.tune.num_samples
    scheduler = None
    stopping = cfg.tune.early_stopping
    if stopping.kind == "asha":
        # max_t far beyond any run: a trial ends by itself after its last report, and ASHA must never stop
        # one at max_t before its evaluation.
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=stopping.metric, mode=stopping.mode,
                                  grace_period=stopping.grace_reports, reduction_factor=stopping.reduction_factor,
                                  max_t=10**6)
    return tune.TuneConfig(max_concurrent_trials=_concurrency(cfg), search_alg=search_alg, scheduler=scheduler,
                           num_samples=num_samples)


def run_trial(config: dict[str, Any]) -> None:
    """One trial (a Ray Tune function trainable): prepare -> train -> eval, then report the objective."""
    import ray.tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from lookahead_ray.eval.runner import run_eval
    from lookahead_ray.train.execute import run_training

    DataContext.get_current().enable_progress_bars = False  # the search prints one line per trial instead
    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = storage.join(config["search_dir"], "trials", trial_id)
    cfg = trial_config(LookaheadConfig.from_dict(config["base"]), config["overrides"], f"trial {trial_id}")
    cfg = apply_overrides(cfg, {"output_dir": str(trial_dir), "data.output_dir": None, "train.output_dir": None,
                                "eval.output_dir": None, "train.storage_path": None,
                                "train.run_name": f"train-trial_id={trial_id}"})
    # The search holds its directory; a trial's own is its alone (a rerun after a killed search takes it over).
    result = run_training(cfg, callbacks=[TuneReportCallback()], hold_output=False)
    metrics = run_eval(cfg, [("trial", result.final_dir)], hold_output=False)["models"]["trial"]
    scored = objective.score(metrics, config["seed_metrics"], cfg.tune.objective)
    checkpoint = result.checkpoint_dir
    if not cfg.tune.keep_trial_checkpoints:  # the trial is done: its export stays, the ZeRO states go
        _remove_checkpoints(layout.trial_run_dir(trial_dir, cfg.train.run_name))
        checkpoint = "(removed: tune.keep_trial_checkpoints is false)"
    ray.tune.report({**scored, "label": space.label(config["overrides"]), "metrics_json": json.dumps(metrics),
                     "checkpoint_path": checkpoint, "final_dir": result.final_dir})


def _remove_checkpoints(run_dir: str) -> None:
    """The ``checkpoint_*`` directories Ray Train wrote for this trial's run (nothing else in it)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run_dir)
    for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(layout.CHECKPOINT_PREFIX):
            storage.remove_tree(storage.join(run_dir, entry.base_name))


def progress_line(total: int, rank_by: str = "point") -> Any:
    """A Tune callback printing one line per finished trial: id, overrides, objective and its interval, best so far
    (by ``rank_by``'s value), and how many of the search's ``total`` trials have ended (Tune creates trials as it
    goes: its list is not the total)."""
    from ray.tune import Callback

    key = objective.rank_key(rank_by)

    class _Progress(Callback):
        best: float | None = None

        def on_trial_complete(self, iteration, trials, trial, **info):
            from lookahead_ray.console import stage
            from lookahead_ray.tune.results import objective_interval

            ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1
            result = trial.last_result or {}
            value = result.get(key, result.get("objective"))
            if value is not None and (self.best is None or value > self.best):
                self.best = value
            label = space.label(trial.config.get("overrides", {}))
            best = f"{self.best:.4f}" if self.best is not None else "-"
            best += " (lower bound)" if rank_by == "lower_bound" and self.best is not None else ""
            if value is None:  # ended by the scheduler before its evaluation
                reports = result.get("training_iteration", 0)
                stage("tune", f"trial {trial.trial_id} ({label}): stopped early after {reports} training reports, "
                              f"best so far {best} [{ended}/{total} ended]")
                return
            stage("tune", f"trial {trial.trial_id} ({label}): objective {result['objective']:.4f} "
                          f"{objective_interval(result)}, best so far {best} [{ended}/{total} ended]")

        def on_trial_error(self, iteration, trials, trial, **info):
            from lookahead_ray.console import stage

            label = space.label(trial.config.get("overrides", {}))
            stage("tune", f"trial {trial.trial_id} ({label}) failed: {trial.error_file}")

    return _Progress()


def _trial_count(cfg: LookaheadConfig) -> int:
    return cfg.tune.num_samples if cfg.tune.search == "optuna" else len(space.trials(cfg.tune))


def _search_dir(cfg: LookaheadConfig) -> str:
    directory = cfg.stage_dir("tune")
    if not directory:
        raise ConfigError("tune.output_dir is not set (use --output-dir DIR)")
    return storage.absolute(directory)


def _absolute_paths(cfg: LookaheadConfig) -> LookaheadConfig:
    """Every path made absolute: trials run with the trial directory as their working directory."""
    def absolute(value: str | None) -> str | None:  # paths and URIs only: a Hub id or builtin:tiny stays as it is
        return storage.absolute(value) if value and (storage.is_uri(value) or Path(value).exists()) else value

    overrides: dict[str, Any] = {"data.inputs": [storage.absolute(p) for p in cfg.data.inputs],
                                 "model.name_or_path": absolute(cfg.model.name_or_path),
                                 "model.tokenizer": absolute(cfg.model.tokenizer),
                                 "train.prepared_dir": absolute(cfg.train.prepared_dir)}
    for name in ("harmful", "harmful_answers", "utility", "benign"):
        if getattr(cfg.eval, name) is not None:
            overrides[f"eval.{name}.path"] = storage.absolute(getattr(cfg.eval, name).path)
    return apply_overrides(cfg, overrides)


def _seeded_base(cfg: LookaheadConfig, search_dir: str) -> LookaheadConfig:
    """The config every trial starts from, with the seed model as a directory (a ``model.tiny`` seed is built
    once with ``train.seed`` and saved, so every trial fine-tunes the same weights and the seed can be
    evaluated)."""
    if cfg.model.tiny is None:
        return cfg
    from lookahead_ray.modeling import build_model, tokenizer_for

    key = hashlib.sha256(json.dumps([cfg.to_dict()["model"], cfg.train.seed], sort_keys=True).encode()).hexdigest()[:12]
    seed_dir = storage.join(search_dir, f"seed_model-{key}")
    if not storage.is_complete(seed_dir, "config.json"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lookahead-seed-") as scratch:
            staging = Path(scratch, "seed") if storage.is_uri(seed_dir) else storage.staging_path(seed_dir)
            tokenizer = tokenizer_for(cfg.model)
            build_model(cfg.model, tokenizer, cfg.train.seed).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            storage.publish_dir(staging, seed_dir, marker="config.json")
    return apply_overrides(cfg, {"model.tiny": None, "model.name_or_path": seed_dir, "model.tokenizer": None})


def _seed_metrics(base: LookaheadConfig, search_dir: str) -> dict[str, Any]:
    """The seed model's eval metrics, measured once per search (cached in the search directory)."""
    from lookahead_ray.eval.runner import run_eval

    key = hashlib.sha256(json.dumps([base.model.name_or_path, base.to_dict()["eval"], base.to_dict()["tokenization"]],
                                    sort_keys=True).encode()).hexdigest()[:12]
    cached = storage.join(search_dir, f"seed_eval-{key}", "results.json")
    if storage.is_file(cached):
        return json.loads(storage.read_text(cached))["models"]["seed"]
    seed_cfg = apply_overrides(base, {"eval.output_dir": storage.parent(cached)})
    return run_eval(seed_cfg, [("seed", base.model.name_or_path)], hold_output=False)["models"]["seed"]  # in ours


def _concurrency(cfg: LookaheadConfig) -> int:
    """Trials at once: what the cluster holds of (trial driver + its Train workers), at least 1."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    have = ray.cluster_resources()
    per_trial = cfg.tune.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker
    fits = int(have.get("CPU", 1) // per_trial)
    if cfg.train.use_gpu:
        fits = min(fits, int(have.get("GPU", 0) // cfg.train.num_workers))
    return max(1, fits)


def _error_line(error: BaseException) -> str:
    """The exception's own message (the last line of the remote traceback Ray wraps it in)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return [line for line in lines if line][-1][:300] if any(lines) else type(error).__name__


def _trial_row(result: Any) -> dict[str, Any]:
    config = result.config or {}
    metrics = dict(result.metrics or {})
    status = "error" if result.error else "done" if "objective" in metrics else "stopped early"
    row = {"trial_id": metrics.get("trial_id") or Path(result.path).name, "label": space.label(config.get("overrides", {})),
           "overrides": config.get("overrides", {}), "status": status,
           "error": _error_line(result.error) if result.error else None,
           "training_reports": metrics.get("training_iteration")}
    if not result.error and "objective" in metrics:
        row |= {k: metrics[k] for k in ("objective", "objective_low", "objective_high", "feasible", "violation",
                                        "safety", "safety_low", "safety_high", "utility", "utility_low", "utility_high",
                                        "checkpoint_path", "final_dir") if k in metrics}
        row["metrics"] = json.loads(metrics.get("metrics_json", "{}"))
    return row
