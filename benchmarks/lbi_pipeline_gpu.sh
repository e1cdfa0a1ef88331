#!/usr/bin/env bash
# LBI on two GPUs (device kind nvidia-h200-x2): region-parallel LBI (K = 2 regions, one per GPU) against the
# same LBI model trained with torch.distributed.pipelining over the same two stages (GPipe and 1F1B, 8
# micro-batches), dense DDP and single-device LBI, for the ~50M Transformer and Mamba-2 presets at r = 16
# and 32; bf16 autocast, NCCL; backward bytes per rank by category. One JSON + markdown per (preset, r).
#
#   bash benchmarks/lbi_pipeline_gpu.sh            # results in benchmarks/results (OUT=... to change)
set -eu
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
for preset in gpt-50m mamba2-50m; do
  for r in 16 32; do
    python -m chainfree.bench.lbi_pipeline --out "$OUT" --preset "$preset" --world 2 --rank "$r" \
      --steps "${STEPS:-10}" --warmup "${WARMUP:-3}"
  done
done
