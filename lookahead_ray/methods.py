"""The methods LookAhead Tuning is compared with, each a variant of the one typed config.

A method is a named set of config overrides applied on top of a run's config, so every method is prepared by the
same Ray Data step, trained by the same Ray Train + DeepSpeed loop, scored by the same eval and searched by the
same ``tune``. Names compose with "+" ("real+safety_mix": real preview on data with safety demonstrations); a
name with no preview part fine-tunes on plain prompts (preview.mode vanilla). Pure module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lookahead_ray.config import LookaheadConfig, apply_overrides
from lookahead_ray.errors import ConfigError


@dataclass(frozen=True)
class Method:
    summary: str
    overrides: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """Where the method comes from (paper, code)."""


METHODS: dict[str, Method] = {
    "vanilla": Method("plain fine-tuning: the baseline", {"preview.mode": "vanilla"}),
    "real": Method("LookAhead real preview: the answer's first m tokens in the prompt", {"preview.mode": "real"},
                   "Liu et al. 2025, arXiv 2503.19041"),
    "virtual": Method("LookAhead virtual preview: a fixed prefix P in the prompt and before the answer",
                      {"preview.mode": "virtual"}, "Liu et al. 2025, arXiv 2503.19041"),
    "constrained_sft": Method("token-wise constrained objective against the frozen seed, strongest on the first "
                              "answer tokens (train.constrained)", {"train.constrained": {}},
                              "Qi et al. 2024, arXiv 2406.05946; Unispac/shallow-vs-deep-alignment"),
    "safety_mix": Method("refusal demonstrations mixed into the fine-tuning data (data.safety_mix; its inputs come "
                         "from the config)", {}, "Bianchi et al. 2024, arXiv 2309.07875 (Safety-Tuned LLaMAs)"),
    "ptst": Method("pure tuning, safe testing: fine-tune without the system prompt, evaluate with it "
                   "(tokenization.system_prompt: null; eval.system_prompt set)", {"tokenization.system_prompt": None},
                   "Lyu et al. 2024, arXiv 2402.18540"),
    "mixed_preview": Method("real preview, but half the examples keep the plain prompt (preview.mix_plain_share)",
                            {"preview.mode": "real", "preview.mix_plain_share": 0.5}, "beyond the paper"),
    "adaptive_preview": Method("real preview of only the answer tokens the seed would not produce "
                               "(preview.adaptive_nll_threshold)",
                               {"preview.mode": "real", "preview.adaptive_nll_threshold": 2.0}, "beyond the paper"),
}
"""Every method by name; ``apply_method`` combines them."""


def method_parts(name: str) -> list[str]:
    """The methods a (possibly "+"-combined) name is made of.

    Raises:
        ConfigError: an unknown name (the known ones are listed).
    """
    parts = [part.strip() for part in name.split("+")]
    unknown = [part for part in parts if part not in METHODS]
    if unknown or not parts:
        raise ConfigError(f"method {name!r}: {', '.join(map(repr, unknown))} unknown; choose from "
                          f"{', '.join(METHODS)} (combine with '+')")
    return parts


NEUTRAL: dict[str, Any] = {"train.constrained": None, "data.safety_mix": None, "preview.mix_plain_share": 0.0,
                           "preview.adaptive_nll_threshold": None}
"""Method-owned settings a method not named leaves off, so "real" on a base that sets any of them is still real."""


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
