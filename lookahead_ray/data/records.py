"""Input records: where the instruction and the answer live, and the errors a bad row raises.

Three record shapes are supported (see :class:`~lookahead_ray.config.RecordConfig`):

- flat: ``{instruction_field: str, answer_field: str, ...}`` (the reference's --input_field/--output_field);
- alpaca: ``{"instruction": str, "input": str (optional), "output": str}``; the preview goes at the end of
  the prompt, i.e. onto ``input`` when it is non-empty, else onto ``instruction``;
- chat: ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn; the preview goes onto the
  last user turn and the answer is the last assistant turn (the only turn trained on).

Pure module: no ray / torch / transformers imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lookahead_ray.config.schema import RecordConfig
from lookahead_ray.errors import RowError


@dataclass(frozen=True)
class PromptAnswer:
    """The parts of one record that the preview and the tokenisation need."""

    instruction: str
    """The text the preview is appended to (flat field, alpaca input/instruction, last user turn)."""
    answer: str
    """The text trained on (flat field, alpaca output, last assistant turn)."""


def _require_str(record: dict, key: str, field_name: str) -> str:
    if key not in record:
        raise RowError("missing_field", field_name, f"record has no field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RowError("not_a_string", field_name, f"expected a string, got {type(value).__name__}")
    return value


class RecordSchema:
    """Reads and rewrites the instruction and answer of records of one shape, never mutating the input."""

    def __init__(self, cfg: RecordConfig):
        self.cfg = cfg

    def extract(self, record: Any) -> PromptAnswer:
        """Return the instruction and answer of ``record``.

        Raises:
            RowError: not an object, missing or non-string field, malformed messages.
        """
        if not isinstance(record, dict):
            raise RowError("not_an_object", None, f"expected a JSON object, got {type(record).__name__}")
        fmt = self.cfg.format
        if fmt == "flat":
            instruction = _require_str(record, self.cfg.instruction_field, self.cfg.instruction_field)
            return PromptAnswer(instruction, _require_str(record, self.cfg.answer_field, self.cfg.answer_field))
        if fmt == "alpaca":
            instruction = _require_str(record, "instruction", "instruction")
            extra = record.get("input")
            if extra is not None and not isinstance(extra, str):
                raise RowError("not_a_string", "input", f"expected a string, got {type(extra).__name__}")
            return PromptAnswer(extra or instruction, _require_str(record, "output", "output"))
        user, assistant = self._last_turns(record)
        return PromptAnswer(record[self.cfg.messages_field][user]["content"],
                            record[self.cfg.messages_field][assistant]["content"])

    def replace(self, record: dict, instruction: str, answer: str) -> dict:
        """A copy of ``record`` with the instruction and answer replaced; key order is kept."""
        out = dict(record)
        fmt = self.cfg.format
        if fmt == "flat":
            out[self.cfg.instruction_field] = instruction
            out[self.cfg.answer_field] = answer
        elif fmt == "alpaca":
            out["input" if record.get("input") else "instruction"] = instruction
            out["output"] = answer
        else:
            user, assistant = self._last_turns(record)
            messages = list(record[self.cfg.messages_field])
            messages[user] = {**messages[user], "content": instruction}
            messages[assistant] = {**messages[assistant], "content": answer}
            out[self.cfg.messages_field] = messages
        return out

    def prompt_messages(self, record: dict) -> list[dict[str, str]]:
        """The conversation before the trained answer, as chat-template messages (no system turn added)."""
        fmt = self.cfg.format
        if fmt == "flat":
            return [{"role": "user", "content": record[self.cfg.instruction_field]}]
        if fmt == "alpaca":
            text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            return [{"role": "user", "content": text}]
        _, assistant = self._last_turns(record)
        return [{"role": m["role"], "content": m["content"]} for m in record[self.cfg.messages_field][:assistant]]

    def _last_turns(self, record: dict) -> tuple[int, int]:
        name = self.cfg.messages_field
        if name not in record:
            raise RowError("missing_field", name, f"record has no field {name!r}")
        messages = record[name]
        if not isinstance(messages, list) or not messages:
            raise RowError("malformed_messages", name, "expected a non-empty list of {role, content} turns")
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
                raise RowError("malformed_messages", f"{name}[{i}].role", "each turn needs a string role")
            if not isinstance(turn.get("content"), str):
                raise RowError("not_a_string", f"{name}[{i}].content", "each turn needs a string content")
        assistant = len(messages) - 1
        if messages[assistant]["role"] != "assistant":
            raise RowError("malformed_messages", f"{name}[{assistant}].role", "the last turn must be the assistant's")
        users = [i for i, m in enumerate(messages[:assistant]) if m["role"] == "user"]
        if not users:
            raise RowError("malformed_messages", name, "no user turn before the last assistant turn")
        return users[-1], assistant
