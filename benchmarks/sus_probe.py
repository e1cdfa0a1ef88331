"""Where the SUS backward's time goes: each kernel variant alone, on the same inputs (CUDA events, median).

Sampler modes: 0 = prefix-sum compaction, 3 = one-kept-entry-per-row-per-step extraction (row reductions
only), 1 = hash + keep test + count, no compaction (probe), 2 = like 1 without the hash (probe).
Sparse pass: with and without the dK/dV atomics (probe). Run on the GPU: python benchmarks/sus_probe.py
"""

from __future__ import annotations

import math
import sys
from functools import partial

import torch

from chainfree.bench.attention import _time_ms
from chainfree.ops import sus_triton as st


def probe(n: int, d: int, c: float, model_dim: int = 2048, causal: bool = True) -> None:
    H = model_dim // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale, seed = 1 / math.sqrt(d), 99
    o, lse = st.flash_forward(q, k, v, causal, scale)
    cap = st.row_capacity(c, n)
    ref = st.sample_kept_pairs(q, k, lse, c, causal, scale, seed, cap, mode=0)
    slots = torch.arange(cap, device="cuda")[None, :] < ref[2].clamp(max=cap)[:, None]
    out = [f"n={n} D={d} c={c:g}"]
    configs = [None, (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
    for mode, config in [(0, None), (3, None), (1, None), (2, None), *((3, cfg) for cfg in configs[1:])]:
        f = partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap, mode=mode, config=config)
        res = f()
        if mode == 3:
            same = torch.equal(res[2], ref[2]) and torch.equal(res[0][slots], ref[0][slots])
            out.append(f"mode3{config}==mode0:{same}")
        out.append(f"sample[{mode},{config}] {_time_ms(f, 3, 10):.3f}")
    for atomics in (True, False):
        f = partial(st.sparse_backward, q, k, v, o, do, lse, *ref, c, causal, scale, seed, atomics=atomics)
        out.append(f"sparse[atomics={atomics}] {_time_ms(f, 3, 10):.3f}")
    out.append(f"fwd {_time_ms(partial(st.flash_forward, q, k, v, causal, scale), 3, 10):.3f}")
    print(" | ".join(out), flush=True)


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["16384,128,32"]:
        n, d, c = spec.split(",")
        probe(int(n), int(d), float(c))
