"""Where SUS attention's time goes, against the default SDPA on the same tensors (CUDA events, median).

For each (n, D, c): SDPA default dispatch forward and backward; the v2 kernel's forward with and without
the sampling, its backward's two passes alone (row-major dQ + pair filing, key-major dK/dV); v1's sampler and
sparse pass for comparison; kept and candidate counts. Methods are interleaved round by round.
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
from chainfree.ops.sus_reference import capacities


def probe(n: int, d: int, c: float, model_dim: int = 2048, causal: bool = True, rounds: int = 10) -> dict:
    H = model_dim // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale, seed = 1 / math.sqrt(d), 99
    caps = capacities(c, n)
    o, lse, kept, cnt, keycnt = st.v2_forward(q, k, v, c, causal, scale, seed, caps)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out_sdpa = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    fns = {
        "sdpa_fwd": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
        "sdpa_bwd": lambda: torch.autograd.grad(out_sdpa, (qg, kg, vg), do, retain_graph=True),
        "v2_fwd_sample": partial(st.v2_forward, q, k, v, c, causal, scale, seed, caps),
        "v2_fwd_plain": partial(st.v2_forward, q, k, v, c, causal, scale, seed, caps, False),
        "v2_bwd": partial(st.v2_backward, q, k, v, o, do, lse, kept, cnt, keycnt, c, causal, scale, seed),
        "v2_bwd_rows_only": partial(
            st.v2_backward, q, k, v, o, do, lse, kept, cnt, keycnt, c, causal, scale, seed, key_pass=False
        ),
    }
    if n <= st.MAX_KEYS_WORDS:
        cap1 = st.row_capacity(c, n)
        _, lse1 = st.flash_forward(q, k, v, causal, scale)
        pairs = st.sample_kept_pairs(q, k, lse1, c, causal, scale, seed, cap1)
        fns["v1_sample"] = partial(st.sample_kept_pairs, q, k, lse1, c, causal, scale, seed, cap1)
        fns["v1_sparse"] = partial(st.sparse_backward, q, k, v, o, do, lse1, *pairs, c, causal, scale, seed)
    for fn in fns.values():
        for _ in range(2):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_event_ms(fn))
    res = {"n": n, "D": d, "c": c, "H": H, "cand_cap": caps[0], "cap": caps[1]}
    res.update({name: statistics.median(ts) for name, ts in times.items()})
    res["kept_per_row"] = cnt.clamp(min=0).float().mean().item()
    res["max_kept"] = int(cnt.max().item())
    res["fallback_rows"] = int((cnt < 0).sum().item())
    res["bwd_speedup"] = res["sdpa_bwd"] / res["v2_bwd"]
    res["fwd_bwd_speedup"] = (res["sdpa_fwd"] + res["sdpa_bwd"]) / (res["v2_fwd_sample"] + res["v2_bwd"])
    print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    return res


def forward_configs(n: int, d: int, c: float, configs: list[tuple[int, int, int, int]], rounds: int = 5) -> dict:
    """The sampling forward under each (BM, BN, num_warps, num_stages): median ms (or the compile error)."""
    H = 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = st.v2_forward(q, k, v, c, True, 1 / math.sqrt(d), 5, None)
    res: dict = {}
    for cfg in configs:
        f = partial(st.v2_forward, q, k, v, c, True, 1 / math.sqrt(d), 5, None, True, cfg)
        try:
            out = f()
            same = torch.equal(out[3], ref[3]) and torch.equal(out[2][out[3] > 0, 0], ref[2][ref[3] > 0, 0])
            f()
            torch.cuda.synchronize()
            res[str(cfg)] = (statistics.median(_event_ms(f) for _ in range(rounds)), same)
        except Exception as e:  # noqa: BLE001 - a config the compiler refuses is a result too
            res[str(cfg)] = (float("nan"), type(e).__name__)
    print(
        f"fwd configs n={n} D={d} c={c:g}: " + " | ".join(f"{k} {t:.3f} {s}" for k, (t, s) in res.items()), flush=True
    )
    return res


def modes(n: int, d: int, c: float, rounds: int = 5) -> None:
    """The sampling forward's timing probes: full, without the store, without the prefix sum, tensor-core
    prefix sum, the experimental row-by-row candidate store (same samples as full), and the plain forward,
    each at the D's default config."""
    H = 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = []
    for label, sample, mode in (("plain", False, 0), ("full", True, 0), ("no-store", True, 1),
                                ("no-cumsum", True, 2), ("tc-prefix", True, 3), ("row-extract", True, 4)):  # fmt: skip
        f = partial(st.v2_forward, q, k, v, c, True, 1 / math.sqrt(d), 5, None, sample, None, mode)
        f()
        torch.cuda.synchronize()
        out.append(f"{label} {statistics.median(_event_ms(f) for _ in range(rounds)):.3f}")
    print(f"fwd modes n={n} D={d} c={c:g}: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    for spec in sys.argv[1:] or ["16384,128,32"]:
        if spec.startswith("modes:"):
            n, d, c = spec[6:].split(",")
            modes(int(n), int(d), float(c))
            continue
        if spec.startswith("cfg:"):
            n, d, c = spec[4:].split(",")
            grid = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3)]
            forward_configs(int(n), int(d), float(c), grid)
            continue
        n, d, c = spec.split(",")
        probe(int(n), int(d), float(c))
