"""The generation engines behind ``eval.engine``: one contract, token-id prompts in, greedy token ids out.

Prompts arrive rendered (chat template, then the JSR prefill ids); every engine returns the greedy continuation
cut at (and without) the model's first end token, so RSR, JSR, the judges, utility and drift never know which
engine ran. ``hf`` (static batches, in generate.py) is the reference the others are tested against.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lookahead_ray.errors import ConfigError, LookaheadError
from lookahead_ray.eval.service_io import api_key, read_cache


class GenerationError(LookaheadError, RuntimeError):
    """An engine could not produce a prompt's continuation (a server that kept failing, a request the engine
    rejected); names the engine or URL and the prompt id."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line

    def __str__(self) -> str:  # Ray Data appends its retry advice to args: the one line stays one line
        return self.line

    def __reduce__(self):
        return (GenerationError, (self.line,))


def end_tokens(model_generation_config: Any, tokenizer: Any) -> list[int]:
    """The model's end tokens: its generation config may list several (end of turn and end of text)."""
    eos = model_generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def model_end_tokens(model_dir: str, tokenizer: Any) -> list[int]:
    """end_tokens of a model directory without loading its weights (generation_config.json, else config.json)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return end_tokens(GenerationConfig.from_pretrained(model_dir), tokenizer)
    except OSError:
        return end_tokens(GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)), tokenizer)


def cut_at_end(tokens: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return list(tokens[:i])
    return list(tokens)


# --- hf_continuous -------------------------------------------------------------------------------------------------

def continuous_generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                        cb: dict[str, int], ids: list[str]) -> list[list[int]]:
    """Greedy continuations with transformers' continuous batching (paged KV cache, requests join and leave the
    running batch as they finish), all ``prompts`` in one call so the cache stays full."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    eos = end_tokens(model.generation_config, tokenizer)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
    # warmup captures CUDA graphs: nothing to capture on CPU, and a GPU run pays it once per call anyway.
    outputs = model.generate_batch(inputs=prompts, generation_config=generation,
                                   continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False,
                                   warmup=False)
    continuations = []
    for i, prompt_id in enumerate(ids):
        out = outputs.get(f"req_{i}")
        if out is None or out.error:
            raise GenerationError(f"eval.engine hf_continuous: prompt {prompt_id}: "
                                  f"{out.error if out is not None else 'no output returned'}")
        continuations.append(cut_at_end(out.generated_tokens, eos))
    return continuations


# --- openai ---------------------------------------------------------------------------------------------------------

_RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class CompletionsClient:
    """Greedy completions from an OpenAI-compatible server, ``max_concurrency`` at a time, each retried with
    backoff; every answer is appended to a JSONL cache as it arrives, so a rerun resends only what is missing."""

    def __init__(self, server: dict[str, Any], model: str, max_new_tokens: int):
        self.server, self.model, self.max_new_tokens = server, model, max_new_tokens
        self.url = server["url"].rstrip("/") + "/completions"
        self._key = api_key(server.get("api_key_env"), "eval.server.api_key_env")
        self.cache_path = Path(server["cache_dir"]) / "completions.jsonl"
        self._cache = read_cache(self.cache_path)
        self._lock = threading.Lock()
        self._failed: GenerationError | None = None
        self.sent = 0

    def _key_of(self, prompt: list[int]) -> str:
        # What the server is asked, exactly: another URL, model, format, length or extra field is another answer.
        s = self.server
        return hashlib.sha256(json.dumps([self.url, self.model, s["prompt_format"], s.get("extra_body") or {},
                                          self.max_new_tokens, prompt], sort_keys=True).encode()).hexdigest()

    def complete(self, ids: list[str], prompts: list[list[int]], texts: list[str] | None) -> list[dict]:
        """One ``{"text", "token_ids" (or None), "new_tokens"}`` per prompt, in order."""
        if self._failed is not None:  # Ray Data may hand this actor more batches after the run has failed
            raise self._failed
        keys = [self._key_of(p) for p in prompts]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        with ThreadPoolExecutor(max_workers=self.server["max_concurrency"]) as pool:
            futures = [pool.submit(self._ask, ids[i], prompts[i] if texts is None else texts[i], keys[i])
                       for i in missing]
            try:
                for future in futures:
                    future.result()
            except GenerationError as exc:
                self._failed = exc
                raise
            finally:
                for future in futures:  # after a fatal error, queued prompts are not sent
                    future.cancel()
        return [self._cache[k] for k in keys]

    def _ask(self, prompt_id: str, prompt: list[int] | str, key: str) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_new_tokens, "temperature": 0,
                **(self.server.get("extra_body") or {})}
        data = json.dumps(body).encode()
        delay, last = self.server["backoff_seconds"], ""
        for attempt in range(self.server["max_retries"] + 1):
            with self._lock:
                self.sent += 1
            try:
                request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"},
                                                 method="POST")
                if self._key:  # unredirected: never sent on to the host of a redirect
                    request.add_unredirected_header("Authorization", f"Bearer {self._key}")
                with urllib.request.urlopen(request, timeout=self.server["timeout_seconds"]) as reply:
                    answer = _parse_completion(json.loads(reply.read()))
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read(300).decode("utf-8", "replace").strip().replace("\n", " ")
                last = f"HTTP {exc.code}" + (f" {detail}" if detail else "")
                if exc.code not in _RETRYABLE:  # the server refuses this request: asking again changes nothing
                    raise self._failure(prompt_id, 1, last) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (KeyError, IndexError, TypeError, ValueError):
                last = "malformed reply (no choices[0].text)"
            if attempt == self.server["max_retries"]:
                raise self._failure(prompt_id, attempt + 1, last) from None
            time.sleep(delay)
            delay *= 2
        entry = {"key": key, **answer}
        with self._lock:
            self._cache[key] = entry
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def _failure(self, prompt_id: str, attempts: int, last: str) -> GenerationError:
        text = (f"eval.server {self.url} failed prompt {prompt_id} after {attempts} attempt(s) (last: {last}); "
                f"the {len(self._cache)} completions received are kept in {self.cache_path} and a rerun resumes "
                "from them")
        return GenerationError(text.replace(self._key, "***") if self._key else text)


