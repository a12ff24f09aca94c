"""Adaptive m (``preview.adaptive_nll_threshold``): per example, preview only the answer tokens the seed model would
not produce by itself.

The preview keeps the first answer tokens from being learned without a hint, which is what keeps the first-token
distribution near the seed's. Tokens the seed already expects need no such protection, and previewing them only
costs utility (the model never practises opening its answer without a preview, the test-time condition). So for
each example the seed scores the answer's first m tokens after the plain prompt (teacher-forced, the training
tokenisation) and the preview stops at the first k whose remaining opening (tokens k..m-1) costs the seed at most the
threshold in summed NLL; k = 0 leaves the prompt plain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lookahead_ray.data.tokenization import IGNORE_INDEX, TokenizedExample


def adaptive_preview_length(opening_nll: Sequence[float], m: int, threshold: float) -> int:
    """The fewest leading answer tokens k <= m to preview such that the seed's summed NLL of the opening's
    remaining tokens (k..m-1, of those the answer has) is at most ``threshold``."""
    nll = list(opening_nll[:m])
    remaining = sum(nll)
    for k, value in enumerate(nll):
        if remaining <= threshold:
            return k
        remaining -= value
    return len(nll)


class SeedOpeningScorer:
    """The seed model's per-token NLL of each example's first m answer tokens, after the plain prompt."""

    def __init__(self, model: Any, device: Any, pad_token_id: int, batch_size: int = 16):
        self.model, self.device, self.pad_token_id, self.batch_size = model, device, pad_token_id, batch_size

    @classmethod
    def for_config(cls, cfg: Any, tokenizer: Any) -> SeedOpeningScorer:
        """The seed of ``cfg``: ``model.name_or_path`` (or the tiny model built at ``train.seed``, the weights a
        tiny run starts from), in fp32 on CPU or bf16 on a GPU when the actor has one."""
        import torch

        from lookahead_ray.modeling import build_model

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(cfg.model, tokenizer, cfg.train.seed, dtype=dtype).to(device).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, device, pad)

    def opening_nll(self, examples: Sequence[TokenizedExample], m: int) -> list[list[float]]:
        """Per example, the NLL (nats) of each of its first m answer tokens (fewer when the answer is shorter)."""
        out: list[list[float]] = []
        for start in range(0, len(examples), self.batch_size):
            out += self._score(examples[start:start + self.batch_size], m)
        return out

    def _score(self, examples: Sequence[TokenizedExample], m: int) -> list[list[float]]:
        import torch

        # Only the prompt and the first m answer tokens matter: the rest of the answer is never scored.
        cut = [next((t for t, y in enumerate(e.labels) if y != IGNORE_INDEX), len(e.labels)) + m for e in examples]
        ids = [e.input_ids[:c] for e, c in zip(examples, cut, strict=True)]
        labels = [e.labels[:c] for e, c in zip(examples, cut, strict=True)]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for row, y in enumerate(labels):
            positions = [t for t in range(1, len(y)) if y[t] != IGNORE_INDEX]
            out.append([-float(logp[row, t - 1, y[t]]) for t in positions[:m]])
        return out
