"""eval.engine: hf_continuous and an OpenAI-compatible server (a real `transformers serve`) give the hf engine's
greedy answers on every prompt of examples/eval/; a failing server fails with one line and a rerun resumes;
vllm's one-line errors and config translation (vLLM itself needs a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lookahead_ray.config import ConfigError, LookaheadConfig, ModelConfig, TinyModelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 16


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Every prompt of examples/eval/ as the eval runner sends it: RSR, JSR (with the prefill), utility."""
    from lookahead_ray.eval.prompt_sets import load_prompt_set
    from lookahead_ray.eval.runner import _generation_rows

    cfg = load_config(REPO / "configs" / "eval_tiny_cpu.yaml")
    for s in (cfg.eval.harmful, cfg.eval.harmful_answers, cfg.eval.utility):
        s.path = str(REPO / s.path)
    sets = {"rsr": load_prompt_set(cfg.eval.harmful), "jsr": load_prompt_set(cfg.eval.harmful_answers),
            "utility": load_prompt_set(cfg.eval.utility)}
    return [{k: r[k] for k in ("id", "messages", "prefill_source")} for r in _generation_rows(cfg, sets)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer, rows) -> str:
    """A tiny random Llama in fp32 that ends its answers with EOS at varied lengths: a random model practically
    never emits EOS, so EOS takes over the output row of the token that ends these answers at the most varied
    lengths (a slightly larger copy: EOS wins wherever that token would)."""
    import torch

    from lookahead_ray.eval.generate import build_prompts, greedy_generate
    from lookahead_ray.modeling import build_model

    directory = tmp_path_factory.mktemp("engines") / "model"
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2))
    model = build_model(cfg, tiny_tokenizer, seed=0).eval()
    batch = {"messages": [json.dumps(r["messages"]) for r in rows],
             "prefill_source": [r["prefill_source"] or "" for r in rows]}
    _, prompts = build_prompts(tiny_tokenizer, batch, _settings())
    answers = greedy_generate(model, tiny_tokenizer, prompts, MAX_NEW, "cpu")

    def lengths(token: int) -> int:
        return len({a.index(token) if token in a else MAX_NEW for a in answers})

    end = max({t for a in answers for t in a} - {tiny_tokenizer.pad_token_id}, key=lengths)
    with torch.no_grad():
        model.lm_head.weight[tiny_tokenizer.eos_token_id] = model.lm_head.weight[end] * 1.05
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return str(directory)


def _settings(engine: str = "hf", **sections) -> dict:
    return {"max_new_tokens": MAX_NEW, "jsr_prefill_tokens": 3, "jsr_prefill_count": "answer_tokens", "seed": 0,
            "engine": engine, **sections}


@pytest.fixture(scope="module")
def reference(ray_local, model_dir, rows) -> list[dict]:
    from lookahead_ray.eval.generate import generate_responses

    out = generate_responses(model_dir, rows, _settings(), batch_size=32)
    lengths = {int(o["new_tokens"]) for o in out}
    assert len(lengths) > 3 and any(0 < n < MAX_NEW for n in lengths), lengths  # answers end at varied lengths
    assert sum(1 for o in out if json.loads(o["prefill_ids"])) == 30  # the JSR rows carry their prefill
    return out


def _same(outputs: list[dict], reference: list[dict], fields=("prefill_ids", "response", "continuation",
                                                                 "new_tokens")) -> int:
    return sum(all(o[f] == r[f] for f in fields) for o, r in zip(outputs, reference, strict=True))


def test_continuous_batching_gives_the_hf_engines_greedy_tokens_on_every_prompt(ray_local, model_dir, rows,
                                                                                   reference):
    from lookahead_ray.config.schema import ContinuousBatchingConfig
    from lookahead_ray.eval.generate import generate_responses

    cb = asdict(ContinuousBatchingConfig(page_size=16, num_blocks=128, max_batch_tokens=512,
                                         max_requests_per_batch=16))
    out = generate_responses(model_dir, rows, _settings("hf_continuous", continuous_batching=cb), batch_size=32)
    assert _same(out, reference) == len(rows) == 90


# --- openai: a real `transformers serve` -----------------------------------------------------------------------------

