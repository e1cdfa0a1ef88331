"""Long-context training at an equal wall-clock budget: exact vs compiled exact vs tile-sampled SUS.

    python -m chainfree.bench.long_context --device cuda --budget 120 --out benchmarks/results

Every case trains the same model from the same seed on the same batches (one Trainer each, the one loop).
Phase 1 times a few interleaved steps of every case (after its compile) to get its steady step time. Phase
2 gives every case the same training-time budget: it gets budget / step-time steps and its own LR schedule
over them (warm-up and cosine decay scaled alike), as a user with a fixed time budget would set it, and
stops early if its clock passes the budget first (it ran slower than calibrated); cases
are interleaved (the case with the least training time so far steps next), so machine load hits all alike.
Val loss on the same fixed val batches is taken at evenly spaced points of each case's own training time;
evaluation time and the first (compiling) step are excluded from the time axis, and the first step's time
is reported beside. Writes NAME.json / NAME.md and a val-loss-vs-training-time PNG.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from chainfree.bench.cases import setup_training_case
from chainfree.bench.report import markdown_table, write_result
from chainfree.config import load_config
from chainfree.data import load_tokens
from chainfree.logging import pyplot, save_figure
from chainfree.training.trainer import evaluate

BASE = ["model.kind=gpt", "model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.seq_len=16384",
        "data.corpus=shakespeare", "data.bpe_vocab_size=4096", "train.batch_size=1", "train.lr=1e-3",
        "train.eval_batches=4"]  # fmt: skip
CASES = {
    "exact": ["method.name=exact"],
    "exact+compile": ["method.name=exact", "train.compile=true", "train.compile_scope=blocks"],
    "sus_tile": ["method.name=sus", "method.variant=tile", "method.c=8"],
    "sus_tile+compile": ["method.name=sus", "method.variant=tile", "method.c=8", "train.compile=true",
                         "train.compile_scope=blocks"],
}  # fmt: skip
WARMUP_SHARE = 0.05  # of each case's steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: Any, data: Any, device: torch.device) -> dict[str, Any]:
    method, trainer, state, sampler = setup_training_case(cfg, data, device)
    return {"cfg": cfg, "method": method, "trainer": trainer, "state": state, "sampler": sampler}


def _timed_step(run: dict[str, Any], step: int, device: torch.device) -> tuple[float, float]:
    batch = run["sampler"].batch("train", step)
    _sync(device)
    t0 = time.perf_counter()
    stats = run["trainer"].train_step(run["state"], batch)
    _sync(device)
    return time.perf_counter() - t0, float(stats.loss)


def _eval(run: dict[str, Any], device: torch.device) -> float:
    model = run["state"].model
    return evaluate(run["method"], model, run["sampler"], run["cfg"].train.eval_batches, device, run["cfg"].train,
                    loss=getattr(model, "_orig_mod", model).forward)  # fmt: skip


def calibrate(cases: dict[str, list[str]], base: list[str], device: torch.device, steps: int, data: Any
              ) -> dict[str, dict[str, float]]:
    """Median steady step time (s) of every case over `steps` interleaved steps after a compile step."""
    runs = {name: _build(load_config(None, [*base, *extra, f"train.steps={steps + 1}",
                                           f"train.device={device.type}"]), data, device)
            for name, extra in cases.items()}  # fmt: skip
    first = {name: _timed_step(r, 0, device)[0] for name, r in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1, steps + 1):
        for name, r in runs.items():
            times[name].append(_timed_step(r, step, device)[0])
    out = {name: {"step_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "first_step_s": first[name]}
           for name, ts in times.items()}  # fmt: skip
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def train_equal_time(cases: dict[str, list[str]], base: list[str], device: torch.device, budget_s: float,
                     calib: dict[str, dict[str, float]], evals: int, data: Any, log=print,
                     steps_for: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Phase 2 of the module docstring: every case trains for `budget_s` seconds of measured step time.
    `steps_for` fixes a case's step count (and schedule) instead of deriving it from the calibration, e.g.
    the count a case actually fitted into the budget in an earlier run whose step time drifted."""
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in cases.items():
        steps = (steps_for or {}).get(name) or max(2, int(budget_s / calib[name]["step_s"]))
        warm = max(1, round(WARMUP_SHARE * steps))
        cfg = load_config(None, [*base, *extra, f"train.steps={steps}", f"train.warmup_steps={warm}",
                                 f"train.device={device.type}"])  # fmt: skip
        run = _build(cfg, data, device)
        run.update(steps=steps, done=0, clock=0.0, losses=[], step_times=[], curve=[], next_eval=1)
        runs[name] = run
    tokens_per_step = {name: r["cfg"].train.batch_size * r["cfg"].model.seq_len for name, r in runs.items()}
    for r in runs.values():  # val loss before training: the same point for every case
        r["curve"].append({"train_s": 0.0, "step": 0, "tokens": 0, "val_loss": _eval(r, device)})
    while True:
        # a case stops at its step count or when its clock passes the budget (if it ran slower than calibrated)
        live = [n for n, r in runs.items() if r["done"] < r["steps"] and r["clock"] < budget_s]
        if not live:
            break
        name = min(live, key=lambda n: runs[n]["clock"])
        r = runs[name]
        dt, loss = _timed_step(r, r["done"], device)
        r["done"] += 1
        if r["done"] == 1:
            r["first_step_s"] = dt
            dt = calib[name]["step_s"]  # the compiling step counts as one steady step on the time axis
        r["clock"] += dt
        r["step_times"].append(dt)
        r["losses"].append(loss)
        last = r["done"] == r["steps"] or r["clock"] >= budget_s
        if r["done"] * evals >= r["next_eval"] * r["steps"] or last:
            val = _eval(r, device)
            r["curve"].append({"train_s": r["clock"], "step": r["done"], "tokens": r["done"] * tokens_per_step[name],
                               "val_loss": val})  # fmt: skip
            r["next_eval"] += 1
            log(f"  {name}: step {r['done']}/{r['steps']}, {r['clock']:.1f}s, val {val:.4f}")
    results = {}
    for name, r in runs.items():
        steady = r["step_times"][1:] or r["step_times"]
        results[name] = {"case": name, "overrides": cases[name], "steps": r["done"], "planned_steps": r["steps"],
                         "tokens": r["done"] * tokens_per_step[name], "train_s": r["clock"],
                         "step_ms": 1e3 * statistics.median(steady), "first_step_s": r["first_step_s"],
                         "val_loss": r["curve"][-1]["val_loss"], "curve": r["curve"],
                         "train_loss_last10": statistics.fmean(r["losses"][-10:]),
                         "method": r["method"].describe() if hasattr(r["method"], "describe") else None}
    return results