def _parse_completion(reply: dict) -> dict:
    choice = reply["choices"][0]
    text = choice["text"]
    if not isinstance(text, str):
        raise ValueError("text is not a string")
    # vLLM returns the continuation's ids when asked (extra_body: {return_token_ids: true}); other servers: text.
    token_ids = choice.get("token_ids")
    if token_ids is not None and not all(isinstance(t, int) for t in token_ids):
        raise ValueError("token_ids are not integers")
    usage = reply.get("usage") or {}
    # An answer that stopped at an end token: the servers count that token (transformers serve, vLLM), the
    # contract does not. Token ids are cut by the caller.
    new_tokens = int(usage.get("completion_tokens", 0)) - (choice.get("finish_reason") == "stop")
    return {"text": text, "token_ids": token_ids, "new_tokens": max(new_tokens, 0)}


# --- vllm -----------------------------------------------------------------------------------------------------------

def vllm_preflight(cluster_gpus: float) -> None:
    """One line, before anything starts, where vLLM cannot run: never a silent fallback to another engine."""
    if cluster_gpus <= 0:
        raise ConfigError("eval.engine is vllm, but the Ray cluster has no GPU; vLLM needs GPUs (use eval.engine "
                          "hf or hf_continuous on CPU)")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"eval.engine is vllm, but vLLM is not installed in this Python ({exc}); install it "
                          "with pip install 'lookahead-ray[vllm]'") from None


def vllm_processor_kwargs(model_dir: str, vllm_cfg: dict[str, Any]) -> dict[str, Any]:
    """eval.vllm -> the arguments of ``ray.data.llm.vLLMEngineProcessorConfig``. The processor's own chat
    template, tokenizer and detokenizer stages are off: the prompts come in as this project's token ids."""
    engine_kwargs = {"tensor_parallel_size": vllm_cfg["tensor_parallel_size"],
                     "pipeline_parallel_size": vllm_cfg["pipeline_parallel_size"],
                     **(vllm_cfg.get("engine_kwargs") or {})}
    kwargs = {"model_source": model_dir, "engine_kwargs": engine_kwargs, "concurrency": vllm_cfg["concurrency"],
              "batch_size": vllm_cfg["batch_size"], "chat_template_stage": False, "tokenize_stage": False,
              "detokenize_stage": False}
    if vllm_cfg.get("accelerator_type"):
        kwargs["accelerator_type"] = vllm_cfg["accelerator_type"]
    return kwargs


def vllm_sampling_params(max_new_tokens: int, eos: list[int]) -> dict[str, Any]:
    """Greedy, stopped at the model's end tokens, ids back (the text is decoded here, as for the other engines)."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens, "stop_token_ids": eos, "detokenize": False}
