"""The pure DeepSpeed config builder."""

from __future__ import annotations

import pytest

from lookahead_ray.config import TrainConfig
from lookahead_ray.train.deepspeed_config import COSINE_FLOOR, build_deepspeed_config, lr_multiplier


def test_batch_sizes_are_explicit_and_consistent():
    cfg = TrainConfig(micro_batch_size=16, gradient_accumulation_steps=2, num_workers=4)
    ds = build_deepspeed_config(cfg, world_size=4, on_gpu=True)
    assert ds["train_batch_size"] == 16 * 2 * 4 == cfg.global_batch
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert "auto" not in str(ds)


def test_the_optimizer_is_torchs_adamw_except_deepspeeds_cpu_adam_for_offload_on_gpus():
    gpu = build_deepspeed_config(TrainConfig(learning_rate=2e-5, weight_decay=0.1), 1, on_gpu=True)
    assert "optimizer" not in gpu  # the loop passes torch's fused AdamW: no JIT-built FusedAdam on the nodes
    offload = build_deepspeed_config(TrainConfig(learning_rate=2e-5, weight_decay=0.1, offload_optimizer=True), 1,
                                     on_gpu=True)
    assert offload["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                                "weight_decay": 0.1}}
    cpu = build_deepspeed_config(TrainConfig(offload_optimizer=True), 1, on_gpu=False)
    assert "optimizer" not in cpu and cpu["zero_force_ds_cpu_optimizer"] is False
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


def test_stage3_gathers_weights_for_export_and_precision_maps_to_bf16():
    ds = build_deepspeed_config(TrainConfig(zero_stage=3, offload_params=True, precision="bf16"), 2, True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == "cpu" and ds["bf16"] == {"enabled": True}
    assert build_deepspeed_config(TrainConfig(precision="fp32"), 2, True)["bf16"] == {"enabled": False}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, steps", [(0, 1), (0, 50), (3, 50), (5, 1)])
def test_every_schedule_trains_from_the_first_step_and_warms_up_linearly(schedule, warmup, steps):
    factor = lr_multiplier(TrainConfig(lr_schedule=schedule, warmup_steps=warmup), steps)
    factors = [factor(i) for i in range(steps)]
    assert all(0 < f <= 1 for f in factors[:-1]) and 0 <= factors[-1] <= 1
    if warmup and steps > warmup:
        assert factors[:warmup + 1] == pytest.approx([(i + 1) / (warmup + 1) for i in range(warmup)] + [1.0])
    else:
        assert factors[0] == 1.0  # no warmup: the first step trains at the peak rate
    if schedule == "cosine" and steps > 1:
        decay = factors[min(warmup, steps - 1):]
        assert factors[-1] == pytest.approx(COSINE_FLOOR, abs=0.01) and decay == sorted(decay, reverse=True)
    if schedule == "constant":
        assert factors[warmup if steps > warmup else 0:] == [1.0] * (steps - (warmup if steps > warmup else 0))


def test_deepspeed_builds_the_schedule_as_a_client_scheduler():
    torch = pytest.importorskip("torch")
    factor = lr_multiplier(TrainConfig(lr_schedule="cosine", warmup_steps=0), 4)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3) and seen[-1] < seen[0]


def test_overrides_merge_last():
    cfg = TrainConfig(deepspeed_overrides={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5})
    ds = build_deepspeed_config(cfg, 1, False)
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["steps_per_print"] == 5 and "scheduler" not in ds
