"""``lookahead-ray train --dry-run``: check a recipe on this machine in seconds, before spending GPU hours.

No weights, no data, no network: the config is resolved, the DeepSpeed config is built for the world size
the recipe declares, and a DeepSpeed engine with the recipe's ZeRO stage, optimizer, learning-rate schedule,
precision, accumulation and clipping is built around a tiny stand-in model of the same family and takes
two optimizer steps on a synthetic batch. Sources this machine cannot reach (a Hub id without network,
data on cluster storage) are warnings, failures with ``--strict``.
"""

from __future__ import annotations

import copy
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import LookaheadError
from lookahead_ray.train.plan import TrainPlan, plan_training

STAND_IN = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4}
SYNTHETIC_SEQ_LEN = 16
OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Preflight:
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    """(status, what, detail) in the order run."""
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    """The DeepSpeed config the recipe's workers will get (its declared world size)."""
    plan: TrainPlan | None = None
    """The run's plan, as ``train`` would execute it."""

    def add(self, status: str, what: str, detail: str) -> None:
        self.checks.append((status, what, detail))

    def passed(self, strict: bool = False) -> bool:
        return all(status == OK or (status == WARN and not strict) for status, _, _ in self.checks)

    def lines(self) -> list[str]:
        return [f"[{status:>4}] {what}: {detail}" for status, what, detail in self.checks]


def dry_run(cfg: LookaheadConfig) -> Preflight:
    """Run every pre-flight check of ``cfg``'s training; never raises for a failed check (see ``checks``)."""
    from lookahead_ray.train.deepspeed_config import build_deepspeed_config

    report = Preflight()
    train = cfg.train
    report.deepspeed_config = build_deepspeed_config(train, train.num_workers, train.use_gpu)
    report.add(OK, "batch arithmetic", f"global batch {train.global_batch} = micro {train.micro_batch_size} x "
               f"accumulation {train.gradient_accumulation_steps} x workers {train.num_workers}")
    _check(report, "model source", lambda: _model_source(cfg))
    tokenizer = _check(report, "tokenizer", lambda: _tokenizer(cfg))
    _check(report, "training data", lambda: _data(cfg, tokenizer is not None))
    # The plan a real run executes (train.plan): its locations, resources and cost. Its source checks are the
    # ones above, which tell what this machine cannot reach (a warning here) from what is wrong.
    report.plan = plan_training(cfg, len(tokenizer) if tokenizer is not None else None)
    _check(report, "storage path", lambda: _storage(cfg, report.plan))
    _check(report, "deepspeed engine", lambda: _engine(cfg, tokenizer))
    _check(report, "cost", lambda: _cost(report.plan))
    return report


def _cost(plan: TrainPlan) -> tuple[str, str]:
    """The run's GPU memory, host memory while loading, checkpoint and disk (``train.cost``), from the plan."""
    if plan.cost is None:
        return WARN, next((w for w in plan.warnings if w.startswith("cost: ")), "cost: not estimated")[6:]
    line = plan.cost_line()
    memory = [error for error in plan.failures if str(error).startswith("train.gpu_memory_gb")]
    if memory:
        return FAIL, str(memory[0])
    tight = [w for w in plan.warnings if w.startswith("cost: ")]
    return (WARN, f"{tight[0][6:]}: {line}") if tight else (OK, line)


def _check(report: Preflight, what: str, fn: Any) -> Any:
    """Run one check; fn returns (status, detail[, value])."""
    try:
        status, detail, *value = fn()
    except Exception as exc:  # noqa: BLE001 - a dry run reports every failure as a failed check
        report.add(FAIL, what, str(exc) if isinstance(exc, LookaheadError | OSError) else f"{type(exc).__name__}: {exc}")
        return None
    report.add(status, what, detail)
    return value[0] if value else None


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _model_source(cfg: LookaheadConfig) -> tuple[str, str]:
    from lookahead_ray.modeling import check_model_source

    check_model_source(cfg.model)
    source = cfg.model.name_or_path
    if source is None:
        return OK, "model.tiny (built from config)"
    if storage.is_uri(source):
        return OK, f"{source} (storage: config.json found; each node copies it into its cache once)"
    if Path(source).expanduser().is_dir():
        return OK, f"{source} (local directory)"
    if _hub_cached(source, "config.json"):
        return OK, f"{source} (Hub id, in the local Hugging Face cache)"
    return WARN, f"{source} is a Hub id this machine has not cached; the workers must reach the Hub or a mirror"


