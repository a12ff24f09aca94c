"""The LookAhead Tuning data transform (Liu et al., 2025, arXiv 2503.19041), over plain records.

- vanilla: the record is unchanged.
- real:    instruction := instruction + C + detok(first m tokens of the answer); the answer is unchanged.
- virtual: instruction := instruction + C + P;  answer := P + answer.

Real mode follows the reference implementation (zjunlp/LookAheadTuning ``main.py``) exactly: the tokens are
``tokenizer.tokenize(answer)[:m]`` (no special tokens) and the preview text is
``tokenizer.convert_tokens_to_string(tokens)``. An answer shorter than m tokens is previewed whole, and
m = 0 previews nothing but still appends the connector, as the reference does.

Pure module: the tokenizer is passed in (anything with ``tokenize`` and ``convert_tokens_to_string``);
nothing here imports ray, torch or transformers.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from lookahead_ray.config import ConfigError, PreviewConfig
from lookahead_ray.data.records import RecordSchema
from lookahead_ray.errors import RowError

# Tokens a prefix must yield beyond m before its first m tokens are trusted (see AnswerPreviewer).
_PREFIX_MARGIN_TOKENS = 2


class TokenizerLike(Protocol):
    def tokenize(self, text: str) -> list[str]: ...

    def convert_tokens_to_string(self, tokens: list[str]) -> str: ...


def reference_preview_text(answer: str, m: int, tokenizer: TokenizerLike) -> str:
    """The reference's real-mode preview of one answer: tokenize all of it, keep m tokens, detokenise."""
    return tokenizer.convert_tokens_to_string(tokenizer.tokenize(answer)[:m])


def _is_tokenizers_backend(tokenizer: Any) -> bool:
    # Only when tokenize/convert_tokens_to_string are the stock Rust-backed ones may we call the backend
    # directly; a subclass that overrides them gets the (slower) reference path.
    cls = type(tokenizer)
    return (getattr(tokenizer, "backend_tokenizer", None) is not None
            and getattr(cls.tokenize, "__qualname__", "") == "TokenizersBackend.tokenize"
            and getattr(cls.convert_tokens_to_string, "__qualname__", "") == "TokenizersBackend.convert_tokens_to_string")


class AnswerPreviewer:
    """Computes real-mode previews for many answers at once, identical to :func:`reference_preview_text`.

    The reference tokenizes each whole answer to keep m tokens. Here only a prefix of the answer, cut at a
    whitespace boundary, is tokenized; it is used when it yields at least m + 2 tokens (or is the whole
    answer), so the cut cannot reach the first m tokens. With a Rust-backed tokenizer the prefixes go through
    ``encode_batch`` in one call. Parity with the reference is tested on GSM8K with a real Llama-family
    tokenizer.
    """

    def __init__(self, tokenizer: TokenizerLike, m: int, exact_span: bool = False):
        self.tokenizer, self.m, self.exact_span = tokenizer, m, exact_span
        self._backend = tokenizer.backend_tokenizer if _is_tokenizers_backend(tokenizer) else None
        if self._backend is not None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            self._id_to_token = [""] * (max(vocab.values()) + 1)
            for token, token_id in vocab.items():
                self._id_to_token[token_id] = token
        if exact_span and self._backend is None:
            raise ConfigError("preview.exact_span needs a fast (Rust-backed) tokenizer, which provides offsets")

    def with_m(self, m: int) -> AnswerPreviewer:
        """The same previewer for another m (the vocabulary table is shared, not rebuilt)."""
        other = copy.copy(self)
        other.m = m
        return other

    def preview_many(self, answers: Sequence[str]) -> list[str]:
        if self.m == 0:
            return ["" for _ in answers]
        out: list[str | None] = [None] * len(answers)
        pending = list(range(len(answers)))
        budget = max(32, 6 * self.m)
        while pending:
            cut = {i: self._cut(answers[i], budget) for i in pending}
            ready = [i for i in pending if cut[i] is not None]
            for i, text in zip(ready, self._preview_prefixes(answers, ready, cut), strict=True):
                if text is not None:
                    out[i] = text
            pending = [i for i in pending if out[i] is None]
            budget *= 4
        return out  # type: ignore[return-value]

    @staticmethod
    def _cut(answer: str, budget: int) -> str | None:
        """The answer up to the last whitespace before ``budget`` chars; None when there is none yet."""
        if len(answer) <= budget:
            return answer
        end = max(answer.rfind(" ", 0, budget), answer.rfind("\n", 0, budget))
        return answer[:end] if end > 0 else None

    def _preview_prefixes(self, answers: Sequence[str], ids: list[int], cut: dict[int, str | None]):
        need = self.m + _PREFIX_MARGIN_TOKENS
        if self._backend is None:
            for i in ids:
                tokens = self.tokenizer.tokenize(cut[i])
                complete = len(cut[i]) == len(answers[i]) or len(tokens) >= need
                yield self.tokenizer.convert_tokens_to_string(tokens[: self.m]) if complete else None
            return
        # Offsets are only needed for exact spans; encode_batch_fast skips computing them.
        encode = self._backend.encode_batch if self.exact_span else self._backend.encode_batch_fast
        encodings = encode([cut[i] for i in ids], add_special_tokens=False)
        decoder = self._backend.decoder
        id_to_token = self._id_to_token
        for i, enc in zip(ids, encodings, strict=True):
            token_ids = enc.ids
            if len(cut[i]) != len(answers[i]) and len(token_ids) < need:
                yield None
            elif self.exact_span:
                yield answers[i][: enc.offsets[min(self.m, len(token_ids)) - 1][1]] if token_ids else ""
            else:
                first = [id_to_token[t] for t in token_ids[: self.m]]
                yield decoder.decode(first) if decoder is not None else " ".join(first)


