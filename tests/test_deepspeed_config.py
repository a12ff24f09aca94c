"""The pure DeepSpeed config builder."""

from __future__ import annotations

from lookahead_ray.config import TrainConfig
from lookahead_ray.train.deepspeed_config import build_deepspeed_config


def test_batch_sizes_are_explicit_and_consistent():
    cfg = TrainConfig(micro_batch_size=16, gradient_accumulation_steps=2, num_workers=4)
    ds = build_deepspeed_config(cfg, world_size=4, total_steps=100, on_gpu=True)
    assert ds["train_batch_size"] == 16 * 2 * 4 == cfg.global_batch
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert "auto" not in str(ds)


def test_gpu_uses_deepspeed_optimizer_cpu_uses_client_optimizer():
    gpu = build_deepspeed_config(TrainConfig(learning_rate=2e-5, weight_decay=0.1), 1, 10, on_gpu=True)
    assert gpu["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.1}}
    cpu = build_deepspeed_config(TrainConfig(offload_optimizer=True), 1, 10, on_gpu=False)
    assert "optimizer" not in cpu and cpu["zero_force_ds_cpu_optimizer"] is False
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


def test_stage3_gathers_weights_for_export_and_precision_maps_to_bf16():
    ds = build_deepspeed_config(TrainConfig(zero_stage=3, offload_params=True, precision="bf16"), 2, 10, True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == "cpu" and ds["bf16"] == {"enabled": True}
    assert build_deepspeed_config(TrainConfig(precision="fp32"), 2, 10, True)["bf16"] == {"enabled": False}


def test_schedules_and_overrides():
    cosine = build_deepspeed_config(TrainConfig(warmup_steps=3), 1, 50, False)["scheduler"]
    assert cosine == {"type": "WarmupCosineLR", "params": {"total_num_steps": 50, "warmup_num_steps": 3,
                                                           "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}
    linear = build_deepspeed_config(TrainConfig(lr_schedule="linear", learning_rate=1e-4), 1, 50, False)
    assert linear["scheduler"]["type"] == "WarmupDecayLR" and linear["scheduler"]["params"]["warmup_max_lr"] == 1e-4
    cfg = TrainConfig(deepspeed_overrides={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5})
    ds = build_deepspeed_config(cfg, 1, 10, False)
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["steps_per_print"] == 5
