"""Where the SUS backward's time goes: each kernel variant alone, on the same inputs (CUDA events, median).

Sampler: both variants (prefix, words + words-to-keys) under two tilings (BM, BN, num_warps, num_stages), and
`probe=True`, which counts kept entries without output (matmul + exp + hash only). Sparse pass: two
(CHUNK, num_warps), and without the dK/dV atomics. Run on the GPU: python benchmarks/sus_probe.py n,D,c [n,D,c ...]
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
    ref = st.sample_kept_pairs(q, k, lse, c, causal, scale, seed, cap, sampler="prefix")
    slots = torch.arange(cap, device="cuda")[None, :] < ref[1].clamp(max=cap)[:, None]
    out = [f"n={n} D={d} c={c:g} kept/row={ref[1].float().mean().item():.1f}"]
    out.append(f"fwd {_time_ms(partial(st.flash_forward, q, k, v, causal, scale), 3, 10):.3f}")
    for sampler in ("prefix", "words"):
        for config in (None, (128, 64, 8, 3)):
            f = partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap, sampler=sampler, config=config)
            res = f()
            same = torch.equal(res[1], ref[1]) and torch.equal(res[0][slots], ref[0][slots])
            out.append(f"sample[{sampler}]{config or ''} {_time_ms(f, 3, 10):.3f}{'' if same else ' MISMATCH'}")
    f = partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap, probe=True)
    out.append(f"sample-count-only {_time_ms(f, 3, 10):.3f}")
    dq0 = st.sparse_backward(q, k, v, o, do, lse, *ref, c, causal, scale, seed)[0]
    for config in (None, (32, 4), (8, 1), (16, 1), (32, 2)):
        f = partial(st.sparse_backward, q, k, v, o, do, lse, *ref, c, causal, scale, seed, config=config)
        err = ((f()[0].float() - dq0.float()).norm() / dq0.float().norm()).item()
        out.append(f"sparse{config or ''} {_time_ms(f, 3, 10):.3f} (dq diff {err:.1e})")
    f = partial(st.sparse_backward, q, k, v, o, do, lse, *ref, c, causal, scale, seed, atomics=False)
    out.append(f"sparse-no-atomics {_time_ms(f, 3, 10):.3f}")
    print(" | ".join(out), flush=True)


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["16384,128,32"]:
        n, d, c = spec.split(",")
        probe(int(n), int(d), float(c))
