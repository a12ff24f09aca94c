"""A training run's plan: everything known about it before Ray starts, as one typed value.

``plan_training(cfg)`` resolves the run's locations (what every node must see and what the run writes), the
resources it asks of the cluster, what it costs (``train.cost``: GPU memory per device, host memory while loading,
checkpoints and storage), and collects what is wrong (failures) or doubtful (warnings). ``train`` executes a plan
that passed (``run_training`` / ``run_training_local``), ``train --dry-run`` prints it, each ``tune`` trial trains
through ``run_training`` and the search plans its base config before any trial starts (:func:`plan_search`).
Nothing here starts Ray or loads a model; reading a model's ``config.json`` is the most it does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError
from lookahead_ray.train.cost import CostReport, ModelShape, estimate

# The published shapes of the recipes' models, for a plan on a machine that has not downloaded them.
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-chat-hf": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                                      "vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 32},
    "meta-llama/Llama-2-13b-chat-hf": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824,
                                       "vocab_size": 32000, "num_attention_heads": 40, "num_key_value_heads": 40},
    "meta-llama/Llama-2-70b-chat-hf": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
                                       "vocab_size": 32000, "num_attention_heads": 64, "num_key_value_heads": 8},
}


@dataclass
class TrainPlan:
    cfg: LookaheadConfig
    output_dir: str = ""
    """The run directory (absolute path or URI): final/, train_result.json, the log."""
    storage_path: str = ""
    """Ray Train's storage path; its checkpoints are in ``run_dir``."""
    run_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    """Config key -> location the run writes (every node must see it)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Config key -> location the run reads (every node must see it)."""
    resources: dict[str, float] = field(default_factory=dict)
    """What the run asks of the cluster, in Ray resource names."""
    cost: CostReport | None = None
    cost_origin: str = ""
    """Where the model's shape came from (its config.json, model.tiny, or a published shape)."""
    failures: list[Exception] = field(default_factory=list)
    """What stops the run, as the exceptions the run would raise (the first is raised by :meth:`check`)."""
    unreachable: list[Exception] = field(default_factory=list)
    """Inputs this machine cannot see: a failure for a run started here, a warning for a dry run of a recipe
    whose data lives on cluster storage."""
    warnings: list[str] = field(default_factory=list)
    search_disk_bytes: float = 0.0
    """For a search (:func:`plan_search`): the storage of every trial's export plus the running trials' checkpoints."""

    @property
    def passed(self) -> bool:
        return not self.failures and not self.unreachable

    def check(self) -> TrainPlan:
        """Raise the first failure (the exception a run would meet), else return the plan."""
        for error in [*self.failures, *self.unreachable]:
            raise error
        return self

    @property
    def worker_bundles(self) -> list[dict[str, float]]:
        """One per Ray Train worker: what each must find on a single node."""
        train = self.cfg.train
        return [{"CPU": train.cpus_per_worker} | ({"GPU": 1.0} if train.use_gpu else {})] * train.num_workers

    def resource_line(self) -> str:
        train = self.cfg.train
        return (f"{train.num_workers} worker(s) x {train.cpus_per_worker:g} CPU"
                + (" and 1 GPU each" if train.use_gpu else ""))

    def cost_line(self) -> str:
        if self.cost is None:
            return ""
        return (f"{' ; '.join(self.cost.lines())} (shape: {self.cost_origin}; sequence length "
                f"{self.cfg.tokenization.max_seq_len})")


def _kernels(plan: TrainPlan) -> None:
    model, train = plan.cfg.model, plan.cfg.train
    if model.liger_kernel and train.constrained is not None:
        raise ConfigError("model.liger_kernel and train.constrained: Liger's fused cross-entropy never materialises the "
                          "logits Constrained SFT weighs token by token; set model.liger_kernel=false")
    if model.attn_implementation == "flash_attention_2" and not train.use_gpu:
        raise ConfigError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; set train.use_gpu=true "
                          "or use sdpa (with train.packing it still keeps examples apart)")
    if model.attn_implementation == "flex_attention" and not train.use_gpu:
        raise ConfigError("model.attn_implementation: flex_attention trains on CUDA GPUs only (torch has no CPU backward "
                          "for it); set train.use_gpu=true or use sdpa")
    if model.liger_kernel and not train.use_gpu:
        raise ConfigError("model.liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs; set train.use_gpu=true "
                          "or model.liger_kernel=false")


def _adapters(plan: TrainPlan) -> None:
    from lookahead_ray.train.lora import bitsandbytes_problem, check_adapters

    train = plan.cfg.train
    check_adapters(train, plan.cfg.model.name_or_path)
    problem = bitsandbytes_problem() if train.lora is not None and train.lora.quantize else None
    if problem:  # this machine may be a CPU-only head; the GPU workers fail in one line if they lack it too
        plan.warnings.append(f"train.lora.quantize: bitsandbytes cannot be imported here ({problem}); the GPU "
                             "workers need it: pip install 'lookahead-ray[qlora]'")


def plan_training(cfg: LookaheadConfig, tokenizer_vocab: int | None = None) -> TrainPlan:
    """The plan of ``cfg``'s training run; never raises for what is wrong with it (see ``failures``).

    ``tokenizer_vocab``: the vocabulary size of a ``model.tiny`` run's tokenizer, when known (for its cost).
    """
    plan = TrainPlan(cfg)
    _attempt(plan, _locations)
    _attempt(plan, _sources)
    _attempt(plan, _kernels)
    _attempt(plan, _adapters)
    train = cfg.train
    plan.resources = {"CPU": train.num_workers * train.cpus_per_worker} | (
        {"GPU": float(train.num_workers)} if train.use_gpu else {})
    _attempt(plan, lambda p: _cost(p, tokenizer_vocab))
    return plan


