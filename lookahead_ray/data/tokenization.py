"""Training tokenisation of (previewed) records: chat template, answer + EOS, answer-only loss mask.

The prompt (optional system turn + conversation up to the trained answer, with the generation header) and
the answer are tokenized separately and concatenated, so the boundary is exact: every prompt token gets
label -100 and every answer token, the first one included, is kept. (Tokenizing prompt+answer together and
masking "len(prompt) + 1" tokens is a known off-by-one that drops the first answer token, which is exactly
the token LookAhead Tuning protects.)

Needs a tokenizer but no Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lookahead_ray.config import TokenizationConfig
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import ConfigError, RowError
from lookahead_ray.prompts import PromptRenderer, prompt_messages, render_prompt

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


class ExampleTokenizer:
    """Turns records into ``input_ids`` / ``labels`` with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, cfg: TokenizationConfig, schema: RecordSchema):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"model.tokenizer: {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                              "set model.chat_template in the config")
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: the tokenizer has no EOS token; answers must end with one")
        self.tokenizer, self.cfg, self.schema = tokenizer, cfg, schema
        self.renderer = PromptRenderer(tokenizer)
        self._warned = False
        self._backend_encode: Any = None  # chosen on first use: the Rust tokenizer's batch encode, or False

    def prompt_text(self, record: dict) -> str:
        """The rendered prompt: system turn, conversation, and the assistant generation header."""
        return render_prompt(self.tokenizer, self._messages(record))

    def _messages(self, record: dict) -> list[dict[str, str]]:
        return prompt_messages(self.schema.prompt_messages(record), self.cfg.system_prompt, self.cfg.prompt_template)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens: straight from the Rust tokenizer when it gives the same ids as
        ``tokenizer(texts)`` (checked on the first texts), without the Python encodings and offsets."""
        if self._backend_encode is None:
            self._backend_encode = self._choose_backend_encode(texts[:8])
        if self._backend_encode is False:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [encoding.ids for encoding in self._backend_encode(texts, add_special_tokens=False)]

    def _choose_backend_encode(self, sample: list[str]) -> Any:
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is None:
            return False
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        same = [e.ids for e in encode(sample, add_special_tokens=False)] == \
            self.tokenizer(sample, add_special_tokens=False)["input_ids"]
        return encode if same else False

    def encode_many(self, records: list[dict], answers: list[str]) -> list[TokenizedExample | RowError]:
        """Tokenize records whose (previewed) answers are ``answers``.

        Over-long examples keep the whole prompt and lose the end of the answer (``truncated``); a prompt that
        leaves no room for one answer token is returned as a ``RowError`` (reason prompt_too_long).
        """
        if not records:
            return []
        prompts = self._encode(self.renderer.render_many([self._messages(r) for r in records]))
        if self.renderer.fast_path_disabled and not self._warned:
            self._warned = True
            logger.warning("chat template: rendering every prompt in full (slower, same output): %s",
                           self.renderer.fast_path_disabled)
        prefix_field = self.schema.cfg.answer_prefix_field
        bad: dict[int, RowError] = {}
        if prefix_field:  # a given (masked) start of the assistant turn, tokenized like a JSR prefill
            prefixes = []
            for i, record in enumerate(records):
                value = record.get(prefix_field) or ""
                if not isinstance(value, str):
                    bad[i] = RowError("not_a_string", prefix_field, f"expected a string, got {type(value).__name__}")
                    value = ""
                prefixes.append(value)
            prefix_ids = self._encode(prefixes)
            prompts = [p + x for p, x in zip(prompts, prefix_ids, strict=True)]
        answer_ids = self._encode(answers)
        eos, limit = self.tokenizer.eos_token_id, self.cfg.max_seq_len
        out: list[TokenizedExample | RowError] = []
        for i, (prompt, answer) in enumerate(zip(prompts, answer_ids, strict=True)):
            if i in bad:
                out.append(bad[i])
                continue
            answer = answer + [eos]
            room = limit - len(prompt)
            if room < 1:
                out.append(RowError("prompt_too_long", None,
                                    f"prompt is {len(prompt)} tokens, max_seq_len is {limit}"))
                continue
            truncated = len(answer) > room
            answer = answer[:room]
            out.append(TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, truncated))
        return out
