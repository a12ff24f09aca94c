"""Host memory of loading a checkpoint for training: ZeRO-2 vs ZeRO-3, 2 Ray Train workers on CPU.

Run by hand (not a test):

    python benchmarks/model_load_memory.py                          # ~0.5B-parameter Llama, bf16 on disk
    python benchmarks/model_load_memory.py --layers 8 --hidden 1024  # smaller

A randomly initialised Llama is saved with ``save_pretrained`` and loaded by each worker through the path a real
run takes (``train.loop.load_training_model``: ``from_pretrained``, inside transformers' ``HfDeepSpeedConfig`` under
ZeRO-3), then wrapped by ``deepspeed.initialize`` (``initialize_engine``). Each worker records its RSS before
loading, after loading and after ``deepspeed.initialize``, its USS (memory only it holds: a memory-mapped
checkpoint's pages are the node's shared page cache, counted in RSS) and its peak RSS (``ru_maxrss``); per node is
the sum of the two workers (both run on this machine). On CPU the engine's weights and optimizer states are host
memory too, so "initialized" is the whole training state, not only what loading costs. Printed against the
checkpoint's size on disk, with ZeRO-3 / ZeRO-2 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import resource

    import psutil
    import ray.train

    from lookahead_ray.config import LookaheadConfig
    from lookahead_ray.train.deepspeed_config import build_deepspeed_config
    from lookahead_ray.train.loop import init_device, initialize_engine, load_training_model

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    def uss() -> float:  # memory only this process holds: not the page cache of a memory-mapped checkpoint
        return psutil.Process().memory_full_info().uss / 2**20

    cfg = LookaheadConfig.from_dict(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    init_device(False, world)
    ds_config = build_deepspeed_config(cfg.train, world, on_gpu=False)
    before = rss()
    model, zero3 = load_training_model(cfg, None, ds_config)
    loaded, loaded_uss = rss(), uss()
    engine = initialize_engine(model, cfg.train, ds_config, total_steps=10, client_optimizer=True)
    del zero3
    wrapped, wrapped_uss = rss(), uss()
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())  # ZeRO-3: this rank's part
    record = {"rank": rank, "before_mb": before, "loaded_mb": loaded, "initialized_mb": wrapped,
              "loaded_uss_mb": loaded_uss, "initialized_uss_mb": wrapped_uss,
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "local_parameters": local}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


def run(stage: int, model_dir: str, out: Path) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lookahead_ray.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.tiny=null", f"model.name_or_path={model_dir}",
                                                            "model.tokenizer=builtin:tiny", f"train.zero_stage={stage}",
                                                            "train.precision=bf16", "train.num_workers=2"])
    out.mkdir(parents=True)
    TorchTrainer(measure, train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"load-zero{stage}", storage_path=str(out.parent / "ray"))).fit()
    del ray
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="model-load-bench-") as scratch:
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                             num_key_value_heads=args.hidden // 128, tie_word_embeddings=False)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        model_dir = Path(scratch, "model")
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
        size = sum(p.stat().st_size for p in model_dir.iterdir()) / 2**20
        print(f"model: {parameters / 1e9:.2f} B parameters, {size:,.0f} MiB on disk (bf16 safetensors)")
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        results = {stage: run(stage, str(model_dir), Path(scratch, f"zero{stage}")) for stage in (2, 3)}
        ray.shutdown()
    for stage, ranks in results.items():
        for r in ranks:
            print(f"ZeRO-{stage} rank {r['rank']}: before {r['before_mb']:6,.0f}  loaded {r['loaded_mb']:6,.0f}  "
                  f"initialized {r['initialized_mb']:6,.0f} (USS: loaded {r['loaded_uss_mb']:6,.0f}, initialized "
                  f"{r['initialized_uss_mb']:6,.0f})  peak {r['peak_mb']:6,.0f} MiB ({r['peak_mb'] / size:.2f}x "
                  f"the checkpoint)  parameters held {r['local_parameters'] / 1e9:.3f} B")
    for what in ("peak_mb", "loaded_uss_mb", "initialized_uss_mb"):
        worker = {s: max(r[what] for r in ranks) for s, ranks in results.items()}
        node = {s: sum(r[what] for r in ranks) for s, ranks in results.items()}
        print(f"{what}: per worker ZeRO-3 / ZeRO-2 = {worker[3]:,.0f} / {worker[2]:,.0f} MiB = {worker[3] / worker[2]:.2f}x;"
              f" per node (2 workers) {node[3]:,.0f} / {node[2]:,.0f} MiB = {node[3] / node[2]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