def plan_search(trial_cfg: LookaheadConfig, trials: int) -> TrainPlan:
    """A search's plan: its base trial's, with the storage all trials keep (each keeps its ``final/`` export
    after its eval; one trial's checkpoints at a time per running trial)."""
    plan = plan_training(trial_cfg)
    if plan.cost is not None:
        concurrent = trial_cfg.tune.max_concurrent_trials or 1
        checkpoints = plan.cost.checkpoints_on_disk * plan.cost.checkpoint_bytes
        export = (plan.cost.run_disk_bytes - checkpoints) / 2  # the run's disk counts final/ and its staging
        plan.search_disk_bytes = trials * export + concurrent * checkpoints
    return plan


def _attempt(plan: TrainPlan, step: Any) -> None:
    try:
        step(plan)
    except FileNotFoundError as exc:
        plan.unreachable.append(exc)
    except (ConfigError, ValueError, OSError) as exc:
        plan.failures.append(exc)


def _locations(plan: TrainPlan) -> None:
    from lookahead_ray.train.driver import train_dir

    cfg, train = plan.cfg, plan.cfg.train
    plan.output_dir = train_dir(cfg)
    plan.storage_path = storage.absolute(train.storage_path or plan.output_dir)
    plan.run_dir = storage.join(plan.storage_path, train.run_name)
    plan.outputs = {"train.output_dir": plan.output_dir}
    if train.storage_path:
        plan.outputs["train.storage_path"] = plan.storage_path


def _sources(plan: TrainPlan) -> None:
    """The model, the data and the checkpoint to resume from, and where each is read."""
    from lookahead_ray.data.readers import expand_inputs
    from lookahead_ray.data.report import REPORT_NAME
    from lookahead_ray.modeling import check_model_source
    from lookahead_ray.train.driver import check_prepared_tokenizer

    cfg, train = plan.cfg, plan.cfg.train
    if not cfg.data.tokenize and not train.prepared_dir:
        raise ConfigError("data.tokenize: training needs token ids, so it must be true")
    check_model_source(cfg.model)
    if cfg.model.name_or_path and (storage.is_uri(cfg.model.name_or_path) or storage.is_dir(cfg.model.name_or_path)):
        plan.inputs["model.name_or_path"] = storage.join(storage.absolute(cfg.model.name_or_path), "config.json")
    if train.resume_from:
        if not storage.is_dir(train.resume_from):
            raise FileNotFoundError(f"train.resume_from: {train.resume_from} is not a checkpoint directory")
        plan.inputs["train.resume_from"] = storage.absolute(train.resume_from)
    if train.prepared_dir:
        if not any(f.endswith(".parquet") for f in storage.list_files(train.prepared_dir)):
            raise FileNotFoundError(f"train.prepared_dir: no .parquet shards in {train.prepared_dir}")
        check_prepared_tokenizer(cfg)
        plan.inputs["train.prepared_dir"] = storage.join(storage.absolute(train.prepared_dir), REPORT_NAME)
    else:
        plan.inputs |= {f"data.inputs ({storage.name(f)})": f for f in expand_inputs(cfg.data)[:20]}


def _cost(plan: TrainPlan, tokenizer_vocab: int | None) -> None:
    """The run's cost from the model's shape; above ``train.gpu_memory_gb`` a failure, above 90% of it a warning."""
    cfg, train = plan.cfg, plan.cfg.train
    source = cfg.model.name_or_path
    if cfg.model.tiny is not None:
        shape = {**dataclasses.asdict(cfg.model.tiny), "vocab_size": tokenizer_vocab or 512}
        plan.cost_origin = "model.tiny"
    elif source and storage.is_uri(source):
        shape, plan.cost_origin = json.loads(storage.read_text(storage.join(source, "config.json"))), source
    elif source and Path(source).expanduser().is_dir():
        shape, plan.cost_origin = json.loads((Path(source).expanduser() / "config.json").read_text()), source
    elif source in KNOWN_SHAPES:
        shape, plan.cost_origin = KNOWN_SHAPES[source], f"the published shape of {source}"
    else:
        plan.warnings.append(f"cost: {source}: its config.json is not readable here, so the cost is not estimated")
        return
    plan.cost = estimate(ModelShape.from_config(shape), train, cfg.tokenization.max_seq_len, train.workers_per_node)
    if train.gpu_memory_gb and train.use_gpu:
        need = plan.cost.gpu_total / 1e9
        if need > train.gpu_memory_gb:
            plan.failures.append(ConfigError(f"train.gpu_memory_gb: the run needs about {need:.1f} GB per GPU, more "
                                             f"than the {train.gpu_memory_gb:g} GB given ({plan.cost_line()}); use "
                                             "ZeRO-3, offload, a smaller micro batch or larger GPUs"))
        elif need > 0.9 * train.gpu_memory_gb:
            plan.warnings.append(f"cost: {need:.1f} GB per GPU is above 90% of train.gpu_memory_gb "
                                 f"{train.gpu_memory_gb:g}")
