"""Greedy generation for eval, run on Ray Data with the engine ``eval.engine`` names (see engines.py).

Prompts are rendered with the model's chat template; for JSR the assistant turn is prefilled with token ids
and the model continues after them. ``hf``: batches are left-padded and sorted by length inside the actor (the
model loaded once per actor); ``hf_continuous``: one continuous-batching call per actor; ``openai``: the actor
holds only the tokenizer and a client; ``vllm``: Ray Data's vLLM processor between a tokenizing and a
decoding step.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lookahead_ray.errors import ConfigError, LookaheadError
from lookahead_ray.eval.engines import CompletionsClient, continuous_generate, cut_at_end, end_tokens, model_end_tokens
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
    eos = end_tokens(model.generation_config, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return [cut_at_end(row, eos) for row in out[:, width:].tolist()]


def inference_tokenizer(model_dir: str, settings: dict[str, Any]) -> Any:
    """The tokenizer load_model_for_inference would give, without loading the weights (for the server engines)."""
    import os

    from lookahead_ray.modeling import adapter_base, load_tokenizer, local_model_dir

    model_dir = local_model_dir(model_dir)
    base = adapter_base(model_dir, settings.get("base_model"))
    own = base is None or os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))
    return load_tokenizer(model_dir if own else local_model_dir(base),
                          trust_remote_code=settings.get("trust_remote_code", False),
                          chat_template=settings.get("chat_template"), padding_side="left")


def server_text(tokenizer: Any, ids: list[int]) -> str:
    """The prompt as text for a server that only takes strings: it tokenizes with special tokens on, so a BOS
    the tokenizer adds itself is left out of the text (else the model would see two)."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    bos = tokenizer.bos_token
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text


class ResponseGenerator:
    """Ray Data UDF: rows with ``messages`` (JSON) and optional ``prefill_source`` -> prefill + response."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        import torch

        from lookahead_ray.config import ModelConfig
        from lookahead_ray.modeling import load_model_for_inference

        self.settings, self.engine = settings, settings.get("engine", "hf")
        torch.manual_seed(settings.get("seed", 0))
        if self.engine == "openai":
            self.tokenizer = inference_tokenizer(model_dir, settings)
            self.eos = model_end_tokens(model_dir, self.tokenizer)
            server = settings["server"]
            self.client = CompletionsClient(server, server.get("model") or model_dir, settings["max_new_tokens"])
            return
        model_cfg = ModelConfig(trust_remote_code=settings.get("trust_remote_code", False),
                                chat_template=settings.get("chat_template"))
        self.model, self.tokenizer, self.device = load_model_for_inference(model_dir, model_cfg,
                                                                           expect_gpu=settings.get("expect_gpu", False),
                                                                           base=settings.get("base_model"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prefills, prompts = build_prompts(self.tokenizer, batch, self.settings)
        ids, max_new = [str(i) for i in batch["id"]], self.settings["max_new_tokens"]
        if self.engine == "openai":
            texts = ([server_text(self.tokenizer, p) for p in prompts]
                     if self.settings["server"]["prompt_format"] == "text" else None)
            answers = self.client.complete(ids, prompts, texts)
            continuations = [a["text"] if a["token_ids"] is None else cut_at_end(a["token_ids"], self.eos)
                             for a in answers]
            return with_responses(batch, self.tokenizer, prefills, continuations,
                                  [a["new_tokens"] if isinstance(c, str) else len(c)
                                   for a, c in zip(answers, continuations, strict=True)])
        if self.engine == "hf_continuous":
            continuations = continuous_generate(self.model, self.tokenizer, prompts, max_new,
                                                self.settings["continuous_batching"], ids)
        else:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            continuations = [[] for _ in prompts]
            for i, out in zip(order, greedy_generate(self.model, self.tokenizer, [prompts[i] for i in order],
                                                     max_new, self.device), strict=True):
                continuations[i] = out
        return with_responses(batch, self.tokenizer, prefills, continuations)


def build_prompts(tokenizer: Any, batch: dict[str, np.ndarray], settings: dict[str, Any]
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """The JSR prefill ids (empty for RSR and utility prompts) and the full token-id prompt of every row."""
    prefills, prompts = [], []
    for messages, source in zip(batch["messages"], batch["prefill_source"], strict=True):
        prefill = (jsr_prefill_ids(tokenizer, source, settings["jsr_prefill_tokens"], settings["jsr_prefill_count"])
                   if source else [])
        prefills.append(prefill)
        prompts.append(prompt_ids(tokenizer, json.loads(messages), prefill))
    return prefills, prompts


def with_responses(batch: dict[str, np.ndarray], tokenizer: Any, prefills: list[list[int]],
                   continuations: list[list[int] | str], new_tokens: list[int] | None = None
                   ) -> dict[str, np.ndarray]:
    """The output columns. A continuation is token ids, or text where a server returned only text."""
    decode = tokenizer.decode
    texts = [c if isinstance(c, str) else decode(c, skip_special_tokens=True) for c in continuations]
    # The judged response is prefill + continuation, decoded together as the reference harness does; a text-only
    # continuation is appended to the decoded prefill (equal for byte-level tokenizers; a SentencePiece server
    # text drops the space the continuation's first token may start with: ask such a server for token ids).
    responses = [decode(p, skip_special_tokens=True) + c if isinstance(c, str) else
                 decode(p + c, skip_special_tokens=True) for p, c in zip(prefills, continuations, strict=True)]
    batch["prefill"] = np.array([decode(p, skip_special_tokens=True) for p in prefills], dtype=object)
    batch["response"] = np.array(responses, dtype=object)
    batch["continuation"] = np.array(texts, dtype=object)
    batch["prefill_ids"] = np.array([json.dumps(p) for p in prefills], dtype=object)
    batch["new_tokens"] = np.array(new_tokens if new_tokens is not None else [len(c) for c in continuations])
    return batch


class PromptBuilder:
    """Ray Data UDF for the vllm engine: rows -> token-id prompts, before Ray Data's vLLM processor."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        self.tokenizer, self.settings = inference_tokenizer(model_dir, settings), settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prefills, prompts = build_prompts(self.tokenizer, batch, self.settings)
        # A None appended and dropped keeps the column one object per row even where all prompts are equally long.
        batch["tokenized_prompt"] = np.array([np.array(p, dtype=np.int64) for p in prompts] + [None],
                                             dtype=object)[:-1]
        batch["prefill_ids"] = np.array([json.dumps(p) for p in prefills], dtype=object)
        return batch


