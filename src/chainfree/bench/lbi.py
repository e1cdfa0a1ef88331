"""LBI speed: step wall time of dense backprop, the LBI model by plain autograd, the LBI scan backward
(per Jacobian mode, with a per-region cost breakdown) and region-parallel LBI over NCCL, all on the same
model and batch in one run. Writes JSON + markdown.

    python -m chainfree.bench.lbi --out DIR [--preset paper_transformer|tiny] [--world 2]

Timing: CUDA-synchronised wall time per step (forward + backward, no optimizer), median of `steps` after
`warmup` steps; bf16 autocast on CUDA (as the training loop does). Region-parallel steps end when the
slowest rank ends (max over ranks).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chainfree.config import ModelConfig
from chainfree.methods.exact import Exact
from chainfree.methods.lbi import LBI, LBIConfig, scan_backward
from chainfree.models.lbi import LBIModel
from chainfree.models.lm import LanguageModel
from chainfree.runtime import Stopwatch

PRESETS: dict[str, dict[str, Any]] = {
    # the LBI paper's Transformer configuration
    "paper_transformer": dict(
        model=dict(
            kind="gpt",
            vocab_size=32000,
            seq_len=1024,
            d_model=512,
            n_layers=12,
            n_heads=8,
            n_kv_heads=4,
            mlp_hidden=2048,
            tie_embeddings=True,
        ),
        batch_size=8,
    ),
    "tiny": dict(
        model=dict(kind="gpt", vocab_size=256, seq_len=64, d_model=64, n_layers=4, n_heads=4),
        batch_size=4,
    ),
}


class PhaseTimer:
    """Wall time per (phase, region) of the scan backward (`scan_backward(..., timer=PhaseTimer(device))`),
    each phase a `chainfree.runtime.Stopwatch` (device synchronised at both ends, so GPU work is counted in
    the phase that queued it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str, k: int) -> Iterator[None]:
        with Stopwatch(self.device) as sw:
            yield
        slot = self.times.setdefault(phase, [])
        slot.extend([0.0] * (k + 1 - len(slot)))
        slot[k] += sw.seconds


