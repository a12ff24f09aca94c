"""The training objective the loop calls per micro-batch: plain SFT (the model's own causal LM loss), or Constrained
SFT (``train.constrained``) against a frozen reference: the seed model in its own DeepSpeed engine (no optimizer),
or, under LoRA, the policy with its adapters disabled. The reference engine is built by ``train.loop.build_objective``.

Constrained SFT's loss (Qi et al. 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep";
the authors' ConstrainedSFTTrainer in Unispac/shallow-vs-deep-alignment): pure tensor functions, no model, no engine.

Per answer token t (its index within the example's answer, 0-based) with strength beta_t (:func:`position_betas`):

    w_t  = max(2 (1 - sigmoid(beta_t (log p_policy(t) - log p_ref(t)))), min_weight)      (no gradient through w_t)
    loss = mean over the micro-batch's answer tokens of  -w_t log p_policy(t)

whose gradient is the paper's objective's, (2 / beta_t) log(1 + exp(beta_t (log p_ref - log p_policy))). While the
policy equals the reference every weight is 1 (cross-entropy); a token the policy already made likelier than the
reference weighs less, strongly so where beta_t is large (the first answer tokens). With beta = 0 every weight is 1
and the loss is the causal LM cross-entropy, value and gradient. Numerics in fp32, labels shifted as Hugging Face's
causal LM loss shifts them (logits at t predict the label at t + 1; the first label is never predicted).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from lookahead_ray.config import ConstrainedSFTConfig
from lookahead_ray.data.tokenization import IGNORE_INDEX


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
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}  # no cross-entropy computed
        reference = self.reference_logps(engine, inputs, labels)  # first: its logits are freed before the policy's
        policy = token_logps(engine(**inputs).logits, labels)
        return constrained_loss_from_logps(policy, reference, labels, self.cfg, batch.get("position_ids"))

    def reference_logps(self, engine: Any, inputs: dict[str, Any], labels: Any) -> Any:
        """The reference's per-token log-probabilities of ``labels`` (no gradient, fp32)."""
        import torch

        with torch.no_grad():
            if self.reference is not None:
                return token_logps(self.reference(**inputs).logits, labels)
            module = engine.module  # the peft model: its base with the adapters off is the seed
            training = module.training
            module.train(False)  # no dropout, no gradient checkpointing for a forward without backward
            try:
                with module.disable_adapter():
                    # The base model itself, not the engine: under ZeRO-3 a forward of the engine's root module
                    # starts a new step of DeepSpeed's prefetch trace, and one step of other modules (the adapters
                    # off) before each of the policy would invalidate it every time. This way every step is the
                    # same (reference forward, policy forward, backward) and the trace, recorded once, holds.
                    return token_logps(module.get_base_model()(**inputs).logits, labels)
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


def position_betas(positions: Any, cfg: ConstrainedSFTConfig) -> torch.Tensor:
    """beta_t for answer positions ``positions`` (any shape, ints): beta x first_token_bias_factor at t = 0,
    beta x bias_factor for 1 <= t < bias_length, beta beyond (and beta everywhere when bias_length is 0)."""
    t = torch.as_tensor(positions)
    factor = torch.where(t < cfg.bias_length, cfg.bias_factor, 1.0)
    factor = torch.where((t == 0) & (cfg.bias_length > 0), cfg.first_token_bias_factor, factor)
    return cfg.beta * factor.to(torch.float32)


def answer_positions(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The index of each label token within its example's answer (the labels that are not ``IGNORE_INDEX``, counted
    in order), -1 where the label is ignored. An example is a row of a padded batch, or, with ``position_ids`` (a
    packed batch), a run of a row that starts where the position ids restart at 0."""
    answer = (labels != IGNORE_INDEX).long()
    seen = answer.cumsum(dim=-1)  # answer tokens up to and including this one, from the row's start
    if position_ids is not None:
        # Answer tokens before each example's first token, carried forward over the example (never decreasing).
        before = torch.where(position_ids == 0, seen - answer, torch.zeros_like(seen))
        seen = seen - torch.cummax(before, dim=-1).values
    return torch.where(answer.bool(), seen - 1, torch.full_like(seen, -1))


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | tokens before t) in fp32, aligned with ``labels`` (batch, sequence); 0 where the label is
    ignored and at t = 0 (never predicted). The same log-probabilities Hugging Face's causal LM loss averages."""
    shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)  # the label each position predicts
    nll = F.cross_entropy(logits.float().flatten(0, -2), shifted.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(shifted.shape)
    return F.pad(-nll[..., :-1], (1, 0))  # back onto the label it predicts


def constrained_loss_from_logps(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
                                cfg: ConstrainedSFTConfig, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The loss from per-token log-probabilities (:func:`token_logps` of the policy, with gradient, and of the
    reference) aligned with ``labels``: the mean over trained answer tokens of -w_t log p_policy(t)."""
    trained = labels.clone()
    trained[..., 0] = IGNORE_INDEX  # the first label is never predicted (as in the cross-entropy)
    positions = answer_positions(trained, position_ids)
    mask = positions >= 0
    betas = position_betas(positions, cfg).to(policy_logps.device)
    with torch.no_grad():
        delta = policy_logps.detach().float() - ref_logps.float()
        weights = (2 * (1 - torch.sigmoid(betas * delta))).clamp(min=cfg.min_weight)
    losses = -(weights * policy_logps.float())[mask]
    return losses.sum() / mask.sum().clamp(min=1)


def constrained_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                     cfg: ConstrainedSFTConfig, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Constrained SFT's scalar loss over a micro-batch (see the module docstring): ``policy_logits`` with gradient,
    ``ref_logits`` of the frozen reference on the same batch, ``labels`` as for the causal LM loss (IGNORE_INDEX
    outside the answers), ``position_ids`` for a packed batch."""
    with torch.no_grad():
        ref_logps = token_logps(ref_logits, labels)
    return constrained_loss_from_logps(token_logps(policy_logits, labels), ref_logps, labels, cfg, position_ids)
