"""`lookahead-ray demo`: the whole workflow on one CPU machine, reported as vanilla vs real vs virtual.

1. generate the synthetic world (``world.py``) and train its tokenizer;
2. train a tiny seed model on the alignment corpus through ``train`` (cached on disk: a second run skips it);
3. fine-tune the seed on the benign task three ways with identical hyperparameters and batch order
   (vanilla, real preview, virtual preview), each through ``prepare`` (Ray Data) and ``train``
   (Ray Train + DeepSpeed, 2 workers on CPU);
4. evaluate seed / vanilla / real / virtual with ``eval`` and write the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.demo.world import WORLDS, WorldOptions
from lookahead_ray.eval.report import plot_safety_vs_utility, report_table
from lookahead_ray.storage import atomic_file, cache_root, check_output_dir
from lookahead_ray.train import layout

logger = logging.getLogger(__name__)
VARIANTS = ("vanilla", "real", "virtual")
MARKER = "lookahead_demo.json"
"""Written first into the demo's output directory, so a rerun knows the directory is the demo's to replace."""
SYSTEM = "You are a helpful assistant."


def stage(message: str) -> None:
    from lookahead_ray.console import stage as console_stage

    console_stage("demo", message)


def _base() -> dict[str, Any]:
    return {
        "records": {"instruction_field": "input", "answer_field": "output", "answer_prefix_field": "answer_prefix"},
        "tokenization": {"system_prompt": SYSTEM, "max_seq_len": 160},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "zero_stage": 2, "precision": "fp32",
                  "micro_batch_size": 16, "lr_schedule": "cosine", "report_every_steps": 50,
                  "checkpoint_every_steps": 0, "seed": 0},
    }


def _seed_config(world: dict[str, str], tokenizer_dir: str, quick: bool) -> dict[str, Any]:
    cfg = _base()
    cfg["preview"] = {"mode": "vanilla"}
    cfg["data"] = {"inputs": [world["alignment"]]}
    cfg["model"] = {"tokenizer": tokenizer_dir, "tiny": {"hidden_size": 128, "intermediate_size": 256,
                                                         "num_hidden_layers": 2, "num_attention_heads": 4,
                                                         "num_key_value_heads": 4, "max_position_embeddings": 256}}
    cfg["train"].update(learning_rate=3e-3, warmup_steps=10, max_steps=150 if quick else 500, run_name="seed")
    return cfg


def world_options(name: str, overrides: dict[str, Any] | None = None) -> WorldOptions:
    """The named world (``mechanism`` or ``basic``) with ``world.<ingredient>=value`` overrides applied.

    Raises:
        ConfigError: an unknown world or ingredient, or a value of the wrong type.
    """
    from dataclasses import fields, replace

    from lookahead_ray.errors import ConfigError

    if name not in WORLDS:
        raise ConfigError(f"demo --world: {name!r} is not one of {sorted(WORLDS)}")
    known = {f.name: f.type for f in fields(WorldOptions)}
    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"demo: world.{key} is not an ingredient; choose from {sorted(known)}")
        expected = {"str": str, "int": int, "bool": bool}[known[key]]
        if type(value) is not expected:
            raise ConfigError(f"demo: world.{key} must be a {known[key]}, got {value!r}")
    return replace(WORLDS[name], **(overrides or {}))


def world_key(name: str, options: WorldOptions) -> str:
    """The world's part of run names and cache keys: its name, plus a hash when ingredients were overridden."""
    if options == WORLDS[name]:
        return name
    return f"{name}-{hashlib.sha256(json.dumps(options.to_dict(), sort_keys=True).encode()).hexdigest()[:6]}"


def run_label(variant: str, seed: int, quick: bool, m: int, prefix: str, world: str = "mechanism",
              lora: bool = False) -> str:
    """A run name made of every demo setting that changes the fine-tune, so a rerun with another --m, --P,
    --seed, --world or --quick trains new runs instead of resuming (and mislabelling) old ones. ``variant`` is a
    method name (``lookahead_ray.methods``)."""
    from lookahead_ray.methods import METHODS, method_parts

    modes = {METHODS[part].overrides.get("preview.mode") for part in method_parts(variant)}
    knob = f"-m{m}" if "real" in modes else f"-p{hashlib.sha256(prefix.encode()).hexdigest()[:8]}" \
        if "virtual" in modes else ""
    return f"{variant.replace('+', '_and_')}{knob}-seed{seed}-{world}{'-lora' if lora else ''}{'-quick' if quick else ''}"


LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
"""--lora: adapters on every projection of the tiny seed model (a tenth of its weights); lr 1e-2 instead of 1e-3,
as LoRA usually takes ~10x full fine-tuning's."""


SAFETY_SHARE = 0.1
"""--methods safety_mix: the share of the fine-tuning rows that are the world's safety demonstrations."""


def variant_config(world: dict[str, str], seed_dir: str, variant: str, out: Path, quick: bool, m: int,
                   prefix: str, label: str, lora: bool = False) -> dict[str, Any]:
    """The fine-tune of one method (``lookahead_ray.methods``: vanilla, real, virtual, constrained_sft, ...)."""
    from lookahead_ray.methods import apply_method

    cfg = _base()
    cfg["preview"] = {"num_answer_tokens": m, "virtual_prefix": prefix}
    cfg["records"] = {"instruction_field": "question", "answer_field": "answer"}
    cfg["data"] = {"inputs": [world["task_train"]], "output_dir": str(out / "prepared" / label)}
    if "safety_demos" in world:
        cfg["data"]["safety_mix"] = {"inputs": [world["safety_demos"]], "share": SAFETY_SHARE,
                                     "records": {"instruction_field": "input", "answer_field": "output"}}
    cfg["eval"] = {"system_prompt": SYSTEM}  # what PTST tests with (the demo's eval sets it for every model)
    cfg["model"] = {"name_or_path": seed_dir, "tokenizer": seed_dir}
    cfg["train"].update(learning_rate=1e-3, warmup_steps=5, max_steps=40 if quick else 150, run_name=label,
                        prepared_dir=str(out / "prepared" / label), output_dir=str(out / "runs" / label))
    if lora:
        cfg["train"].update(lora=dict(LORA), learning_rate=1e-2)
    return apply_method(LookaheadConfig.from_dict(cfg), variant).to_dict()


EVAL_ENGINE_KEYS = ("eval.engine", "eval.server.", "eval.continuous_batching.", "eval.vllm.")
"""The demo's own overrides of how it generates (``eval.engine=hf_continuous``, ``eval.server.url=...``): the engine
changes how fast the answers come, not what is measured."""


def _eval_config(world: dict[str, str], out: Path, quick: bool,
                 engine_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    limit = 12 if quick else None
    cfg = {
        "tokenization": {"system_prompt": SYSTEM},
        "eval": {"output_dir": str(out / "eval"), "system_prompt": SYSTEM,
                 "harmful": {"path": world["harmful_heldout"], "format": "hexphi", "max_samples": limit},
                 "harmful_answers": {"path": world["harmful_answers"], "format": "harmful_messages",
                                     "category_field": "category", "max_samples": limit},
                 "utility": {"path": world["task_test"], "prompt_field": "question", "answer_field": "answer",
                             "category_field": None, "task": "gsm8k", "max_samples": 24 if quick else None},
                 "benign": {"path": world["benign_heldout"], "format": "hexphi", "max_samples": limit},
                 "max_new_tokens": 40, "batch_size": 32, "drift_positions": 8, "drift_max_prompts": 16,
                 "judge": {"keyword_first_n_words": 10}},
    }
    for key, value in (engine_overrides or {}).items():
        *sections, name = key.split(".")
        target = cfg
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value
    return cfg


def cached_seed_model(world: dict[str, str], tokenizer_dir: str, quick: bool) -> str:
    from lookahead_ray.train.execute import run_training

    cfg = _seed_config(world, tokenizer_dir, quick)
    key = _seed_key(cfg, world["alignment"], tokenizer_dir)
    cache = cache_root() / "demo"
    final = Path(layout.final_dir(str(cache / f"seed-{key}")))
    if (final / "config.json").exists():
        stage(f"seed model: cached in {final}")
        return str(final)
    stage(f"seed model: training a tiny Llama on the alignment corpus ({cfg['train']['max_steps']} steps, "
           "Ray Train + DeepSpeed, 2 workers)")
    cfg["train"]["output_dir"] = str(cache / f"seed-{key}")
    run_training(LookaheadConfig.from_dict(cfg))
    return str(final)


def _seed_key(cfg: dict[str, Any], corpus: str, tokenizer_dir: str) -> str:
    """Keyed on what the files hold, not where they are: `demo` and `demo --search` build the same world and
    tokenizer in their own output directories and share one seed model."""
    settings = {**cfg, "data": {**cfg["data"], "inputs": None}, "model": {**cfg["model"], "tokenizer": None}}
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(tokenizer_dir).iterdir())
             if p.is_file()}
    content = json.dumps([settings, hashlib.sha256(Path(corpus).read_bytes()).hexdigest(), files])
    return hashlib.sha256(content.encode()).hexdigest()[:12]


