"""The compared methods by name: what each changes (as dotted config overrides) and where it comes from. Beside
the schema, which checks the names a config gives (``tune.methods``); ``lookahead_ray.methods`` applies them.
Pure module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
