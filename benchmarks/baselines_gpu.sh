#!/usr/bin/env bash
# Every method beside the strongest exact baseline, on one GPU: `chainfree bench baselines` builds each entry
# (exact eager, exact+compile, exact+cudagraphs, exact+ckpt, exact+sac, the methods), warms it up (compilation
# included), then times all entries interleaved (rounds x steps, order rotating) and measures each one's peak
# and activation memory. Fused AdamW, bf16 autocast, chunked cross-entropy, SDPA default dispatch (recorded).
#
#   PARTS=gpt2s,d2048 bash benchmarks/baselines_gpu.sh      # GPT-2-small (d=768, 12 layers) and d=2048
#   PARTS=hbll,lbi    bash benchmarks/baselines_gpu.sh      # HBLL and LBI at 8..64 layers (HBLL_DEPTHS), LBI at
#                                                           # gpt-small, vs exact eager / compiled / CUDA graphs
#
# On the offline GPU machine first build .whl/ and .cache/ here (scripts/device_prep.sh) and carry both.
# Results (JSON + markdown) go to $OUT (default benchmarks/results); DEV=cpu EXTRA="--set ..." for a dry run.
set -u
DEV=${DEV:-cuda}
OUT=${OUT:-benchmarks/results}
EXTRA=${EXTRA:-}
PARTS=${PARTS:-gpt2s,d2048,hbll,lbi}
BASIS_RANK=${BASIS_RANK:-32}
[ "$DEV" = cuda ] && [ -f scripts/device_setup.sh ] && source scripts/device_setup.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
bl() {  # time limit (s), then the bench baselines arguments
  local limit=$1; shift
  echo "+ chainfree bench baselines $*"
  # output streams (no tail): a part cut by its time limit still shows what it did; results are rewritten after
  # every sweep value, so run sweeps smallest first
  timeout "$limit" python3 -m chainfree.cli bench baselines --device "$DEV" --out "$OUT" "$@" $EXTRA 2>&1 |
    grep -v "━"
}
# GPT-2-small body: d=768, 12 layers, 12 heads, T=1024, batch 16, BPE vocab 4096 (tied head, chunked CE)
GPT2S="--model gpt --set model.d_model=768 --set model.n_layers=12 --set model.n_heads=12 --set model.seq_len=1024
  --set train.batch_size=16"
case ",$PARTS," in *,gpt2s,*)
  bl "${GPT2S_LIMIT:-270}" $GPT2S --entries "exact,exact+compile,exact+cudagraphs,exact+ckpt,exact+sac,exact+sac+compile,basis" \
    --set method.rank="$BASIS_RANK" --rounds 5 --steps 4 --warmup 3 --name baselines_gpt2small_cuda ;;
esac
case ",$PARTS," in *,d2048,*)
  bl 120 --model gpt --set model.d_model=2048 --set model.n_layers=12 --set model.n_heads=16 \
    --set model.seq_len=1024 --set train.batch_size=16 \
    --entries "exact,exact+ckpt,exact+sac,basis" --set method.rank="$BASIS_RANK" \
    --rounds 4 --steps 3 --warmup 2 --name baselines_gpt_d2048_cuda ;;
esac
# HBLL (and LBI) depth sweep at the scale of docs/hbll.md (d=256, batch 16 x 128, BPE 4096): exact eager and
# compiled per block (train.compile_scope=blocks: identical blocks share one compilation, so compile time does not
# grow with depth), without and with CUDA graphs (reduce-overhead: the launch-bound baseline), HBLL eager and with
# compiled blocks, LBI. Whole-model compilation of the 64-layer model did not finish in 150 s on an H200.
case ",$PARTS," in *,hbll,*)
  bl "${HBLL_LIMIT:-330}" --model gpt --set model.d_model=256 --set model.n_heads=4 --set model.seq_len=128 \
    --set train.batch_size=16 --entries "exact,exact+compile+blocks,exact+cudagraphs+blocks,hbll,hbll+compile,lbi" \
    --sweep model.n_layers="${HBLL_DEPTHS:-8,16,32,64}" --rounds 5 --steps 5 --warmup 3 \
    --name baselines_hbll_lbi_depth_cuda ;;
esac
# LBI single-GPU step vs dense exact, eager and compiled (gpt-small preset: d=512, 6 layers, T=1024)
case ",$PARTS," in *,lbi,*)
  bl "${LBI_LIMIT:-150}" --config gpt-small --set data.bpe_vocab_size=4096 --set train.batch_size=16 \
    --entries "exact,exact+compile,exact+cudagraphs,lbi,lbi+compile" --rounds 5 --steps 4 --warmup 3 \
    --name baselines_lbi_cuda ;;
esac
ls -la "$OUT"
