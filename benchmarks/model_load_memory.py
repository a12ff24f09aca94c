"""Host memory of loading a checkpoint for training: ZeRO-2 vs ZeRO-3, 2 Ray Train workers on CPU.

Run by hand (not a test):

    python benchmarks/model_load_memory.py                          # ~0.5B-parameter Llama, bf16 on disk
    python benchmarks/model_load_memory.py --layers 8 --hidden 1024  # smaller

A randomly initialised Llama is saved with ``save_pretrained`` and loaded by each worker through the path a real
run takes (``train.loop.load_training_model``: ZeRO-2 ``from_pretrained``, memory-mapped; ZeRO-3
``train.zero3_loading``, each rank reading its own partition), then wrapped by ``deepspeed.initialize``.

"placed" is the point where every weight the worker trains has been read from the checkpoint: for ZeRO-3 when
loading returns; for ZeRO-2 after every memory-mapped page has been read once, which is what moving the model to
its GPU does (on CPU nothing moves, and an untouched mapping would look free). Each worker records, at that point,
the growth of its RSS since before loading (the peak, ``ru_maxrss``; it counts a memory-mapped checkpoint's pages,
which the node's workers share in the page cache) and of its USS (memory only it holds). "initialized" is after
``deepspeed.initialize``: on CPU that includes the fp32 master weights and optimizer states, which on GPU live on the
device. Printed against the checkpoint's size on disk, with ZeRO-3 / ZeRO-2 ratios, and against the baseline of
transformers' own ZeRO-3 loading (``HfDeepSpeedConfig`` + ``from_pretrained``), measured in the same run.
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
    import torch

    from lookahead_ray.config import LookaheadConfig
    from lookahead_ray.train.deepspeed_config import build_deepspeed_config
    from lookahead_ray.train.loop import init_device, initialize_engine, load_training_model

    def memory() -> dict[str, float]:
        info = psutil.Process().memory_full_info()
        return {"rss": info.rss / 2**20, "uss": info.uss / 2**20,
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    cfg = LookaheadConfig.from_dict(config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    init_device(False, world)
    ds_config = build_deepspeed_config(cfg.train, world, on_gpu=False)
    before = memory()
    if config["loader"] == "transformers":  # the baseline: transformers' own ZeRO-3 loading
        import deepspeed

        from lookahead_ray.train.zero3_loading import _load_through_transformers

        deepspeed.init_distributed(dist_backend="gloo")
        model = _load_through_transformers(cfg.model.name_or_path, ds_config, torch.bfloat16)
    else:
        model = load_training_model(cfg, None, ds_config)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel():  # ZeRO-2: read every page once, as the copy to a GPU would (ZeRO-3: already read)
                param.max()
    placed = memory()
    engine = initialize_engine(model, cfg.train, ds_config, total_steps=10, on_gpu=False)
    initialized = memory()
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())  # ZeRO-3: this rank's part
    record = {"rank": rank, "local_parameters": local, "placed_peak_growth": placed["peak"] - before["rss"],
              "placed_uss_growth": placed["uss"] - before["uss"],
              "initialized_uss": initialized["uss"], "initialized_peak": initialized["peak"]}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


def run(stage: int, model_dir: str, out: Path, loader: str = "lookahead") -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lookahead_ray.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.tiny=null", f"model.name_or_path={model_dir}",
                                                            "model.tokenizer=builtin:tiny", f"train.zero_stage={stage}",
                                                            "train.precision=bf16", "train.num_workers=2"])
    out.mkdir(parents=True)
    TorchTrainer(measure, train_loop_config={"cfg": cfg.to_dict(), "out": str(out), "loader": loader},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"load-zero{stage}-{loader}", storage_path=str(out.parent / "ray"))).fit()
    del ray
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds): a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.vocab = 1, 128, 512
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
        from lookahead_ray.runtime import init_ray

        init_ray(num_cpus=2, env_vars={"PYTHONPATH": str(REPO)}, log_to_driver=False)  # or joins RAY_ADDRESS
        results = {name: run(stage, str(model_dir), Path(scratch, name), loader)
                   for name, stage, loader in (("ZeRO-2", 2, "lookahead"), ("ZeRO-3", 3, "lookahead"),
                                               ("ZeRO-3 via transformers", 3, "transformers"))}
        ray.shutdown()
    for name, ranks in results.items():
        for r in ranks:
            print(f"{name} rank {r['rank']}: placed: peak RSS +{r['placed_peak_growth']:6,.0f} MiB "
                  f"({r['placed_peak_growth'] / size:.2f}x the checkpoint), USS +{r['placed_uss_growth']:6,.0f}; "
                  f"initialized: USS {r['initialized_uss']:6,.0f}, peak {r['initialized_peak']:6,.0f} MiB; "
                  f"parameters held {r['local_parameters'] / 1e9:.3f} B")
    worker = {name: {what: max(r[what] for r in ranks) for what in ranks[0]} for name, ranks in results.items()}
    for what, label in (("placed_peak_growth", "peak RSS growth until placed"),
                        ("initialized_uss", "USS after deepspeed.initialize")):
        zero2, zero3, baseline = (worker[name][what] for name in results)
        print(f"{label}, the larger worker: ZeRO-3 / ZeRO-2 = {zero3:,.0f} / {zero2:,.0f} MiB = {zero3 / zero2:.2f}x; "
              f"ZeRO-3 / ZeRO-3 via transformers = {zero3:,.0f} / {baseline:,.0f} MiB = {zero3 / baseline:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
