"""GPU check of the sequence-model zoo (issue 4): SSD scan eager vs torch.compile vs the sequential reference,
then each ~50M preset (gpt-50m, mamba2-50m, mamba3-50m, hybrid-50m) trained for the same token budget at
T=1024 with exact backprop (bf16 autocast), then recurrent decoding speed of each trained model.

    source scripts/device_setup.sh; python benchmarks/zoo_gpu.py --out $OUT [--steps 64 --batch 16]

Writes OUT/zoo_ssd.json, OUT/zoo_train.json (one record per model, appended as each finishes, so a run cut
short keeps what it measured) and OUT/zoo_generate.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from chainfree.config import load_config
from chainfree.generate import generate, load_trained
from chainfree.ops.ssd import ssd_scan, ssd_sequential
from chainfree.train import train


def env() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "commit": commit or "unknown"}


def time_fn(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def ssd_bench(out: Path) -> None:
    """One layer's scan at the 50M presets' shapes (batch 16, T 1024, 24 heads x 64), under bf16 autocast:
    forward and forward+backward time, eager vs torch.compile; max error of both against the float64
    sequential recurrence. Everything runs with grad enabled so the compiled graph is built once per shape."""
    rows = []
    for name, g, n, chunk in (("mamba2-50m", 1, 64, 128), ("mamba3-50m", 24, 128, 64)):
        b, l, h, p = 16, 1024, 24, 64
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(b, l, h, p, device="cuda", generator=gen) * 0.1
        B = torch.randn(b, l, g, n, device="cuda", generator=gen) / n**0.5
        C = torch.randn(b, l, g, n, device="cuda", generator=gen)
        a = -0.1 * torch.rand(b, l, h, device="cuda", generator=gen)
        ins = [t.requires_grad_(True) for t in (x, a, B, C)]
        with torch.no_grad():
            y_ref, _ = ssd_sequential(*(t.detach().double() for t in ins))
        row = {"shape": name, "b": b, "T": l, "heads": h, "headdim": p, "groups": g, "d_state": n, "chunk": chunk,
               "ref_max_abs": y_ref.abs().max().item()}
        for backend in ("torch", "compile"):
            def fwd(backend=backend, ins=ins, chunk=chunk):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return ssd_scan(*ins, chunk, backend=backend)[0]

            def fwd_bwd(fwd=fwd):
                fwd().float().sum().backward()

            t0 = time.perf_counter()
            fwd_bwd()
            torch.cuda.synchronize()
            row[f"{backend}_first_call_s"] = time.perf_counter() - t0
            row[f"{backend}_fwd_ms"] = time_fn(fwd)
            row[f"{backend}_fwd_bwd_ms"] = time_fn(fwd_bwd)
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            row[f"{backend}_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row[f"{backend}_bf16_max_abs_err_vs_fp64_sequential"] = (fwd().detach().double() - y_ref).abs().max().item()
        y32, _ = ssd_scan(*(t.detach() for t in ins), chunk, backend="torch")
        row["torch_fp32_max_abs_err_vs_fp64_sequential"] = (y32.double() - y_ref).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "zoo_ssd.json").write_text(json.dumps({"env": env(), "rows": rows}, indent=1))


def train_bench(out: Path, presets: list[str], steps: int, batch: int, backend: str, device: str) -> None:
    records = []
    for preset in presets:
        sets = [f"train.steps={steps}", f"train.batch_size={batch}", f"train.eval_every={steps // 2}",
                "train.eval_batches=16", f"train.ckpt_every={steps}", f"train.warmup_steps={max(steps // 10, 1)}",
                f"train.device='{device}'"]
        if not preset.startswith("gpt"):
            sets.append(f"model.ssd_backend='{backend}'")
        cfg = load_config(preset, sets)
        t0 = time.perf_counter()
        summary = train(cfg, out / preset, progress=False)
        summary.update(preset=preset, wall_s=time.perf_counter() - t0, lr=cfg.train.lr, steps=steps, batch=batch,
                       tokens=steps * batch * cfg.model.seq_len, seq_len=cfg.model.seq_len,
                       ssd_backend=cfg.model.ssd_backend,
                       val_curve=[json.loads(line).get("val_loss") for line in
                                  (out / preset / "metrics.jsonl").read_text().splitlines()
                                  if "val_loss" in line])
        records.append(summary)
        print(json.dumps(summary, default=str), flush=True)
        (out / "zoo_train.json").write_text(json.dumps({"env": env(), "records": records}, indent=1, default=str))


def generate_bench(out: Path, presets: list[str], device: str, new_tokens: int = 128) -> None:
    rows = []
    for preset in presets:
        if not (out / preset / "checkpoint").exists():
            continue
        model, tok = load_trained(out / preset, device)
        prompt = torch.tensor(tok.encode("ROMEO:\n"), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        generate(model, prompt, 4, 0.8, 50, gen)  # warm-up
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        ids = generate(model, prompt, new_tokens, 0.8, 50, gen)
        sync()
        dt = time.perf_counter() - t0
        rows.append({"preset": preset, "new_tokens": new_tokens, "seconds": dt, "tokens_per_s": new_tokens / dt,
                     "sample": tok.decode(ids.tolist())})
        print(json.dumps(rows[-1]), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    (out / "zoo_generate.json").write_text(json.dumps({"env": env(), "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--presets", default="gpt-50m,mamba2-50m,mamba3-50m,hybrid-50m")
    ap.add_argument("--skip-ssd", action="store_true")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    presets = args.presets.split(",")
    if not args.skip_ssd:
        ssd_bench(args.out)
    train_bench(args.out, presets, args.steps, args.batch, args.backend, args.device)
    generate_bench(args.out, presets, args.device)


if __name__ == "__main__":
    main()
