"""The Hugging Face export of a trained engine, and the check that it reproduces the engine's logits.

Checkpoint layout (one directory, merged across ranks by Ray Train):
    ds/                 DeepSpeed checkpoint (tag "state"): weights, optimizer, scheduler, step and epoch
    hf/                 final only: save_pretrained weights (safetensors), tokenizer, lookahead_config.yaml
    export_check.pt     final only: a probe batch and the engine's logits on it, for reload checks
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ExportMismatchError

CHECKPOINT_TAG = "state"
HF_SUBDIR = "hf"
EXPORT_CHECK_FILE = "export_check.pt"


def save_state(engine: Any, directory: str, step: int, epoch: int) -> None:
    """The resumable DeepSpeed state of every rank (weights, optimizer, scheduler) plus step and epoch."""
    engine.save_checkpoint(os.path.join(directory, "ds"), tag=CHECKPOINT_TAG,
                           client_state={"step": step, "epoch": epoch})


def load_state(engine: Any, directory: str) -> tuple[int, int]:
    """Restore a checkpoint written by :func:`save_state`; returns (step, epoch)."""
    _, client_state = engine.load_checkpoint(os.path.join(directory, "ds"), tag=CHECKPOINT_TAG)
    return int(client_state["step"]), int(client_state["epoch"])


def export_model(engine: Any, tokenizer: Any, cfg: LookaheadConfig, directory: str, probe: dict[str, Any] | None,
                 rank: int, metrics: dict[str, Any]) -> None:
    """save_pretrained the trained weights on rank 0 (ZeRO-3: gathered from all ranks first) and check them.

    Adds ``exported_parameters`` (and ``export_max_abs_logit_diff`` when verified) to ``metrics``.

    Raises:
        ExportMismatchError: the state dict is empty, or the reloaded export's logits differ.
    """
    state = _full_state_dict(engine, cfg.train.zero_stage)
    logits = _probe_logits(engine, probe)
    if rank != 0:
        return
    hf_dir = os.path.join(directory, HF_SUBDIR)
    if not state:
        raise ExportMismatchError("the gathered state dict is empty: nothing to export")
    metrics["exported_parameters"] = sum(v.numel() for v in state.values())
    engine.module.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)  # empties `state` (HF 5)
    tokenizer.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "lookahead_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if probe is None or logits is None:
        return
    import torch

    torch.save({k: v.cpu() for k, v in probe.items()} | {"logits": logits}, os.path.join(directory, EXPORT_CHECK_FILE))
    if cfg.train.verify_export:
        metrics["export_max_abs_logit_diff"] = verify_export(hf_dir, probe, logits, cfg.train.precision,
                                                             cfg.model.trust_remote_code)


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any]:
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank must call it
    return engine.module.state_dict()


def _probe_logits(engine: Any, probe: dict[str, Any] | None) -> Any:
    if probe is None:
        return None
    import torch

    engine.eval()
    with torch.no_grad():  # under ZeRO-3 every rank takes part in the forward pass
        logits = engine(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float().cpu()
    engine.train()
    return logits


def verify_export(hf_dir: str, probe: dict[str, Any], logits: Any, precision: str,
                  trust_remote_code: bool = False) -> float:
    """Reload ``hf_dir`` and compare its logits on the probe batch with ``logits``; returns the max difference.

    Raises:
        ExportMismatchError: the difference exceeds the tolerance of the precision (bf16 0.05, fp32 1e-3).
    """
    import torch

    from lookahead_ray.modeling import load_pretrained_model

    model = load_pretrained_model(hf_dir, precision=precision, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        reloaded = model(input_ids=probe["input_ids"].cpu(), attention_mask=probe["attention_mask"].cpu()).logits
    diff = float((reloaded.float() - logits).abs().max())
    tolerance = 5e-2 if precision == "bf16" else 1e-3
    if not diff <= tolerance:
        raise ExportMismatchError(f"export in {hf_dir} gives logits {diff:.3g} away from the trained engine "
                                  f"(tolerance {tolerance}): the export is incomplete or wrong")
    return diff
