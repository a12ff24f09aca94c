"""What a training run costs before it starts: GPU memory per device, host memory while loading, checkpoint and
run disk. Pure arithmetic over the model's shape (its config.json) and the typed train config; ``--dry-run``
prints it. Estimates, not measurements: the checkpoint bytes are tested against real checkpoints of tiny models.

GPU memory per device follows DeepSpeed's ZeRO accounting (weights 2 bytes a parameter in bf16, gradients 2,
Adam's fp32 master weights and moments 12, divided by the world size where the stage shards them). Activations
follow Korthikanti et al. 2022: 34 s b h + 5 a s^2 b bytes a layer without recomputation, one layer's input kept
per layer with it (an upper bound where flash attention avoids the s^2 term). Then the fp32 logits of the loss
and DeepSpeed's communication buckets at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lookahead_ray.config import TrainConfig

GB = 1e9
ADAM_BYTES = 12
"""fp32 master weights, Adam's m and v, per parameter: DeepSpeed keeps them for bf16 and fp32 training alike."""
BUCKET_ELEMENTS = 5e8
"""DeepSpeed's default reduce and allgather bucket sizes (ZeRO-2), in elements."""
STAGE3_LIVE_ELEMENTS = 1e9 + 5e7
"""ZeRO-3's default stage3_max_live_parameters plus stage3_prefetch_bucket_size."""


@dataclass
class ModelShape:
    """What the estimate needs of a decoder-only model (a Llama-family config.json)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                   config["vocab_size"], heads, config.get("num_key_value_heads") or heads,
                   bool(config.get("tie_word_embeddings", False)))

    @property
    def parameters(self) -> int:
        h, kv = self.hidden_size, self.hidden_size // self.num_attention_heads * self.num_key_value_heads
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h  # attention, MLP, two norms
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + h

    def lora_parameters(self, r: int, targets: list[str] | None = None, modules_to_save: list[str] | None = None) -> int:
        """Parameters LoRA trains: adapters of rank ``r`` on ``targets`` (Llama projection names, r x (in + out) each;
        default and names of other families: all seven, an estimate) plus ``modules_to_save`` trained in full
        (embed_tokens, lm_head)."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        sizes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                 "up_proj": (h, i), "down_proj": (i, h)}
        known = [name for name in (targets or sizes) if name in sizes]
        chosen = known if targets and len(known) == len(targets) else list(sizes)
        full = {"embed_tokens": self.vocab_size * h, "lm_head": self.vocab_size * h}
        return (self.num_hidden_layers * sum(r * sum(sizes[name]) for name in chosen)
                + sum(full.get(name, 0) for name in modules_to_save or []))


@dataclass
class CostReport:
    parameters: int
    world_size: int
    gpu_bytes: dict[str, float] = field(default_factory=dict)
    host_loading_bytes_per_node: float = 0.0
    checkpoint_bytes: float = 0.0
    checkpoints_on_disk: int = 0
    run_disk_bytes: float = 0.0
    trainable_parameters: int = 0

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu_bytes.values())

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {_size(value)}" for name, value in self.gpu_bytes.items())
        trained = (f" ({self.trainable_parameters / 1e6:.3g} M trained: LoRA)"
                   if 0 < self.trainable_parameters < self.parameters else "")
        return [f"{self.parameters / 1e9:.3g} B parameters{trained}, {self.world_size} worker(s): GPU memory per device "
                f"{_size(self.gpu_total)} ({parts})",
                f"host memory per node while loading {_size(self.host_loading_bytes_per_node)}; one checkpoint "
                f"{_size(self.checkpoint_bytes)}, up to {self.checkpoints_on_disk} on disk; the run needs "
                f"{_size(self.run_disk_bytes)} of storage"]


def _size(value: float) -> str:
    return f"{value / GB:.1f} GB" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB"


