"""The one training procedure, run on every worker: DeepSpeed ZeRO-2/3 over prepared batches.

``train_fn_per_worker(loop_config)`` is what Ray Train runs on every worker; everything it needs travels in
:class:`LoopSettings` (the serialised typed config, the step count, the data and the log directory), nothing comes
from module globals. ``run_loop`` is the same procedure against any :class:`~lookahead_ray.train.worker_io.WorkerIO`,
which is how the single-process path reuses it. Checkpoint layout: see ``train.export``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lookahead_ray.config import LookaheadConfig, TrainConfig
from lookahead_ray.data.tokenization import IGNORE_INDEX
from lookahead_ray.errors import ConfigError
from lookahead_ray.modeling import build_model, local_model_dir, tokenizer_for, torch_dtype
from lookahead_ray.train.checkpoints import mark_complete
from lookahead_ray.train.data_order import TokenStore, chain, epoch_batches, epoch_plan
from lookahead_ray.train.deepspeed_config import build_deepspeed_config, lr_multiplier
from lookahead_ray.train.export import export_model, load_state, save_state, verify_export
from lookahead_ray.train.layout import EXPORT_CHECK_FILE, HF_SUBDIR
from lookahead_ray.train.lora import add_adapters, check_adapters, load_quantized, parameter_counts
from lookahead_ray.train.metrics import MetricWriters, StepMeter
from lookahead_ray.train.objectives import ConstrainedObjective, SFTObjective, reference_deepspeed_config
from lookahead_ray.train.worker_io import LoopSettings, WorkerIO
from lookahead_ray.train.zero3_loading import load_zero3_model

Batch = dict[str, Any]  # column -> token-id lists

logger = logging.getLogger(__name__)


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker)."""
    from lookahead_ray.train.worker_io import RayWorkerIO

    settings = LoopSettings(**loop_config)
    run_loop(settings, RayWorkerIO(settings.config["train"]["resume_from"], settings.run_location))


def run_loop(settings: LoopSettings, io: WorkerIO) -> dict[str, Any]:
    """Train ``settings.total_steps`` optimizer steps, resuming from the worker's latest checkpoint, then save the
    final state and the Hugging Face export. Returns the final metrics (also reported with it)."""
    entered = time.perf_counter()
    cfg = LookaheadConfig.from_dict(settings.config)
    total_steps = settings.total_steps
    engine, tokenizer, device, objective = setup_engine(cfg, io.world_size, total_steps)
    position = _resume(engine, io, adapters_only=cfg.train.lora is not None)
    meter = StepMeter(cfg.train.gradient_accumulation_steps, io.world_size, device,
                      setup_seconds=time.perf_counter() - entered,
                      resumed_from_step=position.step if position.resumed else None)
    trainable, total = parameter_counts(engine.module)
    writers = MetricWriters(settings.log_dir, cfg.train, settings.progress) if io.world_rank == 0 else None
    try:  # close TensorBoard / MLflow even when training or the export fails
        store = TokenStore(settings.tokens)
        probe = _fit(engine, store, tokenizer.pad_token_id, device, cfg, io, total_steps, position, meter, writers,
                     objective)
        if probe is None:  # resumed at the very end (e.g. after a failed export check): still check the export
            first = epoch_batches(len(store), 0, cfg.train.seed, io.world_rank, io.world_size, cfg.train.micro_batch_size)
            probe = {k: v[:2] for k, v in collate(store.batch(first[0]), tokenizer.pad_token_id, device).items()}
        with io.new_checkpoint() as directory:
            save_state(engine, directory, position.state(), cfg, io.world_rank)
            final = {**meter.last, "step": position.step, "epoch": position.epoch, "final": True,
                     "loss_objective": objective.name,  # not "objective": the name a search ranks trials by
                     "train_seconds": meter.train_seconds(), "data_sha": position.data_sha,
                     "checkpoints_written_in_place": io.writes_in_place,
                     "trainable_parameters": trainable, "trainable_share": trainable / total,
                     "param_dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch.")}
            export_model(engine, tokenizer, cfg, directory, probe, io.world_rank, final)
            if cfg.train.verify_export:
                final.update(_verify_on_rank0(directory, cfg, io.world_rank, device))
            mark_complete(directory, io.world_rank, io.world_size, position.step)
            # Always reported, whatever the check says: the trained state is never lost to a failed export.
            # (Ray Train keeps the metrics of the latest checkpoint, so the verdict must travel with it.)
            io.report(final, directory)
    finally:
        if writers is not None:
            writers.close()
    return final


