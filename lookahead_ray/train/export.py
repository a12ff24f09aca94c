"""The Hugging Face export of a trained engine, and the check that it reproduces the engine's logits.

Checkpoint layout (one directory, merged across ranks by Ray Train):
    ds/                     DeepSpeed checkpoint (tag "state"): weights, optimizer, scheduler, step and epoch
    lookahead_config.yaml   the run's config (rank 0), enough to rebuild the model
    hf/                     final only: save_pretrained weights (safetensors), tokenizer, lookahead_config.yaml
    export_check.pt         final only: a probe batch and the engine's logits on it, for reload checks
    complete-rank<R>.json   each rank's last file: the checkpoint is whole (see ``train.checkpoints``)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lookahead_ray import storage
from lookahead_ray.config import LookaheadConfig
from lookahead_ray.errors import ExportMismatchError
from lookahead_ray.train.layout import CONFIG_FILE, DS_SUBDIR, EXPORT_CHECK_FILE, FINAL_DIR, HF_SUBDIR, ds_dir

CHECKPOINT_TAG = "state"
RELATIVE_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
"""Largest logit difference between the export and the engine, as a fraction of the largest |logit|."""
MIN_ARGMAX_AGREEMENT = 0.99


def save_state(engine: Any, directory: str, position: dict[str, Any], cfg: LookaheadConfig, rank: int) -> None:
    """The resumable DeepSpeed state of every rank (weights, optimizer, scheduler) plus the data position
    (step, epoch, micro-batches consumed, data hash); rank 0 adds the run's config, so
    ``lookahead-ray export --checkpoint`` can rebuild the model from the checkpoint alone."""
    # With LoRA the frozen base is not saved: it is rebuilt from model.name_or_path (or model.tiny and the seed).
    engine.save_checkpoint(ds_dir(directory), tag=CHECKPOINT_TAG, client_state=dict(position),
                           exclude_frozen_parameters=cfg.train.lora is not None)
    if rank == 0:
        with storage.atomic_file(os.path.join(directory, CONFIG_FILE)) as f:  # never a 0-byte config on a full disk
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def load_state(engine: Any, directory: str, adapters_only: bool = False) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_state`; returns its data position. ``adapters_only``: a LoRA
    run's checkpoint, which holds the adapters and leaves the frozen base as built."""
    _, client_state = engine.load_checkpoint(ds_dir(directory), tag=CHECKPOINT_TAG,
                                             load_module_strict=not adapters_only)
    return client_state


def export_model(engine: Any, tokenizer: Any, cfg: LookaheadConfig, directory: str, probe: dict[str, Any] | None,
                 rank: int, metrics: dict[str, Any]) -> None:
    """save_pretrained the trained weights on rank 0 (ZeRO-3: gathered from all ranks first), with the probe
    batch and the engine's logits on it for :func:`verify_export`. Adds ``exported_parameters`` to ``metrics``.

    Raises:
        ExportMismatchError: the gathered state dict is empty.
    """
    state = _full_state_dict(engine, cfg.train.zero_stage)
    logits = _probe_logits(engine, probe)
    if rank != 0:
        return
    if not state:
        raise ExportMismatchError("the gathered state dict is empty: nothing to export")
    hf_dir = os.path.join(directory, HF_SUBDIR)
    lora = cfg.train.lora
    if lora is None:
        metrics["exported_parameters"] = sum(v.numel() for v in state.values())
        _save_hf(engine.module, state, tokenizer, cfg, hf_dir)
    else:
        _save_lora(engine.module, state, tokenizer, cfg, hf_dir, metrics)
    if probe is not None and logits is not None:
        import torch

        torch.save({k: v.cpu() for k, v in probe.items()} | {"logits": logits},
                   os.path.join(directory, EXPORT_CHECK_FILE))


