"""Input records: where the instruction and the answer live, and the errors a bad row raises.

Four record shapes are supported (see :class:`~lookahead_ray.config.RecordConfig`):

- flat: ``{instruction_field: str, answer_field: str, ...}`` (the reference's --input_field/--output_field);
- alpaca: ``{"instruction": str, "input": str (optional), "output": str}``; the preview goes at the end of
  the prompt, i.e. onto ``input`` when it is non-empty, else onto ``instruction``;
- chat: ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn; the preview goes onto the
  last user turn and the answer is the last assistant turn (the only turn trained on);
- sharegpt: ``{"conversations": [{"from", "value"}, ...]}`` with speakers human / gpt / system, read as chat.

A row is valid when its answer has text: ``preview`` and ``prepare`` apply the same rules, here.

Pure module: no ray / torch / transformers imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lookahead_ray.config.schema import RecordConfig
from lookahead_ray.errors import RowError

SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
            RowError: not an object, missing or non-string field, malformed messages, an answer without text.
        """
        parts, answer_field = self._extract(record)
        if not parts.answer.strip():
            raise RowError("empty_answer", answer_field, "the answer is empty; there is nothing to train on")
        return parts

    def _extract(self, record: Any) -> tuple[PromptAnswer, str]:
        if not isinstance(record, dict):
            raise RowError("not_an_object", None, f"expected a JSON object, got {type(record).__name__}")
        fmt = self.cfg.format
        if fmt == "flat":
            shape = next((f"records.format: {f}" for f, key in (("sharegpt", SHAREGPT_FIELD), ("chat", "messages"))
                          if key in record and self.cfg.instruction_field not in record), None)
            if shape is not None:
                raise RowError("missing_field", self.cfg.instruction_field,
                               f"record has no field {self.cfg.instruction_field!r} but a {shape.split()[-1]} "
                               f"turn list; set {shape}")
            instruction = _require_str(record, self.cfg.instruction_field, self.cfg.instruction_field)
            answer = _require_str(record, self.cfg.answer_field, self.cfg.answer_field)
            return PromptAnswer(instruction, answer), self.cfg.answer_field
        if fmt == "alpaca":
            instruction = _require_str(record, "instruction", "instruction")
            extra = record.get("input")
            if extra is not None and not isinstance(extra, str):
                raise RowError("not_a_string", "input", f"expected a string, got {type(extra).__name__}")
            return PromptAnswer(extra or instruction, _require_str(record, "output", "output")), "output"
        name, _, text = self._turn_keys()
        user, assistant = self._last_turns(record)
        return (PromptAnswer(record[name][user][text], record[name][assistant][text]),
                f"{name}[{assistant}].{text}")

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
            name, _, text = self._turn_keys()
            user, assistant = self._last_turns(record)
            messages = list(record[name])
            messages[user] = {**messages[user], text: instruction}
            messages[assistant] = {**messages[assistant], text: answer}
            out[name] = messages
        return out

    def prompt_messages(self, record: dict) -> list[dict[str, str]]:
        """The conversation before the trained answer, as chat-template messages (no system turn added)."""
        fmt = self.cfg.format
        if fmt == "flat":
            return [{"role": "user", "content": record[self.cfg.instruction_field]}]
        if fmt == "alpaca":
            text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            return [{"role": "user", "content": text}]
        name, _, text = self._turn_keys()
        _, assistant = self._last_turns(record)
        return [{"role": self._role(m), "content": m[text]} for m in record[name][:assistant]]

    def _turn_keys(self) -> tuple[str, str, str]:
        """The turns' list field, and each turn's speaker and text keys."""
        if self.cfg.format == "sharegpt":
            return SHAREGPT_FIELD, "from", "value"
        return self.cfg.messages_field, "role", "content"

    def _role(self, turn: dict) -> str:
        role = turn[self._turn_keys()[1]]
        return SHAREGPT_ROLES.get(role, role) if self.cfg.format == "sharegpt" else role

    def _last_turns(self, record: dict) -> tuple[int, int]:
        name, speaker, text = self._turn_keys()
        if name not in record:
            raise RowError("missing_field", name, f"record has no field {name!r}")
        messages = record[name]
        if not isinstance(messages, list) or not messages:
            raise RowError("malformed_messages", name, f"expected a non-empty list of {{{speaker}, {text}}} turns")
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or not isinstance(turn.get(speaker), str):
                raise RowError("malformed_messages", f"{name}[{i}].{speaker}", f"each turn needs a string {speaker}")
            if self.cfg.format == "sharegpt" and turn[speaker] not in SHAREGPT_ROLES:
                raise RowError("malformed_messages", f"{name}[{i}].{speaker}",
                               f"unknown speaker {turn[speaker]!r} (expected human, gpt or system)")
            if not isinstance(turn.get(text), str):
                raise RowError("not_a_string", f"{name}[{i}].{text}", f"each turn needs a string {text}")
        assistant = len(messages) - 1
        if self._role(messages[assistant]) != "assistant":
            raise RowError("malformed_messages", f"{name}[{assistant}].{speaker}",
                           "the last turn must be the assistant's")
        users = [i for i, m in enumerate(messages[:assistant]) if self._role(m) == "user"]
        if not users:
            raise RowError("malformed_messages", name, "no user turn before the last assistant turn")
        return users[-1], assistant