def _verify_on_rank0(directory: str, cfg: LookaheadConfig, rank: int, device: Any) -> dict[str, Any]:
    """The export check, on rank 0 and the engine's device; every rank gets the verdict to report. It never
    raises: a check that cannot run (e.g. out of memory for the reload) is a failed check, reported."""
    import torch.distributed as dist

    verdict: list[dict[str, Any] | None] = [None]
    if rank == 0:
        try:
            verdict[0] = verify_export(os.path.join(directory, HF_SUBDIR),
                                       os.path.join(directory, EXPORT_CHECK_FILE), cfg.train.precision, device,
                                       cfg.model.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - any failure to check is reported as a failed check
            verdict[0] = {"export_check_passed": False, "export_check_error": f"{type(exc).__name__}: {exc}"}
    dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def setup_engine(cfg: LookaheadConfig, world_size: int, total_steps: int) -> tuple[Any, Any, Any, Any]:
    """The model's DeepSpeed engine (the model loaded or built), the tokenizer, this worker's device and the
    training objective (with Constrained SFT's frozen reference, see :func:`build_objective`)."""
    train = cfg.train
    on_gpu, device = init_device(train.use_gpu, world_size)
    if train.use_gpu and not on_gpu:  # training a 7B model on this node's CPU instead would "work" for days
        import socket

        raise ConfigError(f"train.use_gpu: true, but no CUDA device is visible on node {socket.gethostname()} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); check the node's "
                          "GPUs and driver, or set train.use_gpu=false to train on CPU")
    tokenizer = tokenizer_for(cfg.model)
    ds_config = build_deepspeed_config(train, world_size, on_gpu)
    model = load_training_model(cfg, tokenizer, ds_config, on_gpu)
    if train.lora is not None:
        import torch

        torch.manual_seed(train.seed)  # the adapters' random init: the same on every run of these settings
        model = add_adapters(model, train.lora, cfg.model.name_or_path)
    trainable, total = parameter_counts(model)
    logger.info("training %s of %s parameters (%.3f%%)%s", f"{trainable:,}", f"{total:,}", 100 * trainable / total,
                " : LoRA adapters" if train.lora is not None else "")
    engine = initialize_engine(model, cfg.train, ds_config, total_steps, on_gpu)
    return engine, tokenizer, device, build_objective(cfg, tokenizer, ds_config, on_gpu)


def build_objective(cfg: LookaheadConfig, tokenizer: Any, ds_config: dict[str, Any], on_gpu: bool) -> Any:
    """Plain SFT, or Constrained SFT (``train.constrained``) against the frozen seed: under LoRA the policy with its
    adapters disabled (no second model), else the seed loaded as the policy was (``model.name_or_path``, partitioned
    while loading under ZeRO-3, or ``model.tiny`` built with ``train.seed``: the policy's initial weights) in a
    DeepSpeed engine without optimizer: ZeRO-3 when training uses it, stage 0 (whole on every rank) under ZeRO-2."""
    train = cfg.train
    if train.constrained is None:
        return SFTObjective()
    if train.lora is not None:
        return ConstrainedObjective(train.constrained)
    import deepspeed

    ref_config = reference_deepspeed_config(ds_config, train.zero_stage)
    reference = load_training_model(cfg, tokenizer, ref_config, on_gpu)
    reference.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=reference, config=ref_config)
    engine.eval()
    logger.info("Constrained SFT: the frozen reference is a ZeRO-%d engine of the seed model",
                ref_config["zero_optimization"]["stage"])
    return ConstrainedObjective(train.constrained, engine)


def load_training_model(cfg: LookaheadConfig, tokenizer: Any, ds_config: dict[str, Any], on_gpu: bool = False) -> Any:
    """The model to train. Under ZeRO-3 a checkpoint (``model.name_or_path``) is partitioned while it is loaded,
    each rank reading only its own part (``train.zero3_loading``), instead of building the whole model on every
    rank; otherwise ``from_pretrained`` memory-maps the safetensors (one copy per node: the page cache)."""
    # Loaded in the precision the run asks for: with dtype None transformers keeps the checkpoint's own dtype
    # (fp16 for Llama-2-7b-chat), which DeepSpeed would then train in without loss scaling.
    dtype = torch_dtype(cfg.train.precision)
    lora = cfg.train.lora
    if lora is not None and lora.quantize:
        check_adapters(cfg.train, cfg.model.name_or_path, on_gpu_here=on_gpu)
        model = load_quantized(local_model_dir(cfg.model.name_or_path), dtype, cfg.model.trust_remote_code)
    elif cfg.train.zero_stage == 3 and cfg.model.name_or_path is not None:
        import deepspeed
        import torch

        # zero.Init reads the world size from DeepSpeed's communication backend: without it (Ray set up only
        # torch.distributed) it sees a world of 1 and rejects the batch sizes.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() and cfg.train.use_gpu else "gloo")
        model = load_zero3_model(local_model_dir(cfg.model.name_or_path), ds_config, dtype,
                                 cfg.model.trust_remote_code)
    else:
        model = build_model(cfg.model, tokenizer, cfg.train.seed, dtype=dtype)
    model = use_attention(model, cfg.model.attn_implementation)
    return use_liger(model) if cfg.model.liger_kernel else model


