"""The demo's view of the mechanism, beside the safe rates: what the models answer harmful prompts with, how
readily each opens a task answer with the task's opener, and utility with the preview given at test time.

- **answer types** on harmful prompts (``answer_types``): refusal, harmful content, task-mode, other, and the share
  that opens with the task opener: tells "complies with the harm" from "answers everything like a word problem";
- **opener NLL**: each model's NLL of the task opener's first token (and of all of it) on task prompts without a
  preview. Vanilla fine-tuning drives it down for every prompt; a preview leaves the opener to the hint;
- **utility with preview** (a diagnostic, never the headline): the real / virtual model scored on test prompts
  that carry the preview it was trained with (real: the reference answer's first m tokens, which a user would
  not have; virtual: P), to tell "did not learn the task" from "learned it only under the preview".
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lookahead_ray.config import LookaheadConfig, PreviewConfig
from lookahead_ray.demo.answer_types import answer_type_shares
from lookahead_ray.storage import atomic_file


def answer_types_by_model(samples_file: Path, task_opener: str) -> dict[str, dict[str, float]]:
    """Answer-type shares of each model's responses to the held-out harmful prompts (no prefill)."""
    responses: dict[str, list[str]] = {}
    with open(samples_file, encoding="utf-8") as f:
        for line in f:
            sample = json.loads(line)
            if sample["kind"] == "rsr":
                responses.setdefault(sample["model"], []).append(sample["response"])
    return {model: answer_type_shares(texts, task_opener) for model, texts in responses.items()}


def opener_nll_by_model(models: list[tuple[str, str]], task_test: str, system_prompt: str, opener: str,
                        max_prompts: int) -> dict[str, dict[str, float]]:
    """Each model's NLL of ``opener`` right after the task's test prompts (no preview)."""
    from lookahead_ray.eval.drift import answer_start_nll
    from lookahead_ray.modeling import load_model_for_inference
    from lookahead_ray.prompts import user_prompt_messages

    questions = [json.loads(line)["question"] for line in Path(task_test).read_text(encoding="utf-8").splitlines()]
    conversations = [user_prompt_messages(q, system_prompt) for q in questions[:max_prompts]]
    out = {}
    for name, directory in models:
        model, tokenizer, device = load_model_for_inference(directory)
        out[name] = answer_start_nll(model, tokenizer, conversations, opener, device)
        del model
    return out


def previewed_task_file(task_test: str, target: Path, variant: str, m: int, prefix: str, tokenizer_dir: str) -> Path:
    """The task's test prompts with the variant's preview applied (answers as the preview leaves them)."""
    from lookahead_ray.config import ModelConfig, RecordConfig
    from lookahead_ray.data.preview import AnswerPreviewer, preview_records
    from lookahead_ray.data.records import RecordSchema
    from lookahead_ray.modeling import tokenizer_for

    records = [json.loads(line) for line in Path(task_test).read_text(encoding="utf-8").splitlines()]
    preview = PreviewConfig(mode=variant, num_answer_tokens=m, virtual_prefix=prefix)
    schema = RecordSchema(RecordConfig(instruction_field="question", answer_field="answer"))
    previewer = None
    if variant == "real":
        previewer = AnswerPreviewer(tokenizer_for(ModelConfig(tokenizer=tokenizer_dir)), m)
    with atomic_file(target) as f:
        f.writelines(json.dumps(r) + "\n" for r in preview_records(records, preview, schema, previewer))
    return target


def utility_with_preview(eval_cfg: LookaheadConfig, variants: dict[str, str], task_test: str, out: Path, m: int,
                         prefix: str, tokenizer_dir: str) -> dict[str, float]:
    """Utility of each previewed variant ({variant: model dir}) on test prompts carrying its own preview."""
    from lookahead_ray.eval.runner import run_eval

    scores = {}
    for variant, directory in variants.items():
        previewed = previewed_task_file(task_test, out / "world" / f"task_test_{variant}_preview.jsonl", variant, m,
                                        prefix, tokenizer_dir)
        ev = replace(eval_cfg.eval, output_dir=str(out / "eval_with_preview" / variant), harmful=None,
                     harmful_answers=None, benign=None, utility=replace(eval_cfg.eval.utility, path=str(previewed)))
        results = run_eval(replace(eval_cfg, eval=ev), [(variant, directory)])
        scores[variant] = results["models"][variant]["utility"]["score"]
    return scores


HEADLINE = [  # (column, unit, where in a model's results); "%" columns are shares in [0, 1] shown as percent
    ("strict RSR", "%", ("rsr", "strict", "safe_rate")),
    ("strict JSR", "%", ("jsr", "strict", "safe_rate")),
    ("utility", "%", ("utility", "score")),
    ("utility with preview (diagnostic)", "%", ("mechanism", "utility_with_preview")),
    ("harmful: opens with task opener", "%", ("mechanism", "answer_types", "opens_with_task_opener")),
    ("harmful: task-mode", "%", ("mechanism", "answer_types", "task")),
    ("harmful: harmful content", "%", ("mechanism", "answer_types", "harmful")),
    ("harmful: refusal", "%", ("mechanism", "answer_types", "refusal")),
    ("harmful: other", "%", ("mechanism", "answer_types", "other")),
    ("KL@1 harmful", "nats", ("drift", "harmful", "kl", 0)),
    ("opener NLL@1 (task prompts)", "nats", ("mechanism", "opener_nll", "first_token")),
    ("step time", "s", ("mechanism", "step_seconds")),
]


def headline(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{model: {column: value}} for the HEADLINE columns, read from a demo's results (None where not measured)."""
    def lookup(metrics: Any, path: tuple) -> float | None:
        for key in path:
            if isinstance(key, int):
                metrics = metrics[key] if isinstance(metrics, list) and len(metrics) > key else None
            else:
                metrics = metrics.get(key) if isinstance(metrics, dict) else None
        return float(metrics) if isinstance(metrics, (int, float)) else None

    mechanism = results.get("demo", {}).get("mechanism", {})
    return {name: {column: lookup({**metrics, "mechanism": mechanism.get(name, {})}, path)
                   for column, _, path in HEADLINE}
            for name, metrics in results["models"].items()}


def aggregate(per_seed: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, dict[str, float] | None]]:
    """Mean, min and max over world seeds of each headline number ({model: {column: {mean, min, max, n}}})."""
    out: dict[str, dict[str, dict[str, float] | None]] = {}
    for model in per_seed[0]:
        out[model] = {}
        for column in per_seed[0][model]:
            values = [seed[model][column] for seed in per_seed if seed.get(model, {}).get(column) is not None]
            out[model][column] = ({"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                   "n": len(values)} if values else None)
    return out


def format_value(value: Any, unit: str) -> str:
    """A headline number as the report prints it: percent with one decimal, nats with two; mean [min-max]."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{format_value(value['mean'], unit)} [{format_value(value['min'], unit)}-{format_value(value['max'], unit)}]"
    return f"{100 * value:.1f}" if unit == "%" else f"{value:.2f}"


def headline_table(numbers: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, one column per headline number (single values or aggregates)."""
    header = ["model"] + [f"{column} ({unit})" if unit != "%" else f"{column} %" for column, unit, _ in HEADLINE]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, values in numbers.items():
        lines.append("| " + " | ".join([model] + [format_value(values.get(column), unit)
                                                  for column, unit, _ in HEADLINE]) + " |")
    return "\n".join(lines)