def _plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, r in results.items():
        pts = r["curve"]
        ax.plot([p["train_s"] for p in pts], [p["val_loss"] for p in pts], marker="o", label=name)
    ax.set_xlabel("training time (s, excluding evaluation and compile)")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def run(out: Path, name: str, device: str, budget_s: float, calib_steps: int, evals: int,
        cases: dict[str, list[str]], base: list[str], log=print, steps_for: dict[str, int] | None = None
        ) -> dict[str, Any]:
    from chainfree.bench.report import environment

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # the Trainer pins an indexed device
        dev = torch.device("cuda", torch.cuda.current_device())
    first = load_config(None, [*base, *next(iter(cases.values())), f"train.device={dev.type}"])
    data = load_tokens(first.data)
    log(f"[long-context] calibrating {len(cases)} cases over {calib_steps} steps each")
    calib = calibrate(cases, base, dev, calib_steps, data)
    for n, c in calib.items():
        log(f"  {n}: {1e3 * c['step_s']:.1f} ms/step (first step {c['first_step_s']:.1f} s)")
    log(f"[long-context] training every case for {budget_s:g} s of step time")
    results = train_equal_time(cases, base, dev, budget_s, calib, evals, data, log=log, steps_for=steps_for)
    train_tokens = len(data.train)
    base_name = next(iter(cases))
    rows = []
    for n, r in results.items():
        rows.append({"case": n, "steps": r["steps"], "planned_steps": r["planned_steps"], "tokens": r["tokens"],
                     "epochs": r["tokens"] / train_tokens,
                     "step_ms": r["step_ms"], "calib_step_ms": 1e3 * calib[n]["step_s"],
                     "speed_vs_base": results[base_name]["step_ms"] / r["step_ms"], "first_step_s": r["first_step_s"],
                     "val_loss": r["val_loss"], "delta_val": r["val_loss"] - results[base_name]["val_loss"]})
    cfg = {"base": base, "cases": cases, "budget_s": budget_s, "fixed_steps": steps_for or {},
           "calib_steps": calib_steps, "evals": evals,
           "train_tokens": train_tokens, "vocab": data.vocab_size,
           "baseline": "exact = SDPA default dispatch, bf16 autocast, fused AdamW; +compile = every block compiled",
           "command": " ".join(shlex.quote(a) for a in sys.argv),
           "source_commit": os.environ.get("CHAINFREE_GIT_COMMIT")}
    payload = {"config": cfg, "environment": environment(), "calibration": calib, "rows": rows, "results": results}
    columns = [("case", "case"), ("steps", "steps"), ("planned_steps", "planned"), ("tokens", "tokens"),
               ("epochs", "epochs"),
               ("step_ms", "step ms"), ("speed_vs_base", f"speed vs {base_name}"), ("first_step_s", "1st step s"),
               ("val_loss", "val loss"), ("delta_val", f"Δ val vs {base_name}")]  # fmt: skip
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    title = (f"# Long-context training at equal wall-clock ({dev_name})\n\n"
             f"{' '.join(base)}; every case {budget_s:g} s of training time (its own step count and LR schedule), "
             f"val loss on {first.train.eval_batches} fixed val windows; corpus train split {train_tokens:,} tokens."
             "\n\n")  # fmt: skip
    out = Path(out)
    write_result(out, name, payload, title + markdown_table(rows, columns))
    _plot(results, out / f"{name}.png", f"val loss at equal training time ({dev_name})")
    return payload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="long_context_sus")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per case")
    p.add_argument("--calib-steps", type=int, default=6)
    p.add_argument("--evals", type=int, default=6)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every case")
    p.add_argument("--case-set", action="append", default=[],
                   help="CASE:KEY=VALUE, an override for one case (e.g. sus_tile:method.c=16)")
    p.add_argument("--case-steps", action="append", default=[],
                   help="CASE=N: train CASE for N steps (its schedule) instead of the calibrated count")
    a = p.parse_args(argv)
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    cases = {n: list(CASES[n]) for n in names}
    for item in a.case_set:
        case, _, kv = item.partition(":")
        if case not in cases or "=" not in kv:
            raise SystemExit(f"error: --case-set {item!r}: expected CASE:KEY=VALUE with CASE in {', '.join(cases)}")
        cases[case].append(kv)
    steps_for = {}
    for item in a.case_steps:
        case, _, n = item.partition("=")
        if case not in cases or not n.isdigit():
            raise SystemExit(f"error: --case-steps {item!r}: expected CASE=N with CASE in {', '.join(cases)}")
        steps_for[case] = int(n)
    run(a.out, a.name, a.device, a.budget, a.calib_steps, a.evals, cases, [*BASE, *a.sets], steps_for=steps_for)


if __name__ == "__main__":
    main()
