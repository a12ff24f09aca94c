"""ZeRO-3 loading where each rank reads only its own partition (train/zero3_loading.py), in real DeepSpeed worlds of
2 and 3 gloo processes: the gathered weights are the checkpoint's, bit for bit."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")


def _save_tiny(directory: Path, dtype, tie: bool, shard: str | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))


def _worker(rank: int, world: int, port: int, model_dir: str, out: str, train_dtype: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from lookahead_ray.train.loop import init_device

    init_device(use_gpu=False, world_size=world)  # as a Ray Train worker: no JIT build of DeepSpeed's CPU ops
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        _check_partition(rank, model_dir, out, train_dtype, world)
    finally:  # a process exiting with gloo's threads alive can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _check_partition(rank: int, model_dir: str, out: str, train_dtype: str, world: int) -> None:
    import deepspeed
    from safetensors.torch import load_file

    from lookahead_ray.errors import ModelLoadError
    from lookahead_ray.train.zero3_loading import checkpoint_files, load_zero3_model

    ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": train_dtype == "bfloat16"}}
    dtype = getattr(torch, train_dtype)
    try:
        model = load_zero3_model(model_dir, ds_config, dtype)
    except ModelLoadError as exc:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": str(exc)}))
        return
    reference = {}
    for path in checkpoint_files(model_dir):
        reference.update(load_file(str(path)))
    mismatched = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if param.dtype != dtype or not torch.equal(param.data, reference[name].to(dtype)):
                mismatched.append(name)
    held = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"mismatched": mismatched, "held": held, "total": total,
                                                         "files": len(checkpoint_files(model_dir))}))


def _load_in_world(model_dir: Path, out: Path, world: int, train_dtype: str = "bfloat16") -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir()
    mp.start_processes(_worker, args=(world, port, str(model_dir), str(out), train_dtype), nprocs=world,
                       start_method="spawn")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(("dtype", "train_dtype", "tie", "shard", "world"), [
    ("bfloat16", "bfloat16", False, "40KB", 2),  # sharded checkpoint (an index and several files), untied (Llama-2)
    ("float16", "bfloat16", True, None, 3),  # fp16 checkpoint trained in bf16; tied embeddings; a padded partition
    ("float32", "float32", False, None, 2),  # fp32 stays fp32 (DeepSpeed's zero.Init(dtype=) would make it bf16)
])
def test_each_rank_reads_its_partition_and_the_gathered_weights_are_the_checkpoints(tmp_path, dtype, train_dtype, tie,
                                                                                     shard, world):
    model_dir = tmp_path / "model"
    _save_tiny(model_dir, getattr(torch, dtype), tie, shard)
    results = _load_in_world(model_dir, tmp_path / "out", world, train_dtype)
    assert all(r["mismatched"] == [] for r in results), results
    if shard:
        assert results[0]["files"] > 1
    total = results[0]["total"]
    for r in results:  # every rank holds its 1/world share (plus at most one padding element per weight)
        assert total / world <= r["held"] <= total / world + 40, (r, total)


def test_a_checkpoint_whose_shapes_do_not_match_its_config_is_one_error_naming_the_weight(tmp_path):
    model_dir = tmp_path / "model"
    _save_tiny(model_dir, torch.bfloat16, tie=False)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    results = _load_in_world(model_dir, tmp_path / "out", 2)
    error = results[0]["error"]
    assert "model.layers.0.mlp.down_proj.weight has shape [40, 72] in model.safetensors" in error, error
    assert "config gives [40, 80]" in error and str(model_dir) in error