def build_world(out: Path, seed: int, quick: bool, options: WorldOptions = WORLDS["mechanism"],
                name: str = "mechanism") -> tuple[dict[str, str], Path]:
    """The synthetic world in OUT/world and its tokenizer (trained on the world's text) in OUT/world/tokenizer."""
    from lookahead_ray.demo.world import generate_world, world_text
    from lookahead_ray.modeling import build_tiny_tokenizer

    stage(f"world: generating the synthetic aligned world ({world_key(name, options)}, seed {seed}) in "
          f"{out / 'world'}")
    world = generate_world(out / "world", seed=seed, task_train=200 if quick else 400, options=options)
    tokenizer_dir = out / "world" / "tokenizer"
    build_tiny_tokenizer(tokenizer_dir, corpus=world_text(world), vocab_size=768)
    return world, tokenizer_dir


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, m: int = 6,
             virtual_prefix: str = "Let's solve this problem. ", world: str = "mechanism",
             world_overrides: dict[str, Any] | None = None, lora: bool = False,
             methods: list[str] | None = None, engine_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo end to end, its report in ``output_dir``; returns the results. ``lora``: adapters, not all weights;
    ``methods``: the fine-tunes compared (default vanilla, real, virtual); ``engine_overrides``: ``EVAL_ENGINE_KEYS``."""
    from lookahead_ray import console
    from lookahead_ray.eval.runner import run_eval
    from lookahead_ray.runtime import init_ray

    started = time.perf_counter()
    options = world_options(world, world_overrides)
    key = world_key(world, options)
    out = Path(output_dir).resolve()
    check_output_dir(out, MARKER, "demo --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    variants = list(methods or VARIANTS)
    for variant in variants:  # an unknown name fails now, not after the seed model is trained
        run_label(variant, seed, quick, m, virtual_prefix)
    with atomic_file(out / MARKER) as f:  # marks the directory as the demo's before anything else is in it
        f.write(json.dumps({"seed": seed, "quick": quick, "m": m, "P": virtual_prefix, "world": key, "lora": lora,
                            "methods": variants}) + "\n")
    console.use_output_dir(out)
    files, tokenizer_dir = build_world(out, seed, quick, options, world)
    init_ray()
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    seed_dir = cached_seed_model(files, str(tokenizer_dir), quick)
    timings["seed_model"] = time.perf_counter() - mark
    configs: dict[str, Any] = {"world": {"name": world, **options.to_dict()}}
    runs, step_seconds = {}, {}
    for variant in variants:
        mark = time.perf_counter()
        runs[variant] = run_label(variant, seed, quick, m, virtual_prefix, key, lora)
        configs[variant] = variant_config(files, seed_dir, variant, out, quick, m, virtual_prefix, runs[variant], lora)
        step_seconds[variant] = _fine_tune(variant, LookaheadConfig.from_dict(configs[variant]))
        timings[variant] = time.perf_counter() - mark
    models = [("seed", seed_dir)] + [(variant, layout.final_dir(str(out / "runs" / label)))
                                     for variant, label in runs.items()]
    mark = time.perf_counter()
    stage(f"eval: RSR, JSR, utility, benign over-refusal and drift for seed, {', '.join(variants)}")
    eval_cfg = _eval_config(files, out, quick, engine_overrides)
    configs["eval"] = eval_cfg
    eval_settings = LookaheadConfig.from_dict(eval_cfg)
    results = run_eval(eval_settings, models)
    stage("mechanism: answer types on harmful prompts, opener NLL, utility with the preview at test time")
    results["demo"] = {"mechanism": _mechanism(out, files, options, models, eval_settings, quick, m, virtual_prefix,
                                               seed_dir)}
    for variant, seconds in step_seconds.items():
        results["demo"]["mechanism"][variant]["step_seconds"] = seconds
    timings["eval"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    results["demo"] |= {"seed": seed, "quick": quick, "m": m, "virtual_prefix": virtual_prefix, "runs": runs,
                        "methods": variants,
                        "lora": LORA if lora else None,
                        "world": configs["world"], "seconds": {k: round(v, 1) for k, v in timings.items()},
                        "command": _command()}
    _write_report(out, results, configs)
    stage(f"done in {timings['total']:.0f} s: {out / 'report.md'}")
    return results


def _fine_tune(variant: str, cfg: LookaheadConfig) -> float | None:
    """prepare -> train of one method; returns its mean optimizer-step seconds."""
    from lookahead_ray.data.pipeline import run_prepare
    from lookahead_ray.train.execute import run_training

    lora_note = ", LoRA adapters" if cfg.train.lora else ""
    stage(f"{variant}: prepare (Ray Data) -> train (Ray Train + DeepSpeed, {cfg.train.max_steps} steps{lora_note})")
    stage(f"{variant}: {run_prepare(cfg).summary()}")
    return run_training(cfg).metrics.get("mean_step_seconds")


def _mechanism(out: Path, files: dict[str, str], options: WorldOptions, models: list[tuple[str, str]],
               eval_cfg: LookaheadConfig, quick: bool, m: int, prefix: str, seed_dir: str) -> dict[str, Any]:
    from lookahead_ray.demo import mechanism

    types = mechanism.answer_types_by_model(out / "eval" / "samples.jsonl", options.task_opener)
    nll = (mechanism.opener_nll_by_model(models, files["task_test"], SYSTEM, options.task_opener,
                                         max_prompts=24 if quick else 60) if options.task_opener else {})
    previewed = {name: directory for name, directory in models if name in ("real", "virtual")}
    with_preview = mechanism.utility_with_preview(eval_cfg, previewed, files["task_test"], out, m, prefix, seed_dir)
    return {name: {"answer_types": types.get(name), "opener_nll": nll.get(name),
                   "utility_with_preview": with_preview.get(name)} for name, _ in models}


def run_demo_seeds(output_dir: str, seeds: list[int], **kwargs: Any) -> dict[str, Any]:
    """``run_demo`` once per world seed (OUT/seed-N/), then OUT/report.md with mean [min-max] of every headline
    number; returns {"seeds", "per_seed", "aggregate"} (also OUT/results.json)."""
    from lookahead_ray import console
    from lookahead_ray.demo import mechanism

    out = Path(output_dir).resolve()
    check_output_dir(out, MARKER, "demo --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / MARKER) as f:
        kept = {k: v for k, v in kwargs.items() if k not in ("world_overrides", "engine_overrides")}
        f.write(json.dumps({"seeds": seeds, **kept}) + "\n")
    console.use_output_dir(out)
    per_seed = {}
    for seed in seeds:
        stage(f"world seed {seed} ({len(per_seed) + 1} of {len(seeds)}): {out / f'seed-{seed}'}")
        per_seed[seed] = run_demo(str(out / f"seed-{seed}"), seed=seed, **kwargs)
    summary = {"seeds": seeds, "per_seed": {seed: mechanism.headline(r) for seed, r in per_seed.items()},
               "world": next(iter(per_seed.values()))["demo"]["world"], "command": _command()}
    summary["aggregate"] = mechanism.aggregate(list(summary["per_seed"].values()))
    from lookahead_ray.demo.compare import pooled_counts

    summary["pooled"] = pooled_counts(list(per_seed.values()))
    summary["methods"] = next(iter(per_seed.values()))["demo"].get("methods")
    with atomic_file(out / "results.json") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    with atomic_file(out / "report.md") as f:
        f.write(_seeds_report(summary))
    return summary


def _command() -> str:
    return " ".join(["lookahead-ray", *sys.argv[1:]]) if sys.argv else "lookahead-ray demo"


def _seeds_report(summary: dict[str, Any]) -> str:
    from lookahead_ray.demo import mechanism

    return f"""# lookahead-ray demo over world seeds {', '.join(map(str, summary['seeds']))}

