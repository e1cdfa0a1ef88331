#!/usr/bin/env bash
# LBI at the paper's scale on one GPU (issue 29): `reproduce lbi --scale full` per architecture (dense, causal
# LBI r=16, paper_leaky r=16, the scan backward's step time and an fp32 scan-vs-autograd gradient check), and
# `train --config ARCH-50m --method lbi` with every LBI default for a few steps (the run that used to be refused
# or to run out of memory). Every part has its own time limit inside BUDGET seconds; results are copied to $OUT
# as soon as a part ends, so a part cut short keeps what finished.
#
# Prepare HERE (a machine with the registries), then carry [".carry_lbi"]:
#   mkdir -p .carry_lbi/whl && echo /.carry_lbi/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .carry_lbi/whl rich markdown-it-py mdurl pygments
#   CHAINFREE_CACHE=/tmp/cf python3 -c "from chainfree.config import load_config; from chainfree.data.tokens \
#     import load_tokens; load_tokens(load_config('gpt-50m', ['data.corpus=pystdlib']).data)"
#   cp -r /tmp/cf/pystdlib-3.11-bpe8192-* .carry_lbi/pystdlib311_bpe8192   # pre-tokenised: nothing is trained there
#
#   PARTS="gpt:15728640 m2defaults mamba2:3145728" BUDGET=330 bash benchmarks/lbi_full_gpu.sh
# A part `ARCH:TOKENS[:CASES[:SCAN_STEPS]]` runs the reproduction (CASES comma-separated or none, default
# dense,lbi_r16,paper_leaky_r16; SCAN_STEPS default 6, 0 = no scan timing); `m2defaults` trains mamba2-50m with
# LBI's defaults for 3 steps. KEEP=1 keeps the cases of benchmarks/results/lbi_full_ARCH_DEV.json made with the
# same settings (one architecture's cases spread over calls). EXTRA="--set train.compile=true --set
# train.compile_scope=blocks" compiles each block (one graph shared by the identical blocks). DEV=cpu EXTRA="--set model.d_model=64 ..." M2EXTRA="model.d_model=64,..." for a
# dry run.
set -u
OUT=${OUT:-benchmarks/results}
RUNS=${RUNS:-/tmp/lbi_full_runs}
DEV=${DEV:-cuda}
BUDGET=${BUDGET:-330}
PARTS=${PARTS:-gpt:15728640}
EXTRA=${EXTRA:-}
TOKENS_DIR=${TOKENS_DIR:-.carry_lbi/pystdlib311_bpe8192}
START=$(date +%s)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .carry_lbi/whl ] && ! python3 -c "import rich" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry_lbi/whl/*.whl
fi
export PYTHONPATH="$PWD/src:/tmp/site:${PYTHONPATH:-}"
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
DATA="--set data.corpus=tokens --set data.path=$TOKENS_DIR"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
for part in $PARTS; do
  lim=$(left)
  if [ "$lim" -lt 40 ]; then echo "SKIPPED $part: ${lim}s of the budget left"; continue; fi
  echo "+ part $part (limit ${lim}s)"
  if [ "$part" = m2defaults ]; then
    # `chainfree train --config mamba2-50m --method lbi` (defaults: region_size 2, r=16, C=4, scan, vjp),
    # on the carried corpus, 3 steps: the scan's Jacobian passes now size themselves to the free memory
    timeout "$lim" python3 - "$OUT" "$DEV" "$TOKENS_DIR" "${M2EXTRA:-}" <<'EOF'
import json, sys, torch
from chainfree.config import load_config
from chainfree.train import train
out, dev, tokens = sys.argv[1:4]
sets = ["method.name=lbi", "data.corpus=tokens", f"data.path={tokens}", f"train.device={dev}", "train.steps=3",
        "train.eval_every=3", "train.eval_batches=1", "train.ckpt_every=100", *filter(None, sys.argv[4].split(","))]
s = train(load_config("mamba2-50m", sets), "/tmp/lbi_defaults_mamba2", progress=False)
s["command"] = "chainfree train --config mamba2-50m --method lbi " + " ".join(f"--set {x}" for x in sets[1:])
s["total_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
json.dump(s, open(f"{out}/lbi_defaults_mamba2_{dev}.json", "w"), indent=1, default=str)
print({k: s[k] for k in ("step_time_s", "tokens_per_s", "peak_memory_bytes", "final_train_loss")})
EOF
    continue
  fi
  IFS=: read -r arch tokens cases scan <<<"$part"
  KEEPSET=""
  if [ "${KEEP:-0}" = 1 ]; then  # keep the finished cases of the committed result made with the same settings
    [ -f "$RUNS"/lbi_full_"$arch"_"$DEV".json ] || cp benchmarks/results/lbi_full_"$arch"_"$DEV".json "$RUNS"/ 2>/dev/null
    KEEPSET="--set repro.keep=1"
  fi
  timeout "$lim" python3 -m chainfree.reproduce.lbi --out "$RUNS" --device "$DEV" --set model.kind="$arch" $DATA \
    --set repro.tokens="$tokens" --set repro.cases="${cases:-dense,lbi_r16,paper_leaky_r16}" \
    --set repro.scan_steps="${scan:-6}" $KEEPSET $EXTRA
  cp "$RUNS"/lbi_full_"$arch"_"$DEV".* "$OUT"/ 2>/dev/null
done
echo "done in $(( $(date +%s) - START ))s"
