#!/usr/bin/env bash
# The GPU check of issues 24 (packing) and 25 (LoRA), as run on a lent H200 (no network there): padded vs
# group_by_length vs packed (sdpa, flex_attention, Liger) full fine-tuning of a Llama-2-7B-shaped model, then LoRA
# on the same model, through the training loop's own engine (benchmarks/train_throughput.py --one-engine).
#
# It needs, beside the repository (git-ignored, carried to the machine):
#   gpu_wheels/*.whl            cp312 wheels the machine lacks (deepspeed built with DS_BUILD_OPS=0, transformers,
#                               peft, liger-kernel, pydantic, ...; gpu_wheels/INSTALL.txt lists the install)
#   gpu_wheels/gsm8k_train.jsonl     ../shared/data/gsm8k/train.jsonl
#   gpu_wheels/mistral-tokenizer/    mistral_common's Mistral-7B tokenizer, converted (save_pretrained)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
LAYERS=${LAYERS:-24}
STEPS=${STEPS:-12}
{
  start=$(date +%s)
  # The machine's python3 is itself a venv (torch, numpy, triton): the wheels go to a folder put first on PYTHONPATH.
  pip install -q --no-deps --no-index --target /tmp/site gpu_wheels/*.whl || exit 3
  echo "install: $(( $(date +%s) - start )) s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  PYTHONPATH=/tmp/site python3 -c "import torch, transformers, deepspeed, peft, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" 2>&1 | grep -v WARNING
  PYTHONPATH=/tmp/site:$PWD timeout "${BENCH_TIMEOUT:-450}" python3 benchmarks/train_throughput.py --layouts --one-engine --gpu \
    --shape llama2-7b --layers "$LAYERS" --micro-batch 16 --steps "$STEPS" --lora --flex --liger ${EXTRA:-} \
    --data gpu_wheels/gsm8k_train.jsonl --tokenizer gpu_wheels/mistral-tokenizer
  echo "exit $? after $(( $(date +%s) - start )) s"
} 2>&1 | grep -v -E "WARNING|warnings.warn|FutureWarning|UserWarning" | tee "$OUT/gpu_check.txt"