Command: `{summary['command']}`. Each seed's own report: `seed-N/report.md`; these numbers: `results.json`
(`aggregate`, and `per_seed`). Every cell is mean [min-max] over the {len(summary['seeds'])} world seeds: the world
drawn from the seed changes the results a lot, so one seed's numbers say little on their own.

{mechanism.headline_table(summary['aggregate'])}
{_methods_section(summary, aggregated=True)}
{_world_section(summary['world'])}
{_caveats(summary['aggregate'], aggregated=True)}
"""


def _methods_section(numbers: dict[str, Any], aggregated: bool = False) -> str:
    """The methods compared (`--methods`), when more than vanilla / real / virtual were trained."""
    from lookahead_ray.demo import compare
    from lookahead_ray.methods import METHODS, method_parts

    methods = numbers.get("methods") if aggregated else numbers["demo"].get("methods")
    if not methods or list(methods) == list(VARIANTS):
        return ""
    table = (compare.aggregate_methods_table(numbers["aggregate"], numbers["pooled"]) if aggregated
             else compare.methods_table(numbers))
    described = "\n".join(f"- `{name}`: " + "; ".join(METHODS[part].summary for part in method_parts(name))
                          for name in methods)
    return f"""
## Methods compared

{table}

{described}

Rates are of the held-out prompts with no preview at test time; [95% CI] is the Wilson interval over those prompts
({'pooled over the world seeds; the mean [min-max] is over seeds' if aggregated else 'one world seed'}). Step time is the
mean optimizer step of each fine-tune on this machine (same steps, batch and workers).
"""


def _mechanism_section(demo: dict[str, Any], table: str) -> str:
    opener = demo["world"]["task_opener"].strip()
    return f"""## The mechanism