def _save_hf(module: Any, state: dict[str, Any] | None, tokenizer: Any, cfg: LookaheadConfig, hf_dir: str) -> None:
    module.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)  # empties `state` (HF 5)
    tokenizer.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, CONFIG_FILE), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def _save_lora(module: Any, state: dict[str, Any], tokenizer: Any, cfg: LookaheadConfig, hf_dir: str,
               metrics: dict[str, Any]) -> None:
    """A LoRA run's export: the adapter (hf/adapter/, or hf/ itself without ``merge``) and the merged model."""
    from lookahead_ray.train.lora import ADAPTER_NAME, ADAPTER_SUBDIR, adapter_state_dict, merged_state_dict

    lora = cfg.train.lora
    adapter_dir = os.path.join(hf_dir, ADAPTER_SUBDIR) if lora.merge else hf_dir
    adapter = adapter_state_dict(module, state)
    metrics["exported_adapter_parameters"] = sum(v.numel() for v in adapter.values())
    module.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    with open(os.path.join(adapter_dir, CONFIG_FILE), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if lora.merge:
        merged = merged_state_dict(state, lora, module.peft_config[ADAPTER_NAME].fan_in_fan_out)
        metrics["exported_parameters"] = sum(v.numel() for v in merged.values())
        # The base model's save_pretrained writes its config and exactly the weights given: the merged ones.
        _save_hf(module.get_base_model(), merged, tokenizer, cfg, hf_dir)


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


def verify_export(hf_dir: str, check_file: str, precision: str, device: Any = "cpu",
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Reload ``hf_dir`` on ``device`` and compare its logits on the saved probe batch with the engine's.

    The tolerance is relative to the logit scale (bf16 logits of a large model are spaced ~0.1 apart near
    their maximum, so no absolute tolerance fits every model), and the per-token argmax must agree wherever the
    engine's top two logits are further apart than the tolerance.

    Returns:
        ``export_check_passed`` and the numbers behind it, as metrics.
    """
    import torch

    from lookahead_ray.modeling import load_pretrained_model

    check = torch.load(check_file, map_location="cpu")
    model = load_pretrained_model(hf_dir, precision=precision, trust_remote_code=trust_remote_code).to(device).eval()
    with torch.no_grad():
        reloaded = model(input_ids=check["input_ids"].to(device),
                         attention_mask=check["attention_mask"].to(device)).logits.float().cpu()
    del model
    expected = check["logits"]
    scale = float(expected.abs().max())
    max_diff = float((reloaded - expected).abs().max())
    tolerance = RELATIVE_TOLERANCE[precision]
    # Positions whose top two logits lie within the tolerance are ties the allowed rounding may break (a LoRA
    # merge rounds W + BA once in bf16 where the engine rounds Wx and BAx apart); the argmax must agree elsewhere.
    top2 = expected.topk(2, dim=-1).values
    decided = check["attention_mask"].bool() & (top2[..., 0] - top2[..., 1] > tolerance * scale)
    agreement = float((reloaded.argmax(-1) == expected.argmax(-1))[decided].float().mean()) if decided.any() else 1.0
    relative = max_diff / max(scale, 1e-6)
    return {"export_check_passed": bool(relative <= tolerance and agreement >= MIN_ARGMAX_AGREEMENT),
            "export_max_abs_logit_diff": max_diff, "export_relative_logit_diff": relative,
            "export_logit_scale": scale, "export_argmax_agreement": agreement,
            "export_relative_tolerance": tolerance}


def export_checkpoint(checkpoint_dir: str, final_dir: str) -> dict[str, Any]:
    """Rebuild a Hugging Face export from a checkpoint's DeepSpeed state (no retraining) into ``final_dir``.

    The weights come from the fp32 master copy in the ZeRO optimizer shards, cast to the run's precision one tensor
    at a time and saved around a model built on the meta device (one copy of the weights in memory); the export is
    checked against the engine's probe logits when the checkpoint has them, and published only if
    the check passes.

    Raises:
        ExportMismatchError: the rebuilt export does not reproduce the engine's logits.
        FileNotFoundError: ``checkpoint_dir`` is not a checkpoint written by ``train``.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lookahead_ray import storage

    root = Path(checkpoint_dir)
    if not (root / CONFIG_FILE).is_file() or not (root / DS_SUBDIR).is_dir():
        raise FileNotFoundError(f"{checkpoint_dir} is not a lookahead-ray checkpoint (no {CONFIG_FILE} and ds/)")
    storage.check_output_dir(final_dir, CONFIG_FILE, "export --output-dir", inputs=[checkpoint_dir])
    cfg = LookaheadConfig.from_dict(yaml.safe_load((root / CONFIG_FILE).read_text()), source=str(root / CONFIG_FILE))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if cfg.train.lora is not None:
        model, tokenizer, state = _lora_model(cfg, root)
    else:
        model, tokenizer = _empty_model(cfg, root)  # on the meta device: no weights of its own (7B: no 27 GB copy)
        state = get_fp32_state_dict_from_zero_checkpoint(ds_dir(str(root)), tag=CHECKPOINT_TAG)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
        raise ExportMismatchError(f"{checkpoint_dir}: the checkpoint's weights do not match the model (missing "
                                  f"{missing}, unexpected {unexpected})")
    for key in list(state):  # cast one tensor at a time: never a second full copy
        state[key] = state[key].to(dtype)
    model = model.to(dtype)
    with tempfile.TemporaryDirectory(prefix="lookahead-export-") as scratch:
        # Local: staged beside the target (one rename away); a URI: staged here, uploaded by publish_dir.
        staging = Path(scratch, FINAL_DIR) if storage.is_uri(final_dir) else storage.staging_path(final_dir)
        if cfg.train.lora is not None:
            _save_lora(model, state, tokenizer, cfg, str(staging), {})
        else:
            _save_hf(model, state, tokenizer, cfg, str(staging))
        check: dict[str, Any] = {}
        if (root / EXPORT_CHECK_FILE).is_file():
            check = verify_export(str(staging), str(root / EXPORT_CHECK_FILE), cfg.train.precision,
                                  trust_remote_code=cfg.model.trust_remote_code)
            if not check["export_check_passed"]:
                shutil.rmtree(staging, ignore_errors=True)
                raise ExportMismatchError(f"rebuilt export from {checkpoint_dir} fails the logit check: {check}")
        storage.publish_dir(staging, final_dir, marker=CONFIG_FILE)
    return check


def _lora_model(cfg: LookaheadConfig, root: Path) -> tuple[Any, Any, dict[str, Any]]:
    """A LoRA run's model rebuilt as training built it (the base from ``model.name_or_path`` or ``model.tiny``, the
    adapters seeded), and its full state dict with the checkpoint's trained adapters in it."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lookahead_ray.modeling import build_model, tokenizer_for, torch_dtype
    from lookahead_ray.train.lora import add_adapters

    tokenizer = tokenizer_for(cfg.model)
    # The base in the run's precision, as training loaded it (host memory: the whole base, unlike a full run's rebuild)
    model = build_model(cfg.model, tokenizer, cfg.train.seed, dtype=torch_dtype(cfg.train.precision))
    torch.manual_seed(cfg.train.seed)
    model = add_adapters(model, cfg.train.lora, cfg.model.name_or_path)
    trained = get_fp32_state_dict_from_zero_checkpoint(ds_dir(str(root)), tag=CHECKPOINT_TAG,
                                                       exclude_frozen_parameters=True)
    state = model.state_dict()
    wanted = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(trained) != wanted:
        raise ExportMismatchError(f"{root}: the checkpoint's adapters do not match the rebuilt model's (missing "
                                  f"{sorted(wanted - set(trained))[:5]}, unexpected {sorted(set(trained) - wanted)[:5]})")
    state.update(trained)
    return model, tokenizer, state


def _empty_model(cfg: LookaheadConfig, root: Path) -> tuple[Any, Any]:
    """The model architecture on the meta device (its config, no weights) and the tokenizer, preferring what the
    checkpoint holds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lookahead_ray.modeling import build_model, load_tokenizer, tokenizer_for

    hf_dir = root / HF_SUBDIR
    if (hf_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(hf_dir), trust_remote_code=cfg.model.trust_remote_code)
    else:
        tokenizer = tokenizer_for(cfg.model)
    with torch.device("meta"):
        if (hf_dir / "config.json").is_file():
            config = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=cfg.model.trust_remote_code)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code), tokenizer
        return build_model(cfg.model, tokenizer, cfg.train.seed), tokenizer
