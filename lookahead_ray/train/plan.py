"""A training run's plan: everything known about it before Ray starts, as one typed value.

``plan_training(cfg)`` resolves the run's locations (what every node must see and what the run writes), the
resources it asks of the cluster, what it costs (``train.cost``: GPU memory per device, host memory while loading,
checkpoints and storage), and collects what is wrong (failures) or doubtful (warnings). ``train`` executes a plan
that passed (``train.execute``), ``train --dry-run`` prints it beside the checks of :func:`dry_run` (the sources as
this machine sees them and a DeepSpeed engine smoke), and ``tune`` plans its base config before any trial starts
(:func:`plan_search`). ``plan_training`` starts no Ray and loads no model; reading a model's ``config.json`` is the
most it does (the dry run, by design, builds a stand-in engine).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ConfigError, LookaheadError
from lookahead_ray.train import layout
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


@dataclass(frozen=True)
class PlanCheck:
    """One step of a plan: its name, a verdict (``ok`` | ``warn``: a location this machine cannot see | ``FAIL``)
    and one line for a person."""

    name: str
    verdict: str
    line: str


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
    cost_verdict: tuple[str, str] | None = None
    """The cost for a person: (``ok`` | ``warn`` | ``FAIL``, one line); None when it could not be estimated."""
    failures: list[Exception] = field(default_factory=list)
    """What stops the run, as the exceptions the run would raise (the first is raised by :meth:`check`)."""
    unreachable: list[Exception] = field(default_factory=list)
    """Inputs this machine cannot see: a failure for a run started here, a warning for a dry run of a recipe
    whose data lives on cluster storage."""
    warnings: list[str] = field(default_factory=list)
    search_disk_bytes: float = 0.0
    """For a search (:func:`plan_search`): the storage of every trial's export plus the running trials' checkpoints."""
    checks: list[PlanCheck] = field(default_factory=list)
    """Each step of the plan by name (locations, sources, kernels, adapters, resources, cost), as made."""

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


def _kernels(plan: TrainPlan) -> str:
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
    attention = model.attn_implementation or "transformers' default (sdpa)"
    return f"attention {attention}" + (", Liger kernels" if model.liger_kernel else "")


def _adapters(plan: TrainPlan) -> str:
    from lookahead_ray.train.lora import bitsandbytes_problem, check_adapters

    train = plan.cfg.train
    check_adapters(train, plan.cfg.model.name_or_path)
    problem = bitsandbytes_problem() if train.lora is not None and train.lora.quantize else None
    if problem:  # this machine may be a CPU-only head; the GPU workers fail in one line if they lack it too
        plan.warnings.append(f"train.lora.quantize: bitsandbytes cannot be imported here ({problem}); the GPU "
                             "workers need it: pip install 'lookahead-ray[qlora]'")
    if train.lora is None:
        return "full fine-tuning"
    return f"LoRA r={train.lora.r}" + (f", {train.lora.quantize} base" if train.lora.quantize else "")


def plan_training(cfg: LookaheadConfig, tokenizer_vocab: int | None = None) -> TrainPlan:
    """The plan of ``cfg``'s training run; never raises for what is wrong with it (see ``failures``).

    ``tokenizer_vocab``: the vocabulary size of a ``model.tiny`` run's tokenizer, when known (for its cost).
    """
    plan = TrainPlan(cfg)
    _attempt(plan, "locations", _locations)
    _attempt(plan, "sources", _sources)
    _attempt(plan, "kernels", _kernels)
    _attempt(plan, "adapters", _adapters)
    _attempt(plan, "resources", _resources)
    _attempt(plan, "cost", lambda p: _cost(p, tokenizer_vocab))
    if plan.cost_verdict is not None:  # the cost reports its own verdict (a failure is recorded, not raised)
        plan.checks[-1] = PlanCheck("cost", *plan.cost_verdict)
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


def _attempt(plan: TrainPlan, name: str, step: Any) -> None:
    """Run one step of the plan and record it as a check; a step returns its line (or None: "ok")."""
    try:
        line = step(plan)
    except FileNotFoundError as exc:
        plan.unreachable.append(exc)
        plan.checks.append(PlanCheck(name, "warn", f"not visible from here: {exc}"))
    except (ConfigError, ValueError, OSError) as exc:
        plan.failures.append(exc)
        plan.checks.append(PlanCheck(name, "FAIL", str(exc)))
    else:
        plan.checks.append(PlanCheck(name, "ok", line or "ok"))


def _resources(plan: TrainPlan) -> str:
    train = plan.cfg.train
    plan.resources = {"CPU": train.num_workers * train.cpus_per_worker} | (
        {"GPU": float(train.num_workers)} if train.use_gpu else {})
    return plan.resource_line()


def _locations(plan: TrainPlan) -> None:
    cfg, train = plan.cfg, plan.cfg.train
    plan.output_dir = layout.train_dir(cfg)
    plan.storage_path = layout.storage_path(cfg)
    plan.run_dir = layout.run_dir(cfg)
    plan.outputs = {"train.output_dir": plan.output_dir}
    if train.storage_path:
        plan.outputs["train.storage_path"] = plan.storage_path


def _sources(plan: TrainPlan) -> None:
    """The model, the data and the checkpoint to resume from, and where each is read."""
    from lookahead_ray.data.readers import expand_inputs
    from lookahead_ray.data.report import REPORT_NAME
    from lookahead_ray.modeling import check_model_source

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


def check_prepared_tokenizer(cfg: LookaheadConfig) -> None:
    """Refuse shards whose token ids come from another tokenizer than the one this run trains with.

    Raises:
        ConfigError: the prepare report records a different tokenizer (both named) or none at all.
    """
    from lookahead_ray.data.report import REPORT_NAME, read_report
    from lookahead_ray.modeling import tokenizer_for, tokenizer_identity, tokenizer_mismatch

    prepared_dir = cfg.train.prepared_dir
    if not storage.is_complete(prepared_dir, REPORT_NAME):
        raise ConfigError(f"train.prepared_dir: {prepared_dir} has no {REPORT_NAME}; was it written by `prepare`?")
    prepared = read_report(prepared_dir).get("tokenizer")
    if prepared is None:
        raise ConfigError(f"train.prepared_dir: {prepared_dir}/{REPORT_NAME} records no tokenizer (prepared without "
                          "tokenization, or by an older lookahead-ray); run `prepare` again")
    report_config = read_report(prepared_dir).get("config", {})
    defaults = LookaheadConfig().to_dict()  # a key the report lacks (an older prepare) had its default
    changed = [f"{section}.{key}" for section in ("preview", "records", "tokenization")
               for key, value in cfg.to_dict()[section].items()
               if section in report_config and report_config[section].get(key, defaults[section][key]) != value]
    if "data" in report_config and report_config["data"].get("safety_mix") != cfg.to_dict()["data"]["safety_mix"]:
        changed.append("data.safety_mix")
    if changed:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} was prepared with other settings ({', '.join(changed)}); "
                          "prepare again with this config, or train from data.inputs")
    source = cfg.model.tokenizer_source()
    differences = tokenizer_mismatch(prepared, tokenizer_identity(tokenizer_for(cfg.model), source))
    if differences:
        raise ConfigError(f"train.prepared_dir: {prepared_dir} was tokenized with {prepared['source']!r}, but this run "
                          f"trains with {source!r} ({', '.join(differences)} differ); prepare again with the "
                          "model's tokenizer")


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
        unknown = f"{source}: its config.json is not readable here, so the cost is not estimated"
        plan.warnings.append(f"cost: {unknown}")
        plan.cost_verdict = ("warn", unknown)
        return
    plan.cost = estimate(ModelShape.from_config(shape), train, cfg.tokenization.max_seq_len, train.workers_per_node)
    plan.cost_verdict = ("ok", plan.cost_line())
    if train.gpu_memory_gb and train.use_gpu:
        need = plan.cost.gpu_total / 1e9
        if need > train.gpu_memory_gb:
            error = ConfigError(f"train.gpu_memory_gb: the run needs about {need:.1f} GB per GPU, more than the "
                                f"{train.gpu_memory_gb:g} GB given ({plan.cost_line()}); use ZeRO-3, offload, a "
                                "smaller micro batch or larger GPUs")
            plan.failures.append(error)
            plan.cost_verdict = ("FAIL", str(error))
        elif need > 0.9 * train.gpu_memory_gb:
            tight = f"{need:.1f} GB per GPU is above 90% of train.gpu_memory_gb {train.gpu_memory_gb:g}"
            plan.warnings.append(f"cost: {tight}")
            plan.cost_verdict = ("warn", f"{tight}: {plan.cost_line()}")


# The dry run (``train --dry-run``): check a recipe on this machine in seconds, before spending GPU hours. No
# weights, no data, no network: the config is resolved, the DeepSpeed config is built for the world size the recipe
# declares, and a DeepSpeed engine with the recipe's ZeRO stage, optimizer, learning-rate schedule, precision,
# accumulation and clipping is built around a tiny stand-in model of the same family and takes two optimizer steps
# on a synthetic batch. Sources this machine cannot reach (a Hub id without network, data on cluster storage) are
# warnings, failures with ``--strict``. The locations, resources and cost are the plan's, as ``train`` executes it.

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
    for check in report.plan.checks:  # the plan's own steps the checks here do not already show
        if check.name in ("kernels", "adapters", "resources"):
            report.add(check.verdict, check.name, check.line)
    _check(report, "storage path", lambda: _storage(cfg, report.plan))
    _check(report, "deepspeed engine", lambda: _engine(cfg, tokenizer))
    _check(report, "cost", lambda: _cost_check(report.plan))
    return report


def _cost_check(plan: TrainPlan) -> tuple[str, str]:
    """The run's GPU memory, host memory while loading, checkpoint and disk (``train.cost``), from the plan."""
    return plan.cost_verdict or (WARN, "not estimated")


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
