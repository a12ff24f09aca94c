"""Batched greedy generation with transformers, run as a Ray Data callable class (model loaded once per actor).

Prompts are rendered with the model's chat template; for JSR the assistant turn is prefilled with token ids
and the model continues after them. Batches are left-padded and sorted by length inside the actor.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lookahead_ray.eval.safety import jsr_prefill_ids
from lookahead_ray.prompts import render_prompt


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], prefill: list[int] | None = None) -> list[int]:
    """Chat-template prompt with the generation header, then the prefill ids (if any)."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"] + list(prefill or [])


def greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    device: Any) -> list[list[int]]:
    """Greedy continuations of token-id prompts in one left-padded batch, cut at (and without) EOS."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    # The model's generation config may list several end tokens (e.g. end of turn and end of text).
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else (
        tokenizer.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    continuations = []
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        continuations.append(row[: ends[0]] if ends else row)
    return continuations


class ResponseGenerator:
    """Ray Data UDF: rows with ``messages`` (JSON) and optional ``prefill_source`` -> prefill + response."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        import torch

        from lookahead_ray.config import ModelConfig
        from lookahead_ray.modeling import load_model_for_inference

        torch.manual_seed(settings.get("seed", 0))
        model_cfg = ModelConfig(trust_remote_code=settings.get("trust_remote_code", False),
                                chat_template=settings.get("chat_template"))
        self.model, self.tokenizer, self.device = load_model_for_inference(model_dir, model_cfg,
                                                                           expect_gpu=settings.get("expect_gpu", False),
                                                                           base=settings.get("base_model"))
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prefills, prompts = [], []
        for messages, source in zip(batch["messages"], batch["prefill_source"], strict=True):
            prefill = (jsr_prefill_ids(self.tokenizer, source, self.settings["jsr_prefill_tokens"],
                                       self.settings["jsr_prefill_count"]) if source else [])
            prefills.append(prefill)
            prompts.append(prompt_ids(self.tokenizer, json.loads(messages), prefill))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        continuations: list[list[int]] = [[] for _ in prompts]
        for i, ids in zip(order, greedy_generate(self.model, self.tokenizer, [prompts[i] for i in order],
                                                 self.settings["max_new_tokens"], self.device), strict=True):
            continuations[i] = ids
        decode = self.tokenizer.decode
        # The judged response is prefill + continuation, decoded together as the reference harness does.
        batch["prefill"] = np.array([decode(p, skip_special_tokens=True) for p in prefills], dtype=object)
        batch["response"] = np.array([decode(p + c, skip_special_tokens=True)
                                      for p, c in zip(prefills, continuations, strict=True)], dtype=object)
        batch["continuation"] = np.array([decode(c, skip_special_tokens=True) for c in continuations], dtype=object)
        batch["prefill_ids"] = np.array([json.dumps(p) for p in prefills], dtype=object)
        batch["new_tokens"] = np.array([len(c) for c in continuations])
        return batch


def generate_responses(model_dir: str, rows: list[dict[str, Any]], settings: dict[str, Any], batch_size: int,
                       num_actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                       description: str = "generating") -> list[dict]:
    """Generate for ``rows`` ({id, messages, prefill_source}) on Ray Data; results in input order."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from lookahead_ray import console

    console.quiet_libraries()

    ds = ray.data.from_items([{**r, "messages": json.dumps(r["messages"]), "prefill_source": r.get("prefill_source")
                               or ""} for r in rows])
    ds = ds.map_batches(ResponseGenerator, fn_constructor_args=(model_dir, settings), batch_size=batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
                        num_gpus=gpus_per_actor)
    by_id = {}
    with console.progress(len(rows), description, "prompt") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            size = len(batch["id"])
            by_id.update((batch["id"][i], {k: v[i] for k, v in batch.items()}) for i in range(size))
            bar.update(size)
    return [by_id[r["id"]] for r in rows]
