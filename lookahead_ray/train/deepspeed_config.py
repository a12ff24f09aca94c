"""The DeepSpeed config, built by one pure function from the typed train config.

Pure module: no ray / torch / deepspeed imports, so it is testable and inspectable anywhere
(``python -c "from lookahead_ray.train.deepspeed_config import ..."``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from lookahead_ray.config import TrainConfig

COSINE_FLOOR = 0.1
"""The cosine schedule ends at this fraction of the peak learning rate."""


def build_deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ZeRO-2/3 with explicit, consistent batch sizes.

    Args:
        cfg: the train section.
        world_size: data-parallel workers (the batch sizes are computed from it, never left to "auto").
        on_gpu: the optimizer is torch's AdamW, passed by the training loop (fused on GPU), except with
            ``train.offload_optimizer`` on GPUs, where it comes from this config (DeepSpeedCPUAdam). DeepSpeed's
            FusedAdam is not used: it is JIT-built on every node with an nvcc that must match torch's CUDA,
            while torch's fused AdamW ships in the torch wheel. On CPU ``zero_force_ds_cpu_optimizer: false``
            lets offload accept torch's AdamW (DeepSpeedCPUAdam would JIT-compile for minutes).

    Returns:
        A plain dict for ``deepspeed.initialize(config=...)``; ``cfg.deepspeed_overrides`` is merged last.
        The learning-rate schedule is not in it: see :func:`lr_multiplier`.
    """
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        # Gather 16-bit weights on save so the Hugging Face export is complete, not rank-0's shard.
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 10**9,  # metrics go through ray.train.report, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if on_gpu and cfg.offload_optimizer:  # DeepSpeedCPUAdam: a C++ op, built on first use unless prebuilt
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.learning_rate, "betas": list(cfg.adam_betas), "eps": 1e-8, "weight_decay": cfg.weight_decay}}
    elif cfg.offload_optimizer:
        ds["zero_force_ds_cpu_optimizer"] = False
    return _merge(ds, cfg.deepspeed_overrides)


def lr_multiplier(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step ``i`` (0-based), for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warmup over ``train.warmup_steps`` (the first step already trains, at 1/(warmup+1) of the peak),
    then cosine decay to ``COSINE_FLOOR`` of the peak, linear decay towards 0, or constant. DeepSpeed 0.19's
    own schedulers are not used: they reject ``warmup_num_steps: 0`` and train the first step at lr 0.
    """
    total = max(total_steps, 1)
    warmup = min(cfg.warmup_steps, total - 1)
    schedule = cfg.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
