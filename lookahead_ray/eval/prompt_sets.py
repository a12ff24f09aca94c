"""Evaluation prompt sets read from the user's files, validated before any generation starts.

Every set becomes rows ``{"id", "prompt", "answer", "category"}``; a row without the needed field, a
malformed line or an empty file is an error naming the file, row and field.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import PromptSetConfig
from lookahead_ray.errors import RowError


def _field(record: dict, name: str, path: str, row: int, required: bool = True) -> str | None:
    if name not in record or record[name] is None:
        if required:
            raise RowError("missing_field", name, f"record has no field {name!r}", path, row)
        return None
    value = record[name]
    if not isinstance(value, str) or (required and not value.strip()):
        raise RowError("not_a_string", name, f"expected a non-empty string, got {value!r:.60}", path, row)
    return value


def _records(cfg: PromptSetConfig) -> list[tuple[int, dict]]:
    path = cfg.path  # a local path or a URI: prompt sets are read by the driver only
    if not storage.is_file(path):
        raise FileNotFoundError(f"eval prompt set not found: {cfg.path}")
    if cfg.format == "advbench":
        with io.TextIOWrapper(storage.open_input(path), encoding="utf-8", newline="") as f:
            return [(i, row) for i, row in enumerate(csv.DictReader(f), 2)]  # row 1 is the header
    out = []
    with storage.open_input(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RowError("invalid_json", None, str(exc), cfg.path, number) from None
            if isinstance(record, list) and cfg.format == "harmful_messages":
                record = {"messages": record}  # the reference's Harmful-HEx-PHI.jsonl: each line is the turns list
            if not isinstance(record, dict):
                raise RowError("not_an_object", None, "expected a JSON object", cfg.path, number)
            out.append((number, record))
    return out


def load_prompt_set(cfg: PromptSetConfig) -> list[dict[str, Any]]:
    """Rows of one prompt set.

    Raises:
        FileNotFoundError: the file does not exist.
        RowError: a bad row (file, row and field named) or an empty set.
    """
    rows = []
    for number, record in _records(cfg):
        if cfg.max_samples is not None and len(rows) >= cfg.max_samples:
            break
        category = None
        if cfg.format == "advbench":
            prompt = _field(record, "goal", cfg.path, number)
            answer = _field(record, "target", cfg.path, number)
        elif cfg.format == "harmful_messages":
            messages = record.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RowError("malformed_messages", "messages", "expected a list of {role, content}", cfg.path, number)
            users = [m for m in messages if m.get("role") == "user"]
            assistants = [m for m in messages if m.get("role") == "assistant"]
            if not users or not assistants:
                raise RowError("malformed_messages", "messages", "needs a user turn and an assistant turn",
                               cfg.path, number)
            prompt = _field(users[-1], "content", cfg.path, number)
            answer = _field(assistants[-1], "content", cfg.path, number)
        else:
            prompt = _field(record, cfg.prompt_field, cfg.path, number)
            answer = _field(record, cfg.answer_field, cfg.path, number) if cfg.answer_field else None
        if cfg.category_field and cfg.format != "advbench":
            category = _field(record, cfg.category_field, cfg.path, number, required=False)
        rows.append({"id": f"{storage.name(cfg.path)}:{number}", "prompt": prompt, "answer": answer,
                     "category": category})
    if not rows:
        raise RowError("empty_dataset", None, "no rows to evaluate", cfg.path, None)
    return rows
