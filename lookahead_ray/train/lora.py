"""LoRA and QLoRA through peft: adapters on the frozen base the loop would otherwise train in full.

The adapters go on after the model is built or loaded (under ZeRO-3: partitioned while loading, the adapters are
partitioned by DeepSpeed's engine), so every way of building a model gets them the same way. The export merges
them with :func:`merged_state_dict`, a pure function of the gathered state dict, so it works the same under
ZeRO-2 and ZeRO-3 and never modifies the engine's module.
"""

from __future__ import annotations

import socket
from typing import Any

from lookahead_ray.config import LoraConfig, TrainConfig
from lookahead_ray.errors import ConfigError

ADAPTER_SUBDIR = "adapter"
"""final/adapter/: the adapter (adapter_config.json, adapter_model.safetensors) beside the merged weights."""
ADAPTER_NAME = "default"

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                     "olmo2", "granite"], _LLAMA_LIKE),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
"""Every attention and MLP projection (as in the QLoRA paper); other families get peft's "all-linear"."""


def target_modules(lora: LoraConfig, model_type: str) -> list[str] | str:
    return lora.target_modules or DEFAULT_TARGET_MODULES.get(model_type, "all-linear")


def add_adapters(model: Any, lora: LoraConfig, base_name_or_path: str | None) -> Any:
    """``model`` wrapped by peft with fresh LoRA adapters; only they (and ``modules_to_save``) require grad.

    Raises:
        ConfigError: a ``target_modules`` name matches no module of the model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=target_modules(lora, model.config.model_type), bias=lora.bias,
                            modules_to_save=lora.modules_to_save or None)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"train.lora.target_modules: {str(exc).splitlines()[0]}") from None
    # The adapter names the base it belongs to as the user gave it (a URI, not this node's cached copy).
    wrapped.peft_config[ADAPTER_NAME].base_model_name_or_path = base_name_or_path
    return wrapped


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, all) parameters; under ZeRO-3 each weight's full size, not this rank's partition."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def merged_state_dict(state: dict[str, Any], lora: LoraConfig, fan_in_fan_out: bool = False) -> dict[str, Any]:
    """The base model's state dict with every adapter merged in (W + alpha / r * B @ A, in fp32, then cast back to
    W's dtype), from a peft model's full state dict; names as the base model's own. ``fan_in_fan_out``: the base
    stores its weights transposed (GPT-2's Conv1D; peft's config says so). Pure: tensors in, tensors out.
    """

    scale = lora.alpha / lora.r
    prefix = "base_model.model."
    merged: dict[str, Any] = {}
    for key, value in state.items():
        name = key.removeprefix(prefix)
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if name.endswith(".base_layer.weight"):
            layer = key.removesuffix(".base_layer.weight")
            a, b = state[f"{layer}.lora_A.{ADAPTER_NAME}.weight"], state[f"{layer}.lora_B.{ADAPTER_NAME}.weight"]
            delta = (b.float() @ a.float()) * scale
            value = (value.float() + (delta.T if fan_in_fan_out else delta)).to(value.dtype)
        name = name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
        merged[name] = value
    return merged


def adapter_state_dict(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The adapter's weights (as ``save_pretrained`` of the peft model writes them) out of its full state dict."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME)


def check_adapters(train: TrainConfig, model_name_or_path: str | None, on_gpu_here: bool | None = None) -> None:
    """What ``train.lora`` needs, in one line each: a base an adapter-only export can name; for QLoRA CUDA GPUs, a
    checkpoint to quantize and a bitsandbytes that can run.

    ``on_gpu_here`` None: the planner (perhaps a CPU-only head of a GPU cluster): neither this machine's CUDA nor its
    bitsandbytes is checked.

    Raises:
        ConfigError: what is missing and what to do.
    """
    if train.lora is None:
        return
    if train.lora.quantize:
        if not train.use_gpu:
            raise ConfigError("train.lora.quantize: 4bit (QLoRA) runs on CUDA GPUs only (bitsandbytes' NF4 kernels); "
                              "set train.use_gpu=true on a GPU cluster, or train.lora.quantize=null to train LoRA on a "
                              "bf16/fp32 base")
        if model_name_or_path is None:
            raise ConfigError("train.lora.quantize: 4bit quantizes a checkpoint while loading it: set "
                              "model.name_or_path (a model built from model.tiny cannot be quantized)")
    if not train.lora.merge and model_name_or_path is None:
        raise ConfigError("train.lora.merge: false exports the adapter alone, which must name its base model: set "
                          "model.name_or_path (a model built from model.tiny has no directory to name), or merge: true")
    if not train.lora.quantize:
        return
    if on_gpu_here is None:  # the planner (perhaps a CPU-only head): bitsandbytes is the workers' concern
        return
    problem = bitsandbytes_problem()
    if problem:
        raise ConfigError(f"train.lora.quantize: 4bit needs bitsandbytes, which cannot be imported on "
                          f"{socket.gethostname()} ({problem}); pip install 'lookahead-ray[qlora]' on the GPU nodes")
    if on_gpu_here is False:
        raise ConfigError(f"train.lora.quantize: 4bit needs a CUDA GPU, and none is visible on {socket.gethostname()}")


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be imported here, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or its CUDA setup failing at import
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def load_quantized(name_or_path: str, dtype: Any, trust_remote_code: bool) -> Any:
    """The base checkpoint in NF4 (double quantization, ``dtype`` compute), ready for adapters (peft's
    ``prepare_model_for_kbit_training``: norms in fp32, input grads for gradient checkpointing)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype or torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": torch.cuda.current_device()},
                                                 trust_remote_code=trust_remote_code)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