def _tokenizer(cfg: LookaheadConfig) -> tuple[str, str, Any]:
    from lookahead_ray.data.records import RecordSchema
    from lookahead_ray.data.tokenization import ExampleTokenizer
    from lookahead_ray.modeling import BUILTIN_TINY, tokenizer_for

    source = cfg.model.tokenizer_source()
    local = source == BUILTIN_TINY or storage.is_uri(source) or Path(source).expanduser().is_dir()
    if not local and not _hub_cached(source, "tokenizer_config.json"):
        return WARN, f"{source} is a Hub id this machine has not cached: not loaded here", None
    tokenizer = tokenizer_for(cfg.model)
    ExampleTokenizer(tokenizer, cfg.tokenization, RecordSchema(cfg.records))  # chat template and EOS present
    return OK, f"{source}: {len(tokenizer)} tokens, chat template and EOS present", tokenizer


def _data(cfg: LookaheadConfig, tokenizer_loaded: bool) -> tuple[str, str]:
    from lookahead_ray.data.readers import expand_inputs
    from lookahead_ray.train.driver import check_prepared_tokenizer

    if cfg.train.prepared_dir:
        if not storage.is_dir(cfg.train.prepared_dir):
            return WARN, f"train.prepared_dir {cfg.train.prepared_dir} is not on this machine"
        if not tokenizer_loaded:
            return WARN, f"{cfg.train.prepared_dir}: tokenizer not loadable here, shards not compared with it"
        check_prepared_tokenizer(cfg)
        return OK, f"{cfg.train.prepared_dir}: prepared with the model's tokenizer"
    try:
        files = expand_inputs(cfg.data)
    except FileNotFoundError as exc:
        return WARN, f"not on this machine ({exc}); the workers must see it"
    return OK, f"{len(files)} input file(s)"


def _storage(cfg: LookaheadConfig, plan: TrainPlan) -> tuple[str, str]:
    """Writable from here, and (on a cluster joined through RAY_ADDRESS) the same place on every node."""
    import os

    target = cfg.train.storage_path or cfg.stage_dir("train")
    if target is None:
        return WARN, "no train.output_dir yet (give --output-dir when training)"
    status, line = _writable(storage.absolute(target))
    if status != OK or not os.environ.get("RAY_ADDRESS"):
        return status, line
    from lookahead_ray.errors import ConfigError
    from lookahead_ray.runtime import check_visible_on_every_node, init_ray

    init_ray()
    try:
        check_visible_on_every_node(plan.outputs, plan.inputs)
    except (ConfigError, FileNotFoundError) as exc:
        return FAIL, str(exc)
    return OK, f"{line}, and every node of the cluster sees the run's locations"


def _writable(target: str) -> tuple[str, str]:
    if storage.is_uri(target):
        probe = storage.join(target, f".lookahead-ray-write-check-{uuid.uuid4().hex[:8]}")
        try:
            storage.write_text(probe, "")
            fs, path = storage.resolve(probe)
            fs.delete_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure to write there is the answer
            return FAIL, f"{target}: cannot write there ({type(exc).__name__}: {exc})"
        return OK, f"{target}: writable"
    directory = Path(target)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent  # the nearest existing ancestor is where the run's folders get created
    probe = directory / f".lookahead-ray-write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("")
    except OSError as exc:
        return FAIL, f"{target}: cannot write in {directory} ({exc.strerror})"
    probe.unlink()
    return OK, f"{target}: writable"


