"""Dense training-step speed of the ~50M presets on one GPU, eager and compiled, with a kernel profile.

For each preset: random tokens (vocab 8192, batch x 1024), bf16 autocast, fused AdamW, exact backprop. Modes:
`eager`; `compile` (torch.compile of the whole model); `compile_blocks` (each block compiled on its own, as
LBI's region runs need). Steps of the modes are interleaved round by round so machine load hits all of them;
the median and the spread over rounds are reported. One eager step is profiled with torch.profiler (the
kernels that take the most CUDA time). To time another copy of the package (e.g. an older commit) in the same
session, put its `chainfree/` under DIR and run with `PYTHONPATH=DIR SSM_SPEED_CODE=<label>` (the label names
that code in the result).

    python benchmarks/ssm_speed.py --out $OUT --presets mamba2-50m,mamba3-50m,hybrid-50m,gpt-50m
    python benchmarks/ssm_speed.py --report A.json B.json ... --md OUT.md     # one table from several runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def report(paths: list[Path], md: Path) -> None:
    """One markdown table (preset x code x mode) from result files of this script."""
    lines = ["| preset | code | mode | step ms (median; min-max over rounds) | tokens/s | first 2 steps s "
             "(incl. compile) | eager peak GiB |", "|---|---|---|---|---|---|---|"]
    heads = []
    for path in paths:
        d = json.loads(path.read_text())
        heads.append(f"- `{path.name}`: {d['device']}, torch {d['torch']}, code {d.get('code') or d['commit']}, "
                     f"`{d['command']}`")
        for r in d["rows"]:
            for mode in ("eager", "compile", "compile_blocks"):
                if f"{mode}_ms" in r:
                    lo, hi = r[f"{mode}_spread_ms"]
                    lines.append(f"| {r['preset']} | {r['tag']} | {mode} | {r[f'{mode}_ms']:.1f} ({lo:.1f}-{hi:.1f}) "
                                 f"| {r[f'{mode}_tok_s']:,.0f} | {r[f'{mode}_first2_s']:.1f} "
                                 f"| {r.get('peak_gib_first_mode', float('nan')):.1f} |")
    md.write_text("\n".join(["# Dense training step of the ~50M SSM presets", "", *heads, "",
                              "Batch 32 x 1024 random tokens, vocab 8192, bf16 autocast, fused AdamW, exact "
                              "backprop; modes interleaved round by round within one process.", "", *lines, ""]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", type=Path, nargs="+")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--presets", default="mamba2-50m,mamba3-50m,hybrid-50m,gpt-50m")
    ap.add_argument("--modes", default="eager,compile,compile_blocks")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    ap.add_argument("--set", action="append", default=[], help="config override for every preset")
    ap.add_argument("--tag", default="current")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script at toy sizes")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.md or args.report[0].with_suffix(".md"))
        return
    if args.out is None:
        ap.error("--out is required")

    import torch

    from chainfree.config import load_config
    from chainfree.models import build_model

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        cfg = load_config(preset, list(args.set))
        cfg.model.vocab_size = 8192
        T = cfg.model.seq_len
        gen = torch.Generator(device=dev).manual_seed(0)
        ids = torch.randint(0, 8192, (args.batch, T + 1), device=dev, generator=gen)
        x, y = ids[:, :-1], ids[:, 1:]
        runners = {}
        t_compile = {}
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            model = build_model(cfg.model).to(dev)
            if mode == "compile":
                model.compile(dynamic=False)
            elif mode == "compile_blocks":
                for blk in model.blocks:
                    blk.compile(dynamic=False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step(model=model, opt=opt, x=x, y=y) -> None:
                with torch.autocast(dev.type, torch.bfloat16):
                    loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            sync()
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            sync()
            t_compile[mode] = time.perf_counter() - t0
            runners[mode] = step
        times: dict[str, list[float]] = {m: [] for m in runners}
        for _ in range(args.rounds):
            for mode, step in runners.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                times[mode].append((time.perf_counter() - t0) / args.steps * 1e3)
        row = {"preset": preset, "tag": args.tag, "batch": args.batch, "T": T, "overrides": args.set,
               "params": sum(p.numel() for p in build_model(cfg.model).parameters())}
        for mode, ts in times.items():
            med = statistics.median(ts)
            row[f"{mode}_ms"] = med
            row[f"{mode}_spread_ms"] = [min(ts), max(ts)]
            row[f"{mode}_tok_s"] = args.batch * T / med * 1e3
            row[f"{mode}_first2_s"] = t_compile[mode]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            runners[next(iter(runners))]()
            row["peak_gib_first_mode"] = torch.cuda.max_memory_allocated() / 2**30
        if args.profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runners[next(iter(runners))]()
                sync()
            evs = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in evs if e.device_time_total > 0 and not e.key.startswith("aten"))
            row["profile_total_cuda_ms"] = total / 1e3
            row["profile_top"] = [[e.key[:90], round(e.device_time_total / 1e3, 2), e.count] for e in evs[:25]]
        print(json.dumps({k: v for k, v in row.items() if k != "profile_top"}), flush=True)
        for k in row.get("profile_top", [])[:12]:
            print("   ", k, flush=True)
        rows.append(row)
        del runners
        name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
        payload = {"device": name, "code": os.environ.get("SSM_SPEED_CODE"),
                   "torch": torch.__version__, "python": sys.version.split()[0],
                   "commit": os.environ.get("CHAINFREE_GIT_COMMIT"), "command": " ".join(sys.argv), "rows": rows}
        (args.out / f"ssm_speed_{args.tag}.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