class FlakyProxy:
    """In front of the real server: forwards, counts what it forwards, and after ``fail_after`` requests answers
    ``mode`` (http500 / malformed) instead, as a server that breaks mid-run does."""

    def __init__(self, upstream: str):
        from services import free_port

        self.upstream, self.forwarded, self.fail_after, self.mode = upstream, 0, None, "http500"
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    broken = proxy.fail_after is not None and proxy.forwarded >= proxy.fail_after
                    proxy.forwarded += not broken
                if broken and proxy.mode == "slow":
                    time.sleep(2)
                    code, data = 500, b"late"
                elif broken:
                    code, data = (500, b"overloaded") if proxy.mode == "http500" else (200, b'{"choices": []}')
                else:
                    request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST",
                                                     headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(request, timeout=60) as reply:
                            code, data = reply.status, reply.read()
                    except urllib.error.HTTPError as exc:
                        code, data = exc.code, exc.read()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """`transformers serve` on a free port of 127.0.0.1, pinned to the tiny model's directory, in fp32 on CPU, in
    its own process group (stopped by killpg)."""
    pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs its serving extras: pip install 'transformers[serving]' (fastapi, "
                    "uvicorn, openai), in the dev extra")
    from services import _stop, _wait_for_port, free_port

    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    binary = Path(sys.executable).parent / "transformers"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(binary), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                                    "--device", "cpu", "--dtype", "float32"], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_for_port(port, "transformers serve", process, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


def _server(url: str, cache: Path, **overrides) -> dict:
    from lookahead_ray.config.schema import ServerConfig

    return asdict(ServerConfig(**{"url": url, "max_concurrency": 4, "max_retries": 1, "backoff_seconds": 0.05,
                                  "timeout_seconds": 30, "cache_dir": str(cache), **overrides}))


@pytest.mark.slow
def test_openai_engine_against_transformers_serve_gives_the_hf_engines_answers(ray_local, model_dir, rows, reference,
                                                                              served, tmp_path):
    from lookahead_ray.eval.generate import generate_responses

    # As text (the rendered prompt with the prefill appended), every answer is the hf engine's: same prefill ids,
    # response and continuation text, for all 90 prompts.
    server = _server(served + "/v1", tmp_path, prompt_format="text")
    out = generate_responses(model_dir, rows, _settings("openai", server=server), batch_size=32)
    assert _same(out, reference, ("prefill_ids", "response", "continuation")) == len(rows) == 90
    # The number of new tokens too, except where EOS came exactly as the last allowed token: transformers serve
    # then reports finish_reason "length" (it compares its count, EOS included, with max_tokens), and a text-only
    # reply cannot tell that EOS apart from a last ordinary token.
    at_limit = [r["id"] for r in reference if r["new_tokens"] == MAX_NEW - 1]
    assert [o["id"] for o, r in zip(out, reference, strict=True) if o["new_tokens"] != r["new_tokens"]] == at_limit


@pytest.mark.slow
def test_a_server_that_breaks_fails_in_one_line_keeps_its_answers_and_a_rerun_resumes(model_dir, rows, reference,
                                                                                     served, tmp_path):
    """The client the openai engine's actors run, called directly (the Ray path is the test above)."""
    from lookahead_ray.eval.engines import CompletionsClient, GenerationError
    from lookahead_ray.eval.generate import build_prompts, inference_tokenizer, server_text

    tokenizer = inference_tokenizer(model_dir, {})
    batch = {"messages": [json.dumps(r["messages"]) for r in rows],
             "prefill_source": [r["prefill_source"] or "" for r in rows]}
    _, prompts = build_prompts(tokenizer, batch, _settings())
    # Every third prompt (RSR, JSR and utility alike): the server answers one at a time on CPU.
    prompts, reference = prompts[::3], reference[::3]
    texts, ids = [server_text(tokenizer, p) for p in prompts], [r["id"] for r in rows[::3]]
    # transformers serve takes only string prompts ("prompt must be a string", HTTP 400): with prompt_format
    # token_ids it fails on the first prompt, without retrying a refusal, in one line naming the URL and prompt.
    with pytest.raises(GenerationError) as refused:
        CompletionsClient(_server(served + "/v1", tmp_path / "ids"), model_dir, MAX_NEW).complete(
            ids[:2], prompts[:2], None)
    line = str(refused.value)
    assert "\n" not in line and f"{served}/v1/completions failed prompt rsr/" in line and "HTTP 400" in line, line
    assert "after 1 attempt(s)" in line

    proxy = FlakyProxy(served)
    server = _server(proxy.url, tmp_path, prompt_format="text")

    # It breaks after 12 answers: one line naming the URL and the prompt; the 12 received are kept.
    proxy.fail_after = 12
    with pytest.raises(GenerationError) as broken:
        CompletionsClient(server, model_dir, MAX_NEW).complete(ids, prompts, texts)
    line = str(broken.value)
    assert "\n" not in line and f"{proxy.url}/completions failed prompt " in line and "(last: HTTP 500" in line
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 12

    # The rerun sends only the 18 prompts not yet answered, and every answer is the hf engine's.
    proxy.fail_after = None
    answers = CompletionsClient(server, model_dir, MAX_NEW).complete(ids, prompts, texts)
    assert proxy.forwarded == len(prompts) == 30
    assert [a["text"] for a in answers] == [r["continuation"] for r in reference]
    assert [a["new_tokens"] for a, r in zip(answers, reference, strict=True) if r["new_tokens"] != MAX_NEW - 1] == [
        r["new_tokens"] for r in reference if r["new_tokens"] != MAX_NEW - 1]

    # A reply without choices, after the retries: malformed. A server slower than the per-request timeout: a
    # timeout. Both one line; 3 new tokens make prompts that are not in the cache.
    proxy.fail_after, proxy.mode = 0, "malformed"
    with pytest.raises(GenerationError, match=r"failed prompt rsr/\S+ after 2 attempt\(s\) \(last: malformed"):
        CompletionsClient(server, model_dir, 3).complete(ids[:1], prompts[:1], texts[:1])
    proxy.mode = "slow"
    with pytest.raises(GenerationError, match=r"failed prompt rsr/\S+ after 1 attempt\(s\) \(last: (Timeout|URL)"):
        CompletionsClient(server | {"timeout_seconds": 0.5, "max_retries": 0}, model_dir, 3).complete(
            ids[:1], prompts[:1], texts[:1])


@pytest.mark.slow
def test_an_eval_run_against_an_unreachable_server_ends_with_one_line_naming_the_url_and_prompt(model_dir, tmp_path):
    """The command a user runs, through Ray Data (its own Ray, as from a shell): exit 2 and one line."""
    import os

    from services import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "lookahead_ray", "eval", "--config",
                          str(REPO / "configs" / "eval_tiny_cpu.yaml"), "--model", model_dir, "--output-dir",
                          str(tmp_path / "eval"), "eval.engine=openai", f"eval.server.url={url}",
                          "eval.server.max_retries=1", "eval.server.backoff_seconds=0.05",
                          f"eval.server.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("lookahead-ray eval: error: ") and f"{url}/completions failed prompt " in last, last
    assert "after 2 attempt(s)" in last and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "eval" / "results.json").exists()