def _engine(cfg: LookaheadConfig, tokenizer: Any) -> tuple[str, str]:
    """Two optimizer steps of the recipe's DeepSpeed setup around a stand-in model, in this process."""
    import torch

    from lookahead_ray.modeling import torch_dtype
    from lookahead_ray.train.deepspeed_config import build_deepspeed_config
    from lookahead_ray.train.loop import build_objective, init_device, initialize_engine, load_training_model
    from lookahead_ray.train.objectives import SFTObjective

    train = cfg.train
    on_gpu, device = init_device(train.use_gpu, world_size=1)
    ds_config = _single_worker_config(build_deepspeed_config(train, 1, on_gpu=train.use_gpu), on_gpu)
    steps = 2
    with tempfile.TemporaryDirectory(prefix="lookahead-stand-in-") as directory:
        # The branch a real run takes: the stand-in saved with save_pretrained and loaded through
        # model.name_or_path (under ZeRO-3: partitioned while loading).
        _stand_in_model(cfg, tokenizer).to(torch_dtype(train.precision)).save_pretrained(directory)
        stand_in = replace(cfg, model=replace(cfg.model, name_or_path=directory, tiny=None))
        model = load_training_model(stand_in, tokenizer, ds_config)
        engine = initialize_engine(model, train, ds_config, total_steps=max(steps, train.max_steps or 100),
                                   on_gpu=on_gpu)
        # Constrained SFT's frozen reference engine, loaded as the run loads it (the stand-in has no LoRA adapters).
        objective = build_objective(stand_in, tokenizer, ds_config, on_gpu) if train.lora is None else SFTObjective()
    vocab = engine.module.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    losses, lrs = [], []
    for _ in range(steps * train.gradient_accumulation_steps):
        ids = torch.randint(0, vocab, (train.micro_batch_size, SYNTHETIC_SEQ_LEN), generator=generator).to(device)
        loss = objective(engine, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
        engine.backward(loss)
        lrs.append(float(engine.get_lr()[0]))
        engine.step()
        losses.append(float(loss))
    if not all(torch.isfinite(torch.tensor(losses))) or lrs[0] <= 0:
        return FAIL, f"losses {losses}, learning rates {lrs}"
    optimizer = type(engine.optimizer).__name__
    dtype = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    reference = getattr(objective, "reference", None)
    constrained = "" if reference is None else (", constrained SFT against a frozen reference engine (" + (
        "ZeRO-3" if reference.zero_optimization_stage() == 3 else "whole on every rank") + ")")
    return OK, (f"ZeRO-{train.zero_stage} {dtype}, {optimizer}, {train.lr_schedule} schedule, {steps} steps of "
                f"{train.gradient_accumulation_steps} micro-batch(es) of {train.micro_batch_size}{constrained}; loss "
                f"{losses[0]:.3f} -> {losses[-1]:.3f}, lr {lrs[0]:.3g} -> {lrs[-1]:.3g}")


def _single_worker_config(ds_config: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """The recipe's DeepSpeed config for one worker here: per-worker batch sizes kept; on a CPU the GPU
    optimizer offload takes torch's AdamW (DeepSpeedCPUAdam would JIT-compile), and no pinned memory."""
    out = copy.deepcopy(ds_config)
    out["train_batch_size"] = out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"]
    if on_gpu:
        return out
    zero = out["zero_optimization"]
    zero["overlap_comm"] = False
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["pin_memory"] = False
    if "optimizer" in out:  # DeepSpeedCPUAdam (a JIT build): the CPU path's client AdamW instead
        del out["optimizer"]
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def _stand_in_model(cfg: LookaheadConfig, tokenizer: Any) -> Any:
    """A few-layer model of the configured family: its config shrunk when readable here, else a tiny Llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lookahead_ray.modeling import build_model

    torch.manual_seed(cfg.train.seed)
    if cfg.model.tiny is not None and tokenizer is not None:
        return build_model(cfg.model, tokenizer, cfg.train.seed)
    vocab = len(tokenizer) if tokenizer is not None else 1024
    source = cfg.model.name_or_path
    if source and storage.is_uri(source):
        source = storage.local_copy(source, "tokenizers", weights=False)  # its config.json, not its weights
    if source and (Path(source).expanduser().is_dir() or _hub_cached(source, "config.json")):
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
        for key, value in STAND_IN.items():
            if hasattr(config, key):
                setattr(config, key, value)
        config.vocab_size = vocab
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=max(64, SYNTHETIC_SEQ_LEN),
                                        tie_word_embeddings=False, **STAND_IN))
