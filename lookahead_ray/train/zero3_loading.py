"""ZeRO-3 loading of a checkpoint where each rank reads only its own partition of every weight.

transformers' own ZeRO-3 path (``HfDeepSpeedConfig`` + ``from_pretrained``) has rank 0 read the whole checkpoint and
gathers every layer on every rank to copy it in: measured with 2 CPU workers on a 317 MiB checkpoint, rank 0 peaked
656 MiB and rank 1 418 MiB above their start for a 159 MiB partition (``benchmarks/model_load_memory.py``). Here the
model is built under ``deepspeed.zero.Init`` without initialising any weight (so it is partitioned as it is built),
then every rank copies the rows of each tensor that hold its partition straight from the memory-mapped safetensors
files into its partition: no gathers, no collective, nothing held but the partition and the file's page cache (shared
by the node's workers).

A checkpoint this cannot map one to one (no safetensors, names transformers would convert, NVMe offload) is loaded
through transformers' own path instead, with a warning that it holds more host memory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lookahead_ray.errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (sharded or not); empty when it has none."""
    directory = Path(model_dir)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def load_zero3_model(model_dir: str, ds_config: dict[str, Any], dtype: Any, trust_remote_code: bool = False) -> Any:
    """The causal LM in ``model_dir``, its parameters ZeRO-3 partitioned across the data-parallel ranks.

    Falls back to transformers' ZeRO-3 loading (see the module docstring) when the checkpoint is not plain
    safetensors whose names are the model's own.

    Raises:
        ModelLoadError: a weight of the model is in no checkpoint file, or has another shape (names the key).
    """
    files = checkpoint_files(model_dir)
    nvme = "nvme" in json.dumps(ds_config.get("zero_optimization", {}).get("offload_param", {}))
    if files and not nvme:
        model = _build_partitioned(model_dir, ds_config, dtype, trust_remote_code)
        if _copy_partitions(model, files, model_dir):
            return model
        del model
    logger.warning("ZeRO-3: %s is loaded through transformers' own ZeRO-3 path (rank 0 reads the whole checkpoint)",
                   model_dir)
    return _load_through_transformers(model_dir, ds_config, dtype, trust_remote_code)


def _build_partitioned(model_dir: str, ds_config: dict[str, Any], dtype: Any, trust_remote_code: bool) -> Any:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    class PartitionWithoutBroadcast(deepspeed.zero.Init):
        """zero.Init broadcasts every new weight from rank 0 before partitioning it (a whole model's traffic, and
        a second full-size buffer per weight while receiving); here every value is overwritten from the
        checkpoint right after, so the broadcast is skipped."""

        def _zero_init_param(self, param: Any) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    known = all(hasattr(deepspeed.zero.Init, name) for name in ("_zero_init_param", "_convert_to_deepspeed_param"))
    partitioned_init = PartitionWithoutBroadcast if known else deepspeed.zero.Init
    config = _import_model_classes(model_dir, trust_remote_code)
    # No weight is initialised (every one is overwritten from the checkpoint); rotary buffers keep their fp32.
    # zero.Init takes its dtype from the config's bf16 / fp16 sections: its own `dtype=` argument is overridden by
    # bf16 on accelerators without fp16 (the CPU) in DeepSpeed 0.19, so it is not passed.
    with no_init_weights(), prevent_arange_dtype_change(), partitioned_init(config_dict_or_path=ds_config):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _copy_partitions(model: Any, files: list[Path], model_dir: str) -> bool:
    """Read this rank's slice of every checkpoint tensor into the model; False when the names do not match
    the model's (the caller falls back). Every weight of the model must be found."""
    import torch
    import torch.distributed as dist

    parameters = dict(model.named_parameters())
    state_names = set(model.state_dict())
    buffers = {name: b for name, b in model.named_buffers() if name in state_names and name not in parameters}
    aliases = state_names - set(parameters) - set(buffers)  # tied weights saved under a second name
    headers = {path: read_safetensors_header(path) for path in files}
    names = {key for header in headers.values() for key in header}
    missing = set(parameters) | set(buffers)
    if not missing <= names or not names <= missing | aliases:
        return False
    with torch.no_grad():
        for path, header in headers.items():
            with open(path, "rb", buffering=0) as handle:
                for key, entry in header.items():
                    target = parameters.get(key, buffers.get(key))
                    if target is None:
                        continue  # a tied alias: its weight is loaded under the other name
                    shape = tuple(target.ds_shape if key in parameters else target.shape)
                    if tuple(entry.shape) != shape:
                        raise ModelLoadError(f"{model_dir}: weight {key} has shape {list(entry.shape)} in {path.name}, "
                                             f"the model's config gives {list(shape)}")
                    if key in parameters:
                        _read_own_partition(handle, entry, target, dist.get_rank(group=target.ds_process_group))
                    else:
                        target.copy_(entry.read(handle, 0, entry.numel).reshape(shape))
    return True