class ResponseDecoder:
    """Ray Data UDF for the vllm engine: the processor's generated ids -> the same columns as the other engines."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        self.tokenizer = inference_tokenizer(model_dir, settings)
        self.eos = model_end_tokens(model_dir, self.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prefills = [json.loads(p) for p in batch["prefill_ids"]]
        continuations = [cut_at_end([int(t) for t in g], self.eos) for g in batch["generated_tokens"]]
        out = {k: batch[k] for k in ("id", "messages", "prefill_source")}
        return with_responses(out, self.tokenizer, prefills, continuations)


def _vllm_dataset(ds: Any, model_dir: str, settings: dict[str, Any], cpus_per_actor: float) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    from lookahead_ray.eval.engines import vllm_preflight, vllm_processor_kwargs, vllm_sampling_params
    from lookahead_ray.modeling import adapter_base, local_model_dir

    vllm_preflight(ray.cluster_resources().get("GPU", 0))
    if adapter_base(local_model_dir(model_dir), settings.get("base_model")) is not None:
        raise ConfigError(f"eval.engine is vllm, but {model_dir} is a LoRA adapter: merge it into its base first "
                          "(or use eval.engine hf / hf_continuous, which merge it on load)")
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    params = vllm_sampling_params(settings["max_new_tokens"],
                                  model_end_tokens(model_dir, inference_tokenizer(model_dir, settings)))
    processor = build_processor(
        vLLMEngineProcessorConfig(**vllm_processor_kwargs(model_dir, settings["vllm"])),
        preprocess=lambda row: {**row, "sampling_params": params},
        postprocess=lambda row: {k: row[k] for k in ("id", "messages", "prefill_source", "prefill_ids",
                                                     "generated_tokens")})
    pool = {"compute": ActorPoolStrategy(size=1), "num_cpus": cpus_per_actor, "batch_format": "numpy"}
    ds = ds.map_batches(PromptBuilder, fn_constructor_args=(model_dir, settings), **pool)
    return processor(ds).map_batches(ResponseDecoder, fn_constructor_args=(model_dir, settings), **pool)


def generate_responses(model_dir: str, rows: list[dict[str, Any]], settings: dict[str, Any], batch_size: int,
                       num_actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                       description: str = "generating") -> list[dict]:
    """Generate for ``rows`` ({id, messages, prefill_source}) on Ray Data; results in input order."""
    import copy
    import gc
    import math

    import ray.data
    from ray.data import ActorPoolStrategy

    from lookahead_ray import console

    console.quiet_libraries()

    engine = settings.get("engine", "hf")
    ds = ray.data.from_items([{**r, "messages": json.dumps(r["messages"]), "prefill_source": r.get("prefill_source")
                               or ""} for r in rows])
    if engine == "vllm":
        ds = _vllm_dataset(ds, model_dir, settings, cpus_per_actor)
    else:
        if engine == "hf_continuous":  # one continuous-batching call per actor keeps its cache full
            batch_size = math.ceil(len(rows) / num_actors)
        elif engine == "openai":  # a batch boundary would idle the client's threads
            batch_size = max(batch_size, 4 * settings["server"]["max_concurrency"])
        ds = ds.map_batches(ResponseGenerator, fn_constructor_args=(model_dir, settings), batch_size=batch_size,
                            batch_format="numpy", compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
                            num_gpus=gpus_per_actor)
    # A server's or engine's GenerationError itself (naming the URL and prompt), not a generic "UDF failed".
    ds.context.raise_original_map_exception = True
    try:
        return _collect(ds, rows, description)
    except LookaheadError as exc:
        error = copy.copy(console.raised_in_ray(exc))
    # The failed run's actors live as long as anything references its dataset, and the error's traceback does (a
    # caller that keeps the error, a Tune trial, a test, would wait forever for their CPUs): drop it, then collect
    # the executor's reference cycles, so the actors are released before the error reaches the caller.
    del ds
    gc.collect()
    error.__traceback__ = error.__cause__ = error.__context__ = None
    raise error from None


def _collect(ds: Any, rows: list[dict[str, Any]], description: str) -> list[dict]:
    from lookahead_ray import console

    by_id = {}
    with console.progress(len(rows), description, "prompt") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            size = len(batch["id"])
            by_id.update((batch["id"][i], {k: v[i] for k, v in batch.items()}) for i in range(size))
            bar.update(size)
    return [by_id[r["id"]] for r in rows]
