"""The search space as trials: each trial is a set of dotted overrides for ``apply_overrides``.

Conditional knobs are enumerated, not sampled blindly: ``m`` exists only for real preview and ``P`` only
for virtual preview, so a grid has one trial per (mode, its own knob, training knobs) and never a trial that
differs from another only in a knob its mode ignores. Compared methods (``tune.methods``) are trials of their own,
``{"method": name}`` plus their own knobs (``tune.method_knobs``). Random search samples from that same list; Optuna samples
the same conditional space define-by-run (:func:`suggest`). Pure module.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from lookahead_ray.config.schema import SearchConfig


def preview_choices(cfg: SearchConfig) -> list[dict[str, Any]]:
    """One override set per preview setting worth training."""
    choices: list[dict[str, Any]] = []
    for mode in cfg.modes:
        if mode == "real":
            choices += [{"preview.mode": "real", "preview.num_answer_tokens": m} for m in cfg.m]
        elif mode == "virtual":
            choices += [{"preview.mode": "virtual", "preview.virtual_prefix": p} for p in cfg.prefixes]
        else:
            choices.append({"preview.mode": "vanilla"})
    return choices


def method_choices(cfg: SearchConfig) -> list[dict[str, Any]]:
    """One override set per compared method and combination of its knobs (``{"method": name, key: value, ...}``)."""
    choices: list[dict[str, Any]] = []
    for name in cfg.methods:
        knobs = cfg.method_knobs.get(name, {})
        for values in itertools.product(*knobs.values()):
            choices.append({"method": name, **dict(zip(knobs, values, strict=True))})
    return choices


def trials(cfg: SearchConfig) -> list[dict[str, Any]]:
    """Every trial of the grid (``search: grid``), or ``num_samples`` distinct ones drawn with ``seed``."""
    knobs = [[{}] if not values else [{key: v} for v in values]
             for key, values in (("train.learning_rate", cfg.learning_rates), ("train.epochs", cfg.epochs),
                                 ("train.lora.r", cfg.lora_ranks))]
    grid = [dict(item for part in combo for item in part.items())
            for combo in itertools.product(preview_choices(cfg) + method_choices(cfg), *knobs)]
    if cfg.search == "grid":
        return grid
    return random.Random(cfg.seed).sample(grid, min(cfg.num_samples, len(grid)))


def suggest(trial: Any, cfg: SearchConfig) -> dict[str, Any]:
    """Optuna's define-by-run space: m is asked only of real trials and P only of virtual ones, so TPE never
    spends a trial on a knob the mode ignores. ``trial`` is an ``optuna.Trial`` (or Ray's captor of one)."""
    mode = trial.suggest_categorical("mode", list(cfg.modes) + [f"method:{name}" for name in cfg.methods])
    overrides: dict[str, Any] = {"preview.mode": mode}
    if mode.startswith("method:"):
        name = mode.removeprefix("method:")
        overrides = {"method": name} | {key: trial.suggest_categorical(f"{name}:{key}", list(values))
                                        for key, values in cfg.method_knobs.get(name, {}).items()}
    elif mode == "real":
        overrides["preview.num_answer_tokens"] = trial.suggest_categorical("m", list(cfg.m))
    elif mode == "virtual":
        overrides["preview.virtual_prefix"] = trial.suggest_categorical("P", list(cfg.prefixes))
    if cfg.learning_rates:
        overrides["train.learning_rate"] = trial.suggest_categorical("learning_rate", list(cfg.learning_rates))
    if cfg.epochs:
        overrides["train.epochs"] = trial.suggest_categorical("epochs", list(cfg.epochs))
    if cfg.lora_ranks:
        overrides["train.lora.r"] = trial.suggest_categorical("lora_r", list(cfg.lora_ranks))
    return {"overrides": overrides}


def label(overrides: dict[str, Any]) -> str:
    """A short readable name of a trial's overrides, e.g. ``real m=6 lr=2e-05``."""
    short = {"preview.mode": "", "method": "", "preview.num_answer_tokens": "m=", "preview.virtual_prefix": "P=",
             "train.learning_rate": "lr=", "train.epochs": "epochs=", "train.lora.r": "r="}
    return " ".join(f"{short.get(k, k + '=')}{v!r}" if isinstance(v, str) and k != "preview.mode"
                    and k != "method" else f"{short.get(k, k + '=')}{v}" for k, v in overrides.items())