def use_attention(model: Any, implementation: str | None) -> Any:
    """``model.attn_implementation`` on the built model (one place for every way a model is built).

    Raises:
        ConfigError: the kernel is not available here (flash-attn missing, no CUDA), naming the node.
    """
    if implementation is None:
        return model
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as exc:
        import socket

        raise ConfigError(f"model.attn_implementation: {implementation} is not available on node "
                          f"{socket.gethostname()} ({str(exc).splitlines()[0]}); install it there or choose sdpa") from None
    return model


def use_liger(model: Any) -> Any:
    """Liger's Triton kernels patched into the built model (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy).

    Raises:
        ConfigError: liger-kernel is not installed on this node, or no CUDA device is visible.
    """
    import socket

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"model.liger_kernel: no CUDA device is visible on node {socket.gethostname()}; Liger's "
                          "kernels run on CUDA GPUs only (set model.liger_kernel=false)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ConfigError(f"model.liger_kernel: liger-kernel cannot be imported on node {socket.gethostname()} "
                          f"({exc}); pip install 'lookahead-ray[liger]' there") from None
    _apply_liger_kernel_to_instance(model=model)
    return model


def init_device(use_gpu: bool, world_size: int) -> tuple[bool, Any]:
    """(on_gpu, device) for this worker; a world of one gets its own process group (outside Ray)."""
    import torch

    on_gpu = use_gpu and torch.cuda.is_available()
    if not on_gpu:
        _skip_cpu_jit_builds()
    if world_size == 1:
        _init_single_process_distributed(on_gpu)
    return on_gpu, torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def initialize_engine(model: Any, train: TrainConfig, ds_config: dict[str, Any], total_steps: int,
                      on_gpu: bool) -> Any:
    """``deepspeed.initialize`` with the run's optimizer and learning-rate schedule.

    The optimizer is torch's AdamW from here (fused on GPU: nothing to JIT-build), unless ``ds_config`` names
    one (DeepSpeedCPUAdam, for optimizer offload on GPUs).
    """
    import deepspeed
    import torch

    if train.gradient_checkpointing:
        if train.lora is not None:  # checkpointed blocks of a frozen base get inputs that need grad, for the adapters'
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    client_optimizer = "optimizer" not in ds_config
    trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, without LoRA
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, betas=tuple(train.adam_betas),
                                  weight_decay=train.weight_decay, fused=on_gpu or None) if client_optimizer else None
    schedule = lr_multiplier(train, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None if client_optimizer else trainable,
                                           lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch, the micro-batches of it consumed, and the
    running hash of every batch so far (see ``data_order.chain``). Saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    data_sha: str = ""
    resumed: bool = False

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "data_sha": self.data_sha}


def _resume(engine: Any, io: WorkerIO, adapters_only: bool) -> Position:
    """The position after loading the worker's latest checkpoint, if any (``adapters_only``: a LoRA run's)."""
    with io.latest_checkpoint() as checkpoint:
        if checkpoint is None:
            return Position()
        state = load_state(engine, checkpoint, adapters_only)
    position = Position(int(state["step"]), int(state["epoch"]), int(state.get("batch_in_epoch", 0)),
                        state.get("data_sha", ""), resumed=True)
    logger.info("rank %d resumed from step %d (epoch %d, micro-batch %d)", io.world_rank, position.step,
                position.epoch, position.batch_in_epoch)
    return position


