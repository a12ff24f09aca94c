"""The training objective the loop calls per micro-batch: plain SFT (the model's own causal LM loss), or Constrained
SFT (``train.constrained``; the loss is :mod:`lookahead_ray.train.constrained`'s) against a frozen reference: the
seed model in its own DeepSpeed engine (no optimizer), or, under LoRA, the policy with its adapters disabled. The
reference engine is built by ``train.loop.build_objective``.
"""

from __future__ import annotations

import copy
from typing import Any

from lookahead_ray.config import ConstrainedSFTConfig


class SFTObjective:
    """Cross-entropy over the answer tokens, as the model computes it from ``labels``."""

    name = "sft"

    def __call__(self, engine: Any, batch: dict[str, Any]) -> Any:
        return engine(**batch).loss


class ConstrainedObjective:
    """Constrained SFT against ``reference`` (a DeepSpeed engine of the frozen seed, in eval mode), or, when it is
    None, against the policy engine's own base model with its LoRA adapters disabled (peft's ``disable_adapter``)."""

    name = "constrained_sft"

    def __init__(self, cfg: ConstrainedSFTConfig, reference: Any = None):
        self.cfg, self.reference = cfg, reference

    def __call__(self, engine: Any, batch: dict[str, Any]) -> Any:
        from lookahead_ray.train.constrained import constrained_loss_from_logps, token_logps

        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}  # no cross-entropy computed
        reference = self.reference_logps(engine, inputs, labels)  # first: its logits are freed before the policy's
        policy = token_logps(engine(**inputs).logits, labels)
        return constrained_loss_from_logps(policy, reference, labels, self.cfg, batch.get("position_ids"))

    def reference_logps(self, engine: Any, inputs: dict[str, Any], labels: Any) -> Any:
        """The reference's per-token log-probabilities of ``labels`` (no gradient, fp32)."""
        import torch

        from lookahead_ray.train.constrained import token_logps

        with torch.no_grad():
            if self.reference is not None:
                return token_logps(self.reference(**inputs).logits, labels)
            module = engine.module  # the peft model: its base with the adapters off is the seed
            training = module.training
            module.train(False)  # no dropout, no gradient checkpointing for a forward without backward
            try:
                with module.disable_adapter():
                    return token_logps(engine(**inputs).logits, labels)
            finally:
                module.train(training)


def reference_deepspeed_config(ds_config: dict[str, Any], zero_stage: int) -> dict[str, Any]:
    """The reference engine's DeepSpeed config: the training config without optimizer or scheduler, in the same
    precision and batch sizes; ZeRO-3 (parameters partitioned as the policy's) when training uses 3, else stage 0
    (ZeRO-2 never shards parameters: each rank holds the whole reference)."""
    out = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "zero_force_ds_cpu_optimizer"):
        out.pop(key, None)
    if zero_stage == 3:
        out["zero_optimization"].pop("offload_optimizer", None)
    else:
        out["zero_optimization"] = {"stage": 0}
    return out
