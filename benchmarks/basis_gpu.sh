#!/usr/bin/env bash
# BASIS on one GPU: compiled-vs-eager check with a profile, and frontier tables (one process per table).
#
#   PARTS=compiled bash benchmarks/basis_gpu.sh    # compiled (default and reduce-overhead) vs eager BASIS, d=2048
#   PARTS=d2048 SEED=1 bash benchmarks/basis_gpu.sh # d=2048 frontier at the compressions that matter, equal time
#   PARTS=d768 SEED=1 bash benchmarks/basis_gpu.sh  # GPT-2-small frontier, same
#
# On the offline GPU machine first build .whl/ and .cache/ here (scripts/device_prep.sh) and carry both.
# Results (JSON + markdown + PNG) go to $OUT (default benchmarks/results).
set -u
OUT=${OUT:-benchmarks/results}
SEED=${SEED:-0}
PARTS=${PARTS:-compiled,d2048,d768}
SETS_2048=${SETS_2048:-"all=2,8;all-unfused=2,8"}
SETS_768=${SETS_768:-"all=2,8;mlp=8"}
COMPILE_2048=${COMPILE_2048:-"basis all-unfused c=2;basis all-unfused c=8"}
COMPILE_768=${COMPILE_768:-"basis all c=2;basis all c=8"}
[ -f scripts/device_setup.sh ] && source scripts/device_setup.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
bb() {  # time limit (s), then the basis_bench arguments
  local limit=$1; shift
  echo "+ python -m chainfree.bench.basis_bench $*"
  timeout "$limit" python3 -m chainfree.bench.basis_bench "$@" --device cuda --out "$OUT" 2>&1 | grep -v "━"
}
case ",$PARTS," in *,compiled,*)
  bb "${COMPILED_LIMIT:-150}" compiled --width 2048 --layers 2 --batch 8 --steps 8 --compression 8 --profile \
    --tag basis_compiled_d2048
  bb "${COMPILED_LIMIT:-150}" compiled --width 2048 --layers 2 --batch 8 --steps 8 --compression 8 \
    --compile-mode reduce-overhead --tag basis_cudagraphs_d2048 ;;
esac
case ",$PARTS," in *,d2048,*)
  bb "${D2048_LIMIT:-330}" frontier --width 2048 --layers 4 --steps 60 --budget-s 120 --equal-time \
    --sets "$SETS_2048" --compile-cases "$COMPILE_2048" --set train.seed="$SEED" \
    --tag "d2048_seed${SEED}_cuda" ;;
esac
case ",$PARTS," in *,d768,*)
  bb "${D768_LIMIT:-400}" frontier --width 768 --steps 100 --budget-s 150 --equal-time \
    --sets "$SETS_768" --compile-cases "$COMPILE_768" --set train.seed="$SEED" \
    --tag "d768_seed${SEED}_cuda" ;;
esac
ls -la "$OUT"
