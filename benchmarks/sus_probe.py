"""Where the per-pair SUS kernel's (v1) time goes, against default SDPA on the same tensors (CUDA events, median).

For each (n, D, c): SDPA default dispatch forward and backward; v1's flash forward, its sampler (each of
`sus_triton.SAMPLERS`) and its sparse pass alone; kept counts. Methods are interleaved round by round.
Run on the GPU: python benchmarks/sus_probe.py n,D,c [n,D,c ...]   (prints one line per case)
"""

from __future__ import annotations

import math
import statistics
import sys
from functools import partial

import torch
import torch.nn.functional as F

from chainfree.bench.attention import _event_ms
from chainfree.ops import sus_triton as st


def probe(n: int, d: int, c: float, model_dim: int = 2048, causal: bool = True, rounds: int = 10) -> dict:
    H = model_dim // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale, seed = 1 / math.sqrt(d), 99
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out_sdpa = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    cap = st.row_capacity(c, n)
    o, lse = st.flash_forward(q, k, v, causal, scale)
    idx, cnt = st.sample_kept_pairs(q, k, lse, c, causal, scale, seed, cap, sampler="prefix")
    fns = {
        "sdpa_fwd": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
        "sdpa_bwd": lambda: torch.autograd.grad(out_sdpa, (qg, kg, vg), do, retain_graph=True),
        "v1_fwd": partial(st.flash_forward, q, k, v, causal, scale),
        "v1_sample_prefix": partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap, sampler="prefix"),
        "v1_sparse": partial(st.sparse_backward, q, k, v, o, do, lse, idx, cnt, c, causal, scale, seed),
    }
    if n <= st.MAX_KEYS_WORDS:
        fns["v1_sample_words"] = partial(st.sample_kept_pairs, q, k, lse, c, causal, scale, seed, cap, sampler="words")
    for fn in fns.values():
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_event_ms(fn))
    res = {"n": n, "D": d, "c": c, "H": H, "cap": cap}
    res.update({name: statistics.median(ts) for name, ts in times.items()})
    res["kept_per_row"] = cnt.float().mean().item()
    res["max_kept"] = int(cnt.max().item())
    res["overflow_rows"] = int((cnt > cap).sum().item())
    v1_bwd = res.get(f"v1_sample_{st.SAMPLER}", res["v1_sample_prefix"]) + res["v1_sparse"]
    res["bwd_speedup"] = res["sdpa_bwd"] / v1_bwd
    res["fwd_bwd_speedup"] = (res["sdpa_fwd"] + res["sdpa_bwd"]) / (res["v1_fwd"] + v1_bwd)
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    return res


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["16384,128,32"]:
        n, d, c = spec.split(",")
        probe(int(n), int(d), float(c))
