#!/usr/bin/env bash
# The GPU measurement behind benchmarks/results/*_cuda.*: gpt-small (6 layers, d=512, bf16 autocast), BASIS and
# SUS against exact in one process each; results tarred into $OUT (the device returns at most 8 files).
#   bash benchmarks/gpu_bench.sh            (on a GPU machine; DEV=cpu EXTRA="--set ..." for a dry run)
set -u
DEV=${DEV:-cuda}
OUT=${OUT:-benchmarks/results}
EXTRA=${EXTRA:-}
C=src/chainfree/configs/gpt-small.toml
[ "$DEV" = cuda ] && [ -f scripts/device_setup.sh ] && source scripts/device_setup.sh
command -v chainfree >/dev/null || chainfree() { python3 -m chainfree.cli "$@"; }
R=$OUT/gpu
mkdir -p "$R"
pack() { tar -czf "$OUT/gpu_results.tar.gz" -C "$R" . ; }
run() { echo "+ chainfree $*"; timeout 90 python3 -m chainfree.cli "$@" 2>&1 | tail -25; pack; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
run bench speed --config $C --method basis --device "$DEV" --seq-lens 256,512,1024 --out "$R" $EXTRA
run bench speed --config $C --method sus --device "$DEV" --seq-lens 256,512,1024 --out "$R" $EXTRA
run bench memory --config $C --method basis --device "$DEV" --seq-lens 256,512,1024 --out "$R" $EXTRA
run bench memory --config $C --method sus --device "$DEV" --seq-lens 256,512,1024 --out "$R" $EXTRA
run bench fidelity --config $C --method sus --device "$DEV" --set train.batch_size=8 --k 4 --batches 4 \
  --out "$R" $EXTRA
ls -la "$R"
