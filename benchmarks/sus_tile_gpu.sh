#!/usr/bin/env bash
# GPU runs behind benchmarks/results/{step_sus_tile_*,attention_sus_tile_*,long_context_sus_*}: tile-sampled SUS
# against SDPA's default dispatch, eager and compiled, in one process per table. Results go to $OUT.
#   PARTS="step attention" bash benchmarks/sus_tile_gpu.sh      (or PARTS=long)
#   TILE_CS=4,16 (step) TILE_C=4 (long) BUDGET=60 COMMIT=<sha> (recorded as source_commit where the checkout has no .git)
set -u
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-"step attention"}
TILE_CS=${TILE_CS:-4,16}
TILE_C=${TILE_C:-4}
BUDGET=${BUDGET:-60}
export PYTHONUNBUFFERED=1 CHAINFREE_GIT_COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
[ -d .carry/cache ] && export CHAINFREE_CACHE=$PWD/.carry/cache   # pre-built token cache (content-keyed)
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in $PARTS; do
  case $part in
    step)
      python -m chainfree.bench.attention --step --ns 8192,16384,32768 --head-dims 64 --model-dim 768 --cs 32 \
        --tile-cs "$TILE_CS" --out "$OUT" --name step_sus_tile_d768
      python -m chainfree.bench.attention --step --ns 8192,16384,32768 --head-dims 128 --model-dim 2048 --cs 32 \
        --tile-cs "$TILE_CS" --no-per-pair --rounds 4 --out "$OUT" --name step_sus_tile_d2048 ;;
    attention)
      python -m chainfree.bench.attention --ns 4096,8192,16384,32768 --head-dims 128 --model-dim 2048 --cs "" \
        --v1-cs 32 --tile-cs 4,8,16 --mask causal --out "$OUT" --name attention_sus_tile ;;
    long)
      python -m chainfree.bench.long_context --device cuda --budget "$BUDGET" --cases "${CASES:-exact,exact+compile,sus_tile+compile}" \
        --case-set "sus_tile+compile:method.c=$TILE_C" --out "$OUT" --name long_context_sus_t16k ;;
    *) echo "unknown part $part" ;;
  esac
done
ls -la "$OUT"