def _fit(engine: Any, store: TokenStore, pad_token_id: int, device: Any, cfg: LookaheadConfig, io: WorkerIO,
         total_steps: int, position: Position, meter: StepMeter, writers: MetricWriters | None,
         objective: Any = None) -> dict | None:
    """Epochs of forward / backward / step until ``total_steps``, from ``position`` (updated in place), minimising
    ``objective(engine, batch)`` (default: plain SFT); returns the probe batch (two rows of the first batch, padded)
    the export check compares logits on."""
    objective = objective or SFTObjective()
    train = cfg.train
    capacity = cfg.tokenization.max_seq_len if train.packing else None
    lengths = store.lengths() if train.packing or train.group_by_length else None
    probe: dict[str, Any] | None = None
    engine.train()
    while position.step < total_steps:
        plan = epoch_plan(lengths, len(store), position.epoch, train.seed, io.world_rank, io.world_size,
                          train.micro_batch_size, capacity, train.group_by_length)
        if not plan:
            raise ConfigError(f"train.micro_batch_size: {len(store)} training rows give worker {io.world_rank} "
                              f"no micro-batch of {train.micro_batch_size}"
                              + (" packed sequences" if train.packing else ""))
        for sequences in plan[position.batch_in_epoch:]:
            indices = np.concatenate(sequences)
            rows = store.batch(indices)
            batch = (collate(rows, pad_token_id, device) if capacity is None
                     else collate_packed(rows, [len(s) for s in sequences], pad_token_id, device))
            tokens = sum(len(x) for x in rows["input_ids"])  # not padding
            if probe is None:
                probe = {k: v[:2].clone() for k, v in collate({k: v[:2] for k, v in rows.items()}, pad_token_id,
                                                              device).items()}
            loss = objective(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
            position.batch_in_epoch += 1
            position.data_sha = chain(position.data_sha, indices)
            if not meter.add(loss, tokens, batch["input_ids"].numel()):
                continue
            position.step += 1
            metrics = meter.step_metrics(position.step, position.epoch, engine.get_lr()[0])
            if writers is not None:
                writers.write(metrics)
            if position.step >= total_steps:
                return probe
            _report(engine, io, cfg, metrics, position)
            meter.restart_clock()
        position.epoch, position.batch_in_epoch = position.epoch + 1, 0
    return probe


def _report(engine: Any, io: WorkerIO, cfg: LookaheadConfig, metrics: dict[str, Any], position: Position) -> None:
    """A checkpoint every ``train.checkpoint_every_steps``, else metrics every ``train.report_every_steps``
    (each report is a barrier across workers)."""
    step, checkpoint_every = metrics["step"], cfg.train.checkpoint_every_steps
    if checkpoint_every and step % checkpoint_every == 0:
        with io.new_checkpoint() as directory:
            save_state(engine, directory, position.state(), cfg, io.world_rank)
            mark_complete(directory, io.world_rank, io.world_size, step)
            io.report(metrics, directory)
    elif step % cfg.train.report_every_steps == 0:
        io.report(metrics)


def collate(batch: Batch, pad_token_id: int, device: Any) -> dict[str, Any]:
    """Pad one micro-batch to its longest sequence (right padding; labels padded with IGNORE_INDEX)."""
    import torch

    ids = [np.asarray(x) for x in batch["input_ids"]]
    labels = [np.asarray(x) for x in batch["labels"]]
    width = max(len(x) for x in ids)
    out = {
        "input_ids": np.full((len(ids), width), pad_token_id, dtype=np.int64),
        "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
        "labels": np.full((len(ids), width), IGNORE_INDEX, dtype=np.int64),
    }
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        out["input_ids"][row, : len(x)] = x
        out["attention_mask"][row, : len(x)] = 1
        out["labels"][row, : len(y)] = y
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}


def collate_packed(batch: Batch, rows_per_sequence: list[int], pad_token_id: int, device: Any) -> dict[str, Any]:
    """Pack one micro-batch: each sequence is its examples end to end, with position ids restarting at every
    example and no attention mask, which transformers reads as packed (flash-attention's varlen kernel, else a
    block-diagonal causal mask: no example attends to another). Every example's first label is -100, so no
    token is trained to follow the previous example; right padding is one more block, labelled -100."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    sequences, start = [], 0
    for count in rows_per_sequence:
        sequences.append(range(start, start + count))
        start += count
    width = max(sum(len(ids[i]) for i in rows) for rows in sequences)
    out = {"input_ids": np.full((len(sequences), width), pad_token_id, dtype=np.int64),
           "position_ids": np.zeros((len(sequences), width), dtype=np.int64),
           "labels": np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)}
    for row, rows in enumerate(sequences):
        at = 0
        for i in rows:
            n = len(ids[i])
            out["input_ids"][row, at:at + n] = ids[i]
            out["position_ids"][row, at:at + n] = np.arange(n)
            out["labels"][row, at + 1:at + n] = np.asarray(labels[i])[1:]
            at += n
        out["position_ids"][row, at:] = np.arange(width - at)
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()} | {"use_cache": False}


def _skip_cpu_jit_builds() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (about a minute) that only
    # inference_all_reduce uses; training never needs it. importlib, because `import deepspeed.comm.torch as m`
    # binds the top-level torch module and the patch would silently do nothing.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _init_single_process_distributed(on_gpu: bool) -> None:
    """A world of one for DeepSpeed outside Ray, on a free local port. The port goes in init_method, not in
    MASTER_PORT, so child processes do not inherit a port that is already taken."""
    import socket

    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for name in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads these even when given rank and world size
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