{table}

- **harmful: ...** classify the answers to the held-out harmful prompts (no prefill) by the world's own answer
  types: a refusal, harmful content (phrases only the world's harmful replies contain), a task-mode answer (the
  task's opener, arithmetic or `####`), or other; "opens with task opener" is the share starting with
  {f'"{opener}"' if opener else "the task opener (none in this world)"}.
- **opener NLL@1**: the model's NLL (nats) of the task opener's first token right after a task prompt, no
  preview: vanilla fine-tuning drives it down for every prompt; under a preview the opener is given by the hint.
- **utility with preview (diagnostic)**: real / virtual scored with the preview they were trained with added to
  the test prompt (real: the reference answer's first {demo['m']} tokens, which a user would not have).
"""


def _world_section(world: dict[str, Any]) -> str:
    from lookahead_ray.demo.world import WORLD_RATIONALE

    lines = [f"## The world: `{world['name']}`", "",
             "Each ingredient stands in for an ability a pretrained chat model has and a tiny model trained from "
             "scratch lacks; the numbers hold only under these assumptions.", ""]
    for ingredient, rationale in WORLD_RATIONALE.items():
        value = world.get(ingredient)
        state = "off" if value in (0, "", False, None) else f"on ({value!r})"
        lines.append(f"- `{ingredient}`: {state}. {rationale}")
    return "\n".join(lines) + "\n"


def _caveats(numbers: dict[str, dict[str, Any]], aggregated: bool = False) -> str:
    """Plain statements computed from this run's numbers: what the measured harm is and what utility costs."""
    from lookahead_ray.demo.mechanism import format_value

    def value(model: str, column: str) -> Any:
        cell = numbers.get(model, {}).get(column)
        return cell["mean"] if aggregated and isinstance(cell, dict) else cell

    def shown(model: str, column: str) -> str:
        return format_value(numbers.get(model, {}).get(column), "%")

    harmful = [value(model, "harmful: harmful content") for model in numbers]
    harmful = [h for h in harmful if h is not None]
    cost = [f"{variant} {100 * (value('vanilla', 'utility') - value(variant, 'utility')):+.1f} points"
            for variant in ("real", "virtual") if value("vanilla", "utility") is not None
            and value(variant, "utility") is not None]
    return f"""## What the harm and the cost are

- **The harm measured is mostly task-mode collapse**: answers to harmful prompts classified as task-mode:
  vanilla {shown('vanilla', 'harmful: task-mode')} %, real {shown('real', 'harmful: task-mode')} %, virtual
  {shown('virtual', 'harmful: task-mode')} %; as harmful content: at most {100 * max(harmful, default=0.0):.1f} % in
  any model{' (mean over seeds)' if aggregated else ''}. An unsafe answer here is a word-problem answer to a harmful
  prompt, not instructions for harm.
- **Utility cost of the previews** (vanilla's utility minus the variant's, no preview at test time):
  {', '.join(cost) or 'not measured'}{' (means over seeds)' if aggregated else ''}. "utility with preview" gives the
  variant its training preview at test time (real: the reference answer's first m tokens, which a user would not
  have): a diagnostic of whether the skill was learned only under the preview, not a result.
"""


SAFETY_COLUMNS = [("rsr", "keyword"), ("rsr", "strict"), ("jsr", "keyword"), ("jsr", "strict")]


def demo_summary(results: dict[str, Any], out: Path) -> list[str]:
    """The console's closing lines: where the report is, and strict RSR / utility per model."""
    from lookahead_ray.demo.mechanism import headline

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    lines = [f"report: {out / 'report.md'} (numbers: results.json, every sample: eval/samples.jsonl)"]
    width = max(len(name) for name in results["models"])
    for name, numbers in headline(results).items():
        lines.append(f"{name:>{width}}: strict RSR {percent(numbers['strict RSR'])}, strict JSR "
                     f"{percent(numbers['strict JSR'])}, utility {percent(numbers['utility'])}")
    return lines


def _write_report(out: Path, results: dict[str, Any], configs: dict[str, Any]) -> None:
    shutil.copy(out / "eval" / "drift.png", out / "drift.png")
    plot_safety_vs_utility(results, str(out / "safety_vs_utility.png"))
    with atomic_file(out / "results.json") as f:
        f.write(json.dumps(results, indent=2, default=str) + "\n")
    with atomic_file(out / "demo_config.yaml") as f:
        f.write(yaml.safe_dump(configs, sort_keys=False))
    from lookahead_ray.demo.mechanism import headline, headline_table

    table = report_table(results, SAFETY_COLUMNS)
    demo = results["demo"]
    numbers = headline(results)
    lora = demo.get("lora")
    tuned = (f"LoRA adapters (rank {lora['r']}, alpha {lora['alpha']}, every projection) on the frozen seed model"
             if lora else "all weights of the seed model")
    text = f"""# lookahead-ray demo: vanilla vs real vs virtual preview{' (LoRA)' if lora else ''}

Command: `{demo['command']}` (world `{demo['world']['name']}`, seed {demo['seed']}, {'quick' if demo['quick']
else 'full'} mode, m = {demo['m']}, P = "{demo['virtual_prefix']}"; fine-tuned: {tuned}). Configs:
`demo_config.yaml`; all numbers: `results.json`; every sample: `eval/samples.jsonl`. Wall time:
{demo['seconds']['total']:.0f} s.

{table}

![safety vs utility](safety_vs_utility.png)
![first-token drift](drift.png)

{_mechanism_section(demo, headline_table(numbers))}{_methods_section(results)}
{_world_section(demo['world'])}
{_caveats(numbers)}
## How to read it

- **RSR** is the share of held-out harmful prompts answered safely; **JSR** the same when the assistant turn
  is prefilled with the first {results['config']['eval']['jsr_prefill_tokens']} tokens of a harmful reply.
  `keyword` is the reference rule (a refusal phrase anywhere in the response); `strict` needs the model's own
  text (after the prefill) to start with a refusal sentence, because keyword matching flatters damaged small
  models whose output happens to contain "sorry".
- **utility** is exact-match accuracy (GSM8K format) of the number after `####` on held-out word problems; **benign refusal**
  the share of held-out benign requests refused (keyword in the first 10 words): refusing is only good when
  the request is harmful.
- **KL@1 harmful**: KL(seed || model) of the next-token distribution at the first answer token on harmful
  prompts, teacher-forced on the seed's own answer; LookAhead Tuning aims to keep it small. `drift.png` shows
  the first {len(next(iter(results['models'].values())).get('drift', {}).get('harmful', {}).get('kl', [])) or 8}
  positions.
- The three fine-tunes share the seed model, hyperparameters, data order and step count; only the data
  transform differs. The seed's alignment corpus includes 200 word problems in the task's format, so the
  seed already produces the task's answer openings, as a pretrained chat model would; this design choice
  applies equally to all three fine-tunes.

## What this demo is and is not

This is a workflow demonstration on a tiny model trained from scratch in minutes (2 layers, hidden size 128,
a {results['config']['eval']['max_new_tokens']}-token generation budget), not a reproduction of the paper.
Such a model cannot produce answer openings it has not been trained on the way a pretrained 7B chat model
can, and its safety behaviour is a memorised template; the numbers above are what this run measured, whatever
they show. For the paper's setting use the Llama-2-7B-Chat recipes in `configs/` (`llama2_7b_*`) and
`configs/eval_llama2_gsm8k.yaml` on GPUs.
"""
    with atomic_file(out / "report.md") as f:
        f.write(text)