def keeps_plain(key: str, share: float, seed: int) -> bool:
    """Whether the row ``key`` keeps its plain prompt under a mixed preview (``preview.mix_plain_share``): a uniform
    draw from a hash of (seed, key), so the choice is the same whatever the batching, actors or arrival order."""
    if share <= 0 or share >= 1:
        return share >= 1
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def preview_records(
    records: Sequence[dict],
    cfg: PreviewConfig,
    schema: RecordSchema,
    previewer: AnswerPreviewer | None = None,
    plain: Sequence[bool] | None = None,
    lengths: Sequence[int] | None = None,
) -> list[dict]:
    """Apply the preview to each record and return new records (inputs are never mutated).

    Args:
        records: input records of the shape ``schema`` describes.
        cfg: mode, m, P and connector.
        schema: where the instruction and answer are.
        previewer: required in real mode (it holds the tokenizer).
        plain: per record, True to leave it unchanged (a mixed preview's plain share).
        lengths: real mode, per record: the answer tokens to preview instead of m (adaptive m); 0 leaves the
            record plain.

    Raises:
        RowError: a record lacks a field or has the wrong type (``row`` is the 0-based index in ``records``).
        ConfigError: real mode without a previewer.
    """
    if cfg.mode == "vanilla":
        return [dict(r) for r in records]
    parts = []
    for index, record in enumerate(records):
        try:
            parts.append(schema.extract(record))
        except RowError as exc:
            raise exc.at(None, index) from None
    m = [cfg.num_answer_tokens] * len(records) if lengths is None else list(lengths)
    keep = [bool(p) for p in plain] if plain is not None else [False] * len(records)
    if lengths is not None:
        keep = [k or n == 0 for k, n in zip(keep, m, strict=True)]
    if cfg.mode == "virtual":
        return [dict(r) if k else
                schema.replace(r, p.instruction + cfg.connector + cfg.virtual_prefix, cfg.virtual_prefix + p.answer)
                for r, p, k in zip(records, parts, keep, strict=True)]
    if previewer is None:
        raise ConfigError("preview.mode 'real' needs a tokenizer")
    previews: list[str | None] = [None] * len(records)
    for length in sorted({n for n, k in zip(m, keep, strict=True) if not k}):
        chosen = [i for i, (n, k) in enumerate(zip(m, keep, strict=True)) if n == length and not k]
        for i, text in zip(chosen, previewer.with_m(length).preview_many([parts[i].answer for i in chosen]), strict=True):
            previews[i] = text
    return [dict(r) if text is None else schema.replace(r, p.instruction + cfg.connector + text, p.answer)
            for r, p, text in zip(records, parts, previews, strict=True)]


def preview_record(record: dict, cfg: PreviewConfig, schema: RecordSchema,
                   tokenizer: TokenizerLike | None = None) -> dict:
    """Apply the preview to one record (convenience wrapper of :func:`preview_records`)."""
    previewer = AnswerPreviewer(tokenizer, cfg.num_answer_tokens, cfg.exact_span) if tokenizer else None
    return preview_records([record], cfg, schema, previewer)[0]
