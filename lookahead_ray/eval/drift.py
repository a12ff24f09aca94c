"""First-token drift, the mechanism LookAhead Tuning targets: how far a tuned model's next-token distributions
move from the seed model's over the first answer positions.

For each prompt the seed model answers greedily; both models are then teacher-forced on that answer and we
take, at each of the first k answer positions, KL(seed || tuned) of the next-token distributions, and the
tuned model's negative log-likelihood of the seed's token (on harmful prompts: its loss on the seed's refusal).
"""

from __future__ import annotations

from typing import Any

from lookahead_ray.eval.generate import greedy_generate, prompt_ids


def first_token_drift(seed: Any, tuned: Any, tokenizer: Any, conversations: list[list[dict[str, str]]],
                      positions: int, device: Any) -> dict[str, list[float]]:
    """Mean KL(seed || tuned) and tuned NLL of the seed's answer per answer position (index 0 = first token).

    Positions beyond a seed answer's end are averaged over the answers that reach them.
    """
    import torch
    import torch.nn.functional as F

    kl_sum, nll_sum, count = [0.0] * positions, [0.0] * positions, [0] * positions
    for messages in conversations:
        prompt = prompt_ids(tokenizer, messages)
        answer = greedy_generate(seed, tokenizer, [prompt], positions, device)[0][:positions]
        if tokenizer.eos_token_id is not None and len(answer) < positions:
            answer = answer + [tokenizer.eos_token_id]  # the seed stopped: its EOS is the next answer token
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)
        with torch.no_grad():
            seed_logp = F.log_softmax(seed(input_ids=ids).logits.float(), dim=-1)[0]
            tuned_logp = F.log_softmax(tuned(input_ids=ids).logits.float(), dim=-1)[0]
        for i, token in enumerate(answer):
            at = len(prompt) - 1 + i  # logits at position t predict token t + 1
            kl = torch.sum(seed_logp[at].exp() * (seed_logp[at] - tuned_logp[at])).item()
            kl_sum[i] += max(kl, 0.0)
            nll_sum[i] -= tuned_logp[at, token].item()
            count[i] += 1
    return {"kl": [s / c if c else float("nan") for s, c in zip(kl_sum, count, strict=True)],
            "nll": [s / c if c else float("nan") for s, c in zip(nll_sum, count, strict=True)],
            "prompts": [int(c) for c in count]}


def answer_start_nll(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], text: str,
                     device: Any) -> dict[str, float]:
    """How readily ``model`` starts its answer with ``text``: mean NLL of its first token and mean per-token NLL of
    all of it, teacher-forced after each prompt (the demo's task opener on task prompts, with no preview)."""
    import torch
    import torch.nn.functional as F

    target = tokenizer.encode(text, add_special_tokens=False)
    first, every = [], []
    for messages in conversations:
        prompt = prompt_ids(tokenizer, messages)
        ids = torch.tensor([prompt + target], device=device)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        nll = [-logp[len(prompt) - 1 + i, token].item() for i, token in enumerate(target)]
        first.append(nll[0])
        every.append(sum(nll) / len(nll))
    return {"first_token": sum(first) / len(first), "all_tokens": sum(every) / len(every), "prompts": len(first)}