def cost_breakdown(
    model: LBIModel, ids: torch.Tensor, targets: torch.Tensor, jacobian: str = "vjp", repeats: int = 3
) -> dict[str, Any]:
    """Per-region wall time of each phase of the scan backward (median over `repeats` after one warm-up).

    Phases: stem_forward, forward[k], jacobian[k] (regions 1..K-2), scan, vjp[k], stem_vjp. Grads are zeroed
    afterwards. Timings synchronise the device around every phase, so they add up to more than an
    unsynchronised step.
    """
    device = ids.device
    runs = []
    for _ in range(repeats + 1):
        timer = PhaseTimer(device)
        scan_backward(model, ids, targets, jacobian, timer)
        runs.append(timer.times)
    model.zero_grad(set_to_none=True)
    runs = runs[1:]
    out: dict[str, Any] = {}
    for phase in runs[0]:
        per_region = list(zip(*(r[phase] for r in runs), strict=True))
        out[phase] = [sorted(v)[len(v) // 2] for v in per_region]
    out["total"] = sum(sum(v) for v in out.values())
    return out


def time_step(fn, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Median and min wall time (s) of `steps` calls of fn after `warmup`, each a synchronised Stopwatch."""
    times = []
    for i in range(warmup + steps):
        with Stopwatch(device) as sw:
            fn()
        if i >= warmup:
            times.append(sw.seconds)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": steps}


def _batch(model_cfg: dict, batch_size: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model_cfg["vocab_size"], (batch_size, model_cfg["seq_len"] + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def bench_single(
    model_cfg: dict,
    batch_size: int,
    lbi_variants: list[dict],
    device: torch.device,
    warmup: int,
    steps: int,
    out: dict[str, Any] | None = None,
    on_result=lambda: None,
) -> dict[str, Any]:
    """Dense vs LBI (autograd and scan) on one device; each variant {'name', 'lbi': LBIConfig kwargs}. Every
    timed step is a method's `step` (Exact for dense, LBI with backward 'autograd' / 'scan'): forward and
    backward into .grad, no optimizer."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    ids, targets = _batch(model_cfg, batch_size, device)
    out = {} if out is None else out
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(**model_cfg)).to(device)
    exact = Exact()

    def dense_step() -> None:
        lm.zero_grad(set_to_none=True)
        with autocast:
            exact.step(lm, ids, targets)

    out["dense"] = time_step(dense_step, device, warmup, steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        dense_step()
        out["dense"]["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    on_result()
    for var in lbi_variants:
        name = var["name"]
        try:
            torch.manual_seed(0)
            cfg = LBIConfig(**{**var["lbi"], "check_separator": False})
            model = LBI(cfg).prepare(LanguageModel(ModelConfig(**model_cfg)).to(device))
            by_autograd = LBI(dataclasses.replace(cfg, backward="autograd"))
            by_scan = LBI(dataclasses.replace(cfg, backward="scan"))

            def autograd_step(model=model, method=by_autograd) -> None:
                model.zero_grad(set_to_none=True)
                with autocast:
                    method.step(model, ids, targets)

            def scan_step(model=model, method=by_scan) -> None:
                model.zero_grad(set_to_none=True)
                with autocast:
                    method.step(model, ids, targets)

            rec: dict[str, Any] = {"lbi": dataclasses.asdict(cfg), "n_regions": model.n_regions}
            if var.get("autograd", True):
                rec["autograd"] = time_step(autograd_step, device, warmup, steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rec["scan"] = time_step(scan_step, device, warmup, steps)
            if device.type == "cuda":
                rec["scan"]["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            with autocast:
                rec["breakdown_s"] = cost_breakdown(model, ids, targets, cfg.jacobian, repeats=2)
            rec["scan_over_dense"] = rec["scan"]["median_s"] / out["dense"]["median_s"]
            if "autograd" in rec:
                rec["autograd_over_dense"] = rec["autograd"]["median_s"] / out["dense"]["median_s"]
            out[name] = rec
            del model
        except Exception as exc:  # record, keep measuring the others (e.g. out of memory)
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        on_result()
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """chainfree.bench.report.environment() (versions, git commit, SDPA dispatch) plus this run's device."""
    from chainfree.bench.report import environment as report_environment

    env = report_environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env["gpus"] = torch.cuda.device_count()
    env["git_commit"] = env.get("git_commit") or ""
    return env


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# LBI speed ({res['env']['device']}, torch {res['env']['torch']}, commit {res['env']['git_commit'][:9]})",
        "",
    ]
    single = res["single"]
    dense = single["dense"]["median_s"] if "dense" in single else float("nan")
    lines += [
        f"Model: {json.dumps(res['model'])}, batch {res['batch_size']}.",
        "",
        "| variant | K | interface | r | C | jacobian | autograd ms | scan ms | autograd/dense | scan/dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | - | - | - | - | {1e3 * dense:.1f} | - | 1.00 | - |",
    ]
    for name, rec in single.items():
        if name == "dense":
            continue
        if "error" in rec:
            lines.append(f"| {name} | error: {rec['error']} |")
            continue
        cfg = rec["lbi"]
        ag = f"{1e3 * rec['autograd']['median_s']:.1f}" if "autograd" in rec else "-"
        agr = f"{rec['autograd_over_dense']:.2f}" if "autograd" in rec else "-"
        lines.append(
            f"| {name} | {rec['n_regions']} | {cfg['interface']} | {cfg['rank']} | {cfg['n_chunks']} | "
            f"{cfg['jacobian']} | {ag} | {1e3 * rec['scan']['median_s']:.1f} | {agr} | {rec['scan_over_dense']:.2f} |"
        )
    lines += ["", "Per-region cost breakdown of the scan backward (ms, synchronised per phase):", ""]
    for name, rec in single.items():
        if name == "dense" or "breakdown_s" not in rec:
            continue
        parts = ", ".join(
            f"{ph} [{' '.join(f'{1e3 * t:.1f}' for t in v)}]" for ph, v in rec["breakdown_s"].items() if ph != "total"
        )
        lines.append(f"- {name}: {parts}")
    if "region_parallel" in res:
        rp = res["region_parallel"]
        lines += ["", "## Region-parallel (one region per rank: NCCL on GPUs, gloo on CPU)", ""]
        if "error" in rp:
            lines.append(f"error: {rp['error']}")
        else:
            ratio = (
                f" (single-device LBI scan, same K: {1e3 * rp['single_device_scan_s']:.1f} ms -> ratio "
                f"{rp['over_single_device']:.2f}; dense {1e3 * dense:.1f} ms -> {rp['over_dense']:.2f})"
                if "over_single_device" in rp
                else ""
            )
            lines += [
                f"world {rp['world']}, LBI {json.dumps(rp['lbi'])}: step {1e3 * rp['step_median_s']:.1f} ms{ratio}.",
                "",
                "| rank | bytes sent in backward | by category |",
                "|---|---|---|",
            ]
            for r, (tot, cats) in enumerate(zip(rp["backward_bytes"], rp["bytes_sent"], strict=True)):
                lines.append(f"| {r} | {tot:,} | {json.dumps(cats)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="paper_transformer", choices=sorted(PRESETS))
    ap.add_argument("--world", type=int, default=0, help="region-parallel ranks (0 = skip)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n-layers", type=int, default=0, help="override the preset's layer count (0 = keep)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n-chunks", type=int, default=4)
    ap.add_argument("--shared", default="allreduce", choices=("allreduce", "owner"),
                    help="region-parallel: all-reduce the embedding gradient, or the last rank owns it")
    ap.add_argument(
        "--only",
        default="all",
        choices=("all", "single", "parallel"),
        help="run one part (separate processes keep a hung collective from losing the other)",
    )
    args = ap.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    model_cfg, bs = dict(preset["model"]), preset["batch_size"]
    if args.n_layers:
        model_cfg["n_layers"] = args.n_layers
    n_layers = model_cfg["n_layers"]
    if args.world and n_layers % args.world:
        raise SystemExit(
            f"--world {args.world} needs one region per rank, but n_layers={n_layers} is not a multiple of it; "
            f"pass --n-layers (e.g. {args.world * max(1, round(n_layers / args.world))})"
        )
    r, c = args.rank, args.n_chunks
    k_par = args.world or 2
    variants = [
        {
            "name": f"K{k_par}_causal_vjp",
            "lbi": dict(region_size=n_layers // k_par, rank=r, n_chunks=c, jacobian="vjp"),
        },
    ]
    rs = 2 if n_layers // 2 > 2 else 1
    k = n_layers // rs
    variants += [
        {"name": f"K{k}_causal_vjp", "lbi": dict(region_size=rs, rank=r, n_chunks=c, jacobian="vjp")},
        {"name": f"K{k}_token_vjp", "lbi": dict(region_size=rs, rank=r, interface="token", jacobian="vjp")},
        {"name": f"K{k}_paper_leaky_vjp", "lbi": dict(region_size=rs, rank=r, interface="paper_leaky", jacobian="vjp")},
        {
            "name": f"K{k}_causal_replicate",
            "lbi": dict(region_size=rs, rank=r, n_chunks=c, jacobian="replicate"),
            "autograd": False,
        },
        {
            "name": f"K{k}_causal_jvp",
            "lbi": dict(region_size=rs, rank=r, n_chunks=c, jacobian="jvp", jacobian_chunk=16),
            "autograd": False,
        },
    ]
    res: dict[str, Any] = {
        "env": environment(device),
        "command": "python -m chainfree.bench.lbi " + " ".join(sys.argv[1:]),
        "model": model_cfg,
        "batch_size": bs,
        "warmup": args.warmup,
        "steps": args.steps,
        "single": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"lbi_speed_{args.preset}"

    def save() -> None:  # after every measurement, so a run stopped at its time limit keeps what it had
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        if "dense" in res["single"] or args.only == "parallel":
            (out / f"{stem}.md").write_text(to_markdown(res))

    stem += "" if args.only == "all" else f"_{args.only}"
    if args.world and args.only != "single":  # first: it is the measurement the 2-GPU machine is for
        from chainfree.bench.lbi_parallel import RegionRunSpec, spawn_local

        lbi = variants[0]["lbi"]
        spec = RegionRunSpec(
            model=model_cfg,
            lbi=lbi,
            batch_size=bs,
            steps=args.steps,
            warmup=args.warmup,
            backend="nccl" if device.type == "cuda" else "gloo",
            dtype="bf16" if device.type == "cuda" else "float32",
            save_grads=False,
            shared=args.shared,
        )
        try:
            recs = spawn_local(spec, args.world)
            res["region_parallel"] = {
                "world": args.world,
                "shared": args.shared,
                "lbi": lbi,
                "step_median_s": statistics.median(recs[0]["step_wall_s"]),
                "step_wall_s": recs[0]["step_wall_s"],
                "bytes_sent": [rec["bytes_sent"] for rec in recs],
                "backward_bytes": [rec["backward_bytes"] for rec in recs],
                "phase_times": [rec["phase_times"][-1] for rec in recs],
            }
        except Exception as exc:
            res["region_parallel"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        save()
    if args.only != "parallel":
        bench_single(model_cfg, bs, variants, device, args.warmup, args.steps, res["single"], save)
    rp = res.get("region_parallel", {})
    if "step_median_s" in rp and "scan" in res["single"].get(variants[0]["name"], {}):
        single = res["single"][variants[0]["name"]]["scan"]["median_s"]
        rp["single_device_scan_s"] = single
        rp["over_single_device"] = rp["step_median_s"] / single
        rp["over_dense"] = rp["step_median_s"] / res["single"]["dense"]["median_s"]
    save()
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