def estimate(shape: ModelShape, train: TrainConfig, seq_len: int, workers_per_node: int | None = None) -> CostReport:
    """The cost of ``train`` on a model of ``shape`` at sequence length ``seq_len`` (a micro-batch's longest)."""
    p, world = shape.parameters, train.num_workers
    weight_bytes = 2 if train.precision == "bf16" else 4
    sharded = world if train.zero_stage == 3 else 1
    lora = train.lora
    # LoRA: only the adapters have gradients and Adam states; a QLoRA base is NF4 with double quantization (~0.53
    # bytes a parameter), not sharded by ZeRO-2.
    trained = shape.lora_parameters(lora.r, lora.target_modules, lora.modules_to_save) if lora else p
    base_bytes = 0.53 if lora and lora.quantize else weight_bytes
    # bf16: DeepSpeed turns the rank's gradient partition into an fp32 copy for the optimizer step (+4 bytes a
    # parameter; measured on one H200: 112.7 GB peak for 5.1 B parameters, benchmarks/gpu_check.sh).
    gradient_bytes = weight_bytes + (4 if train.precision == "bf16" and not train.offload_optimizer else 0)
    gpu = {"weights": 0.0 if train.offload_params else (base_bytes * p + weight_bytes * (trained if lora else 0)) / sharded,
           "gradients": gradient_bytes * trained / world,
           "optimizer": 0.0 if train.offload_optimizer else ADAM_BYTES * trained / world}
    if train.constrained is not None and not lora:  # Constrained SFT's frozen seed (LoRA: the base, adapters off)
        gpu["reference weights"] = 0.0 if train.offload_params else weight_bytes * p / sharded
    b, s, h, layers = train.micro_batch_size, seq_len, shape.hidden_size, shape.num_hidden_layers
    per_layer = 34 * s * b * h + 5 * shape.num_attention_heads * s * s * b
    gpu["activations"] = (layers * 2 * s * b * h + per_layer) if train.gradient_checkpointing else layers * per_layer
    gpu["logits"] = 2 * 4 * b * s * shape.vocab_size  # fp32 logits and their gradient
    # ZeRO-2's reduce and allgather buckets; with overlap_comm (on GPUs) DeepSpeed documents 4.5x of them.
    # Buckets hold gradients of trained parameters only: LoRA's adapters fill a fraction of one.
    zero2_buckets = 2 * 2 * min(BUCKET_ELEMENTS, trained) * (4.5 if train.use_gpu else 1)
    gpu["buckets"] = (2 * (STAGE3_LIVE_ELEMENTS + min(BUCKET_ELEMENTS, trained)) if train.zero_stage == 3
                      else zero2_buckets)
    local = workers_per_node or world
    # While loading (benchmarks/model_load_memory.py): ZeRO-2 memory-maps the safetensors, so the node's page cache
    # holds one copy of the checkpoint for all its workers; under ZeRO-3 each worker reads only its partition
    # (train.zero3_loading), local/world of the checkpoint per node. Offloaded states stay in host memory.
    host = weight_bytes * p * (local / world if train.zero_stage == 3 else 1)
    if train.offload_optimizer:
        host += ADAM_BYTES * trained * local / world
    if train.offload_params and train.zero_stage == 3:
        host += weight_bytes * p * local / world
    checkpoint = checkpoint_bytes(trained, train)  # a LoRA checkpoint holds the adapters, not the frozen base
    kept = train.keep_checkpoints + 1  # Ray Train deletes the oldest only after the newest is in place
    export = weight_bytes * (p * (lora.merge if lora else 1) + (trained if lora else 0))
    return CostReport(p, world, gpu, host, checkpoint, kept, kept * checkpoint + 2 * export,
                      trainable_parameters=trained)


def checkpoint_bytes(parameters: int, train: TrainConfig) -> float:
    """One DeepSpeed checkpoint of ``train.export.save_state`` over ``parameters`` trained ones: Adam's fp32 state
    (sharded over the ranks, 12 bytes a parameter in all) plus, under ZeRO-2, the trained weights in the training
    precision (ZeRO-3 keeps them only in the fp32 partitions)."""
    weights = (2 if train.precision == "bf16" else 4) * parameters if train.zero_stage == 2 else 0
    return ADAM_BYTES * parameters + weights
