"""What the clients of outside services (the LLM judge, the openai engine) share: the API key from the environment
variable a config names, and a JSONL cache of answers keyed by what was asked. Pure module."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lookahead_ray.errors import ConfigError


def api_key(env: str | None, setting: str) -> str:
    """The key in the variable ``env`` names ("" when none is named); a named but unset variable is one line."""
    key = os.environ.get(env, "") if env else ""
    if env and not key:
        raise ConfigError(f"{setting}: environment variable {env} is not set")
    return key


def read_cache(path: Path) -> dict[str, dict]:
    """{entry["key"]: entry} of a JSONL cache (its folder made if missing); a line cut short by an interrupted run
    is skipped, so that question is simply asked again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return cache
