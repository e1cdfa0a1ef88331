#!/usr/bin/env bash
# The LBI scan backward's Jacobian passes bound their memory by themselves (issue 29): peak resident memory of
# one scan-backward step of a Mamba-2 LBI model on CPU, in a fresh process each, with every Jacobian direction
# in one pass (method.jacobian_chunk = n, what used to run out of memory at the 50M preset on a 140 GB H200)
# against the default budget-sized passes under a small method.jacobian_memory, plus the gradient agreement.
#   bash benchmarks/lbi_jacobian_memory.sh            (CPU, about a minute)
set -u
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
run() {  # $1 = method.jacobian_chunk, $2 = method.jacobian_memory (GiB)
  python3 - "$1" "$2" <<'PY'
import resource, sys, time, torch
from chainfree.config import ModelConfig
from chainfree.methods.lbi import LBI, LBIConfig, scan_backward
from chainfree.models.lbi import RegionMemoryProbe
from chainfree.models.lm import LanguageModel
chunk, mem = int(sys.argv[1]), float(sys.argv[2])
torch.manual_seed(0)
cfg = ModelConfig(kind="mamba2", vocab_size=256, seq_len=512, d_model=128, n_layers=6, d_state=32,
                  ssm_head_dim=32, chunk_size=64)
model = LBI(LBIConfig(region_size=2, rank=16, n_chunks=4, jacobian_chunk=chunk, jacobian_memory=mem,
                      check_separator=False)).prepare(LanguageModel(cfg))
ids = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(1))
probe = RegionMemoryProbe(torch.device("cpu"))
with torch.no_grad():
    canvas = model.canvas(ids)
m = torch.zeros(2, 4, 16, requires_grad=True)
with probe:
    model.region(1, m, canvas.requires_grad_(True))
del m, canvas
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
scan_backward(model, ids, ids)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
torch.save(g, f"/tmp/lbi_jacmem_grad_{chunk}.pt")
print(f"jacobian_chunk={chunk} jacobian_memory={mem} GiB: one direction = {probe.bytes / 2**20:.1f} MiB (measured), "
      f"peak RSS growth in the step {(peak - base) / 2**10:.0f} MiB, step {dt:.1f} s")
PY
}
run 64 0        # n = C r = 64 directions in one pass (no bound)
run 0 0.1       # default: passes sized to a 0.1 GiB budget
python3 -c "
import torch
a, b = torch.load('/tmp/lbi_jacmem_grad_64.pt'), torch.load('/tmp/lbi_jacmem_grad_0.pt')
print(f'gradients, one pass vs budgeted passes: max relative difference {float((a - b).norm() / a.norm()):.2e}')"
