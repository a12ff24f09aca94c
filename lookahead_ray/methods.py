"""The methods LookAhead Tuning is compared with, each a variant of the one typed config.

A method is a named set of config overrides applied on top of a run's config, so every method is prepared by the
same Ray Data step, trained by the same Ray Train + DeepSpeed loop, scored by the same eval and searched by the
same ``tune``. Names compose with "+" ("real+safety_mix": real preview on data with safety demonstrations); a
name with no preview part fine-tunes on plain prompts (preview.mode vanilla). Pure module.
"""

from __future__ import annotations

from typing import Any

from lookahead_ray.config import LookaheadConfig, apply_overrides
from lookahead_ray.config.methods import METHODS, NEUTRAL, method_parts
from lookahead_ray.errors import ConfigError


def apply_method(cfg: LookaheadConfig, name: str) -> LookaheadConfig:
    """``cfg`` with the method's overrides applied (a new config). Settings of methods not named are turned off
    (``NEUTRAL``); a method's own settings in ``cfg`` are kept (train.constrained's beta, a mix share, a threshold),
    else its defaults apply.

    Raises:
        ConfigError: an unknown method, parts that set the same key differently ("real+virtual"), or a method the
            config cannot run (safety_mix without data.safety_mix, ptst without a training system prompt to drop or
            without eval.system_prompt), in one line naming the key to set.
    """
    parts = method_parts(name)
    overrides: dict[str, Any] = {}
    for part in parts:
        for key, value in METHODS[part].overrides.items():
            if key in overrides and overrides[key] != value:
                raise ConfigError(f"method {name!r}: its parts set {key} to {overrides[key]!r} and {value!r}; "
                                  "combine methods that change different settings")
            overrides[key] = value
    overrides.setdefault("preview.mode", "vanilla")
    _check_runnable(cfg, name, parts)
    current = cfg.to_dict()
    for key, neutral in NEUTRAL.items():
        section, field_name = key.split(".")
        kept = current[section][field_name]
        if key in overrides and kept not in (None, 0.0):  # the base's own settings of a named method win
            overrides[key] = kept
        overrides.setdefault(key, neutral)
    if "safety_mix" in parts:
        overrides.pop("data.safety_mix", None)
    return apply_overrides(cfg, overrides, f"method {name}")


def _check_runnable(cfg: LookaheadConfig, name: str, parts: list[str]) -> None:
    if "safety_mix" in parts and cfg.data.safety_mix is None:
        raise ConfigError(f"method {name!r}: set data.safety_mix.inputs to a file of safety demonstrations "
                          "(harmful request -> refusal)")
    if "ptst" in parts and not cfg.tokenization.system_prompt:
        raise ConfigError(f"method {name!r}: set tokenization.system_prompt to the safety system prompt PTST trains "
                          "without (unset, training would not change)")
    if "ptst" in parts and not cfg.eval.system_prompt:
        raise ConfigError(f"method {name!r}: set eval.system_prompt to the safety system prompt the model is tested "
                          "with (PTST trains without it)")


def trial_config(base: LookaheadConfig, overrides: dict[str, Any], source: str) -> LookaheadConfig:
    """A search trial's config: the base, its method's overrides (``{"method": name}``, ``tune.methods``) if any, then
    the trial's own."""
    overrides = dict(overrides)
    method = overrides.pop("method", None)
    return apply_overrides(apply_method(base, method) if method else base, overrides, source=source)


def method_table() -> str:
    """Markdown: each method, what it does, where it comes from."""
    lines = ["| method | what it changes | source |", "|---|---|---|"]
    lines += [f"| `{name}` | {method.summary} | {method.source or '-'} |" for name, method in METHODS.items()]
    return "\n".join(lines)