class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file (the format: an 8-byte little-endian header length,
    a JSON header of dtype / shape / data offsets, then each tensor's raw little-endian row-major bytes)."""

    DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, dtype: str, shape: list[int], offset: int) -> None:
        import torch

        if dtype not in self.DTYPES:
            raise ModelLoadError(f"safetensors dtype {dtype} is not supported for ZeRO-3 loading")
        self.dtype = getattr(torch, self.DTYPES[dtype])
        self.shape, self.offset, self.numel = shape, offset, math.prod(shape)

    def read(self, handle: Any, first: int, count: int, out: Any = None) -> Any:
        """Elements ``[first, first + count)`` of the flattened tensor, read from disk into ``out`` (a contiguous
        CPU tensor of this dtype) or a new one."""
        import torch

        out = torch.empty(count, dtype=self.dtype) if out is None else out
        size = out.element_size()
        handle.seek(self.offset + first * size)
        view = memoryview(out.view(torch.uint8).numpy())
        done = 0
        while done < count * size:  # a raw read may return fewer bytes than asked
            got = handle.readinto(view[done:])
            if not got:
                raise ModelLoadError(f"{handle.name}: truncated safetensors file")
            done += got
        return out


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {key: TensorEntry(value["dtype"], value["shape"], 8 + length + value["data_offsets"][0])
            for key, value in header.items()}


def _read_own_partition(handle: Any, entry: TensorEntry, param: Any, rank: int) -> None:
    """DeepSpeed's partition of a parameter is elements ``[rank * n, (rank + 1) * n)`` of the flattened weight
    (``n = ds_tensor.ds_numel``, the last partition zero-padded): those bytes are contiguous in the file, so
    they are read alone, and nothing else of the tensor is held."""
    partition = param.ds_tensor
    size = partition.ds_numel
    start = rank * size
    end = min(start + size, param.ds_numel)
    partition.zero_()
    if start >= end:
        return
    own = partition.narrow(0, 0, end - start)
    if own.device.type == "cpu" and own.dtype == entry.dtype:
        entry.read(handle, start, end - start, out=own)  # straight into the partition
    else:  # another dtype (an fp16 checkpoint trained in bf16) or a GPU partition: one slice in between
        own.copy_(entry.read(handle, start, end - start))


def _import_model_classes(model_dir: str, trust_remote_code: bool) -> Any:
    """The model's config, its modeling classes imported (the model built once on the meta device: no memory)
    before any zero.Init: a class first defined inside zero.Init keeps the __init__ it had before its class
    decorators ran (zero.Init records it at class creation and puts it back on exit), which drops transformers'
    kernel wrappers and breaks every later model of that class in the process (the export check's reload)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config


def _load_through_transformers(model_dir: str, ds_config: dict[str, Any], dtype: Any,
                               trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    _import_model_classes(model_dir, trust_remote_code)
    keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained sees ZeRO-3 while this object lives
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    del keep_alive
    return model