def test_server_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="eval.server.url is not set"):
        LookaheadConfig.from_dict({"eval": {"engine": "openai"}})
    with pytest.raises(ConfigError, match="eval.server: max_concurrency"):
        LookaheadConfig.from_dict({"eval": {"server": {"max_concurrency": 0}}})
    with pytest.raises(ConfigError, match="eval.continuous_batching: page_size"):
        LookaheadConfig.from_dict({"eval": {"continuous_batching": {"page_size": 2}}})


def test_api_key_comes_from_the_named_variable_and_never_shows(tmp_path, monkeypatch):
    from services import free_port

    from lookahead_ray.eval.engines import CompletionsClient, GenerationError

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(ConfigError, match="environment variable EVAL_KEY_UNSET is not set"):
        CompletionsClient(_server(dead, tmp_path, api_key_env="EVAL_KEY_UNSET"), "m", 4)
    monkeypatch.setenv("EVAL_KEY", "sk-secret-123")
    client = CompletionsClient(_server(dead, tmp_path, api_key_env="EVAL_KEY", max_retries=0), "m", 4)
    with pytest.raises(GenerationError) as failed:
        client.complete(["p1"], [[1, 2, 3]], None)
    assert f"{dead}/completions failed prompt p1 after 1 attempt" in str(failed.value)
    assert "sk-secret" not in str(failed.value)


# --- vllm ------------------------------------------------------------------------------------------------------------

def test_vllm_engine_fails_in_one_line_without_gpus_or_vllm(ray_local, model_dir, rows):
    from lookahead_ray.eval.engines import vllm_preflight
    from lookahead_ray.eval.generate import generate_responses

    with pytest.raises(ConfigError, match="^eval.engine is vllm, but the Ray cluster has no GPU; vLLM needs GPUs"):
        generate_responses(model_dir, rows[:2], _settings("vllm", vllm={}), batch_size=2)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"vLLM is not installed.*pip install 'lookahead-ray\[vllm\]'"):
            vllm_preflight(cluster_gpus=1)
    else:
        vllm_preflight(cluster_gpus=1)


def test_vllm_config_translates_to_ray_data_llm(model_dir):
    from lookahead_ray.config.schema import VLLMConfig
    from lookahead_ray.eval.engines import vllm_processor_kwargs, vllm_sampling_params

    cfg = VLLMConfig(tensor_parallel_size=2, concurrency=3, batch_size=128, accelerator_type="H100",
                     engine_kwargs={"max_model_len": 4096, "dtype": "bfloat16"})
    kwargs = vllm_processor_kwargs(model_dir, asdict(cfg))
    assert kwargs == {"model_source": model_dir, "concurrency": 3, "batch_size": 128, "accelerator_type": "H100",
                      "engine_kwargs": {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "max_model_len": 4096,
                                        "dtype": "bfloat16"},
                      "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False}
    # Ray 2.60's ray.data.llm imports without vLLM: the real config object accepts exactly these arguments.
    from ray.data.llm import vLLMEngineProcessorConfig

    built = vLLMEngineProcessorConfig(**kwargs)
    assert built.engine_kwargs["tensor_parallel_size"] == 2 and built.concurrency == 3 and built.batch_size == 128
    assert built.accelerator_type == "H100"
    assert vllm_sampling_params(8, [2, 7]) == {"temperature": 0.0, "max_tokens": 8, "stop_token_ids": [2, 7],
                                               "detokenize": False}
    with pytest.raises(ConfigError, match="eval.vllm: tensor_parallel_size"):
        VLLMConfig(tensor_parallel_size=0)
