"""Optuna TPE for ``tune.search: optuna``; imported only then, because optuna is an optional extra."""

from __future__ import annotations

from functools import partial
from typing import Any

from lookahead_ray.config.schema import SearchConfig
from lookahead_ray.errors import ConfigError
from lookahead_ray.tune import space
from lookahead_ray.tune.objective import rank_key

try:
    import optuna
    from ray.tune.search.optuna import OptunaSearch
except ImportError as error:  # the message names the extra, not Ray's internal import chain
    raise ConfigError("tune.search: optuna needs the optuna package; install it with "
                      "pip install 'lookahead-ray[optuna]' (or use search: grid / random)") from error


class FinalResultOptunaSearch(OptunaSearch):
    """TPE scored on the trial's final objective. A trial's intermediate results are training metrics without
    an objective, which Optuna's pruning interface would read as missing values."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def optuna_searcher(cfg: SearchConfig) -> FinalResultOptunaSearch:
    # TPE maximises what the search ranks by: with rank_by lower_bound, a lucky answer on a small set does not steer it.
    return FinalResultOptunaSearch(space=partial(space.suggest, cfg=cfg), metric=rank_key(cfg.objective.rank_by),
                                   mode="max", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
