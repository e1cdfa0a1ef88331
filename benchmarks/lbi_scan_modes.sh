#!/usr/bin/env bash
# LBI scan backward per Jacobian mode against dense and LBI-by-autograd, on CPU at small scale (issue 29):
# forward + backward (no optimizer), the entries interleaved, best of 3 rounds after one warm-up each.
#   bash benchmarks/lbi_scan_modes.sh [gpt mamba2 ...]
set -u
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
[ $# -eq 0 ] && set -- gpt mamba2
for kind in "$@"; do
python3 - "$kind" <<'PY'
import json, sys, time, torch
from chainfree.config import ModelConfig
from chainfree.methods.lbi import LBI, LBIConfig, scan_backward
from chainfree.models.lm import LanguageModel
torch.manual_seed(0)
kind = sys.argv[1]
cfg = ModelConfig(kind=kind, vocab_size=512, seq_len=256, d_model=128, n_layers=8, n_heads=4, d_state=32,
                  ssm_head_dim=32, chunk_size=64, attn_every=4)
lm = LanguageModel(cfg)
ids, tgt = torch.randint(0, 512, (4, 256)), torch.randint(0, 512, (4, 256))
models = {m: LBI(LBIConfig(region_size=2, rank=16, n_chunks=4, jacobian=m)).prepare(lm)
          for m in ("vjp", "prefix", "replicate")}
def dense():
    lm.zero_grad(); lm(ids, tgt).backward()
def autograd():
    models["vjp"].zero_grad(); models["vjp"](ids, tgt).backward()
fns = {"dense": dense, "lbi_autograd": autograd}
for m, mod in models.items():
    fns[f"scan_{m}"] = lambda mod=mod, m=m: (mod.zero_grad(), scan_backward(mod, ids, tgt, m))
for f in fns.values():
    f()
times = {k: [] for k in fns}
for _ in range(3):
    for k, f in fns.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
best = {k: min(v) for k, v in times.items()}
print(kind, f"(d=128, 8 layers, K=4, r=16, C=4, batch 4x256, torch {torch.__version__}, {torch.get_num_threads()} threads)",
      json.dumps({k: round(v, 3) for k, v in best.items()}), "x dense:",
      json.dumps({k: round(v / best["dense"], 1) for k, v in best.items()}))
PY
done
