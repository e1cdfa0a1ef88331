"""HBLL speed: the step time and critical path of HBLL against exact backprop on the same models, one
device (`speed_sweep`, the speed part of `chainfree reproduce hbll`) and tree-parallel over W ranks
(`tree_parallel_main`, run under torchrun: `torchrun --nproc_per_node 2 -m chainfree.bench.hbll --out DIR`).

Timing: wall time synchronised before and after every step; methods alternate in rounds so that drifts of
the host hit all of them alike; medians, minima and per-round ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from chainfree.bench.critical_path import count_exact_critical_path
from chainfree.bench.report import environment, markdown_table
from chainfree.methods.base import Method
from chainfree.methods.exact import Exact
from chainfree.methods.hbll import HBLL, HBLLConfig
from chainfree.runtime import Stopwatch

# model sizes and timing of the speed sweep per scale (also the speed knobs of `chainfree reproduce hbll`)
SPEED_SCALES: dict[str, dict[str, Any]] = {
    "small": {"speed_layers": "4,8,16", "speed_d": 64, "speed_batch": 8, "speed_seq": 32, "speed_steps": 3,
              "speed_reps": 2},
    "full": {"speed_layers": "8,16,32,64", "speed_d": 256, "speed_batch": 16, "speed_seq": 128, "speed_steps": 5,
             "speed_reps": 5},
}


# ------------------------------------------------------------------------------------------------ speed
def speed_model(arch: str, n: int, knobs: dict[str, Any], device: torch.device):
    """(model, inputs, targets) of the speed sweep (seeded): GPT blocks (vocab 4096, batch speed_batch x
    speed_seq tokens) or residual-MLP blocks (784 -> 10 classes, batch 16 * speed_batch), width speed_d."""
    from chainfree.config import ModelConfig
    from chainfree.models.lm import LanguageModel
    from chainfree.models.vision import VisionNet

    d, B, T = knobs["speed_d"], knobs["speed_batch"], knobs["speed_seq"]
    torch.manual_seed(0)
    if arch == "gpt":
        cfg = ModelConfig(vocab_size=4096, seq_len=T, d_model=d, n_layers=n, n_heads=max(d // 64, 1))
        base = LanguageModel(cfg).to(device)
        x = torch.randint(0, 4096, (B, T), device=device)
        y = torch.randint(0, 4096, (B, T), device=device)
    else:
        base = VisionNet(784, 10, d=d, n_layers=n).to(device)
        x, y = torch.randn(B * 16, 784, device=device), torch.randint(0, 10, (B * 16,), device=device)
    return base, x, y


def speed_trainer(method: Method, model: torch.nn.Module, device: torch.device, strategy: str = "single",
                  launch: Any = None) -> tuple[Any, Any]:
    """(Trainer, TrainState) for timing whole training steps of `model`: the Trainer's step (method.step,
    global-norm clip 1.0, AdamW lr 1e-4, fused on CUDA; bf16 autocast on CUDA) under `strategy`."""
    from chainfree.config import TrainConfig
    from chainfree.methods.base import Launch
    from chainfree.training import Trainer

    tc = TrainConfig(steps=1 << 30, lr=1e-4, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, device=str(device))
    trainer = Trainer(tc, method, device=device, strategy=strategy,
                      launch=launch if launch is not None or strategy != "single" else Launch())
    return trainer, trainer.setup(model)


def time_steps(method: Method, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
               device: torch.device, trainer: tuple[Any, Any] | None = None,
               warmup: int = 2) -> tuple[list[float], dict[str, float]]:
    """Wall ms of `steps` steps after `warmup` untimed ones, synchronised before and after each: the method's
    step (forward + backward) alone, or with `trainer` (from `speed_trainer`) the Trainer's whole training
    step. Returns (the step times, the last step's extra stats)."""
    times, extra = [], {}
    for i in range(steps + warmup):
        with Stopwatch(device) as sw:
            if trainer is not None:
                stats = trainer[0].train_step(trainer[1], (x, y))
            else:
                with autocast_for(device):
                    stats = method.step(model, x, y)
        if i >= warmup:
            times.append(1000 * sw.seconds)
        model.zero_grad(set_to_none=True)
        extra = stats.extra
    return times, extra


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def speed_sweep(knobs: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Wall time of one `method.step` (forward + backward, no optimizer: `step_ms`) and of a whole training
    step (+ clip + AdamW, fused on CUDA: `train_step_ms`), and the counted critical path, exact vs HBLL.

    Both models of a depth are built first and timed in alternation (`speed_reps` rounds of `speed_steps`
    steps each), so slow drifts of the host (these steps are launch-bound, i.e. host-CPU-bound) hit both
    methods alike; reported: median and minimum over all timed steps, and the median over rounds of the
    per-round ratio to exact. Peak memory is measured during each method's warm-up, net of the other's."""
    rows = []
    for arch in ("gpt", "mlp"):
        for n in (int(v) for v in knobs["speed_layers"].split(",")):
            runs = []
            for name, method in (("exact", Exact()), ("hbll", HBLL(HBLLConfig()))):
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                base, x, y = speed_model(arch, n, knobs, device)
                model = method.prepare(base)
                opt = speed_trainer(method, model, device)
                _, extra = time_steps(method, model, x, y, 0, device, opt, warmup=2)
                crit = extra.get("critical_path", 0.0)
                if name == "exact":
                    with autocast_for(device):
                        crit = count_exact_critical_path(model, x, y)
                    model.zero_grad(set_to_none=True)
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
                runs.append({"name": name, "method": method, "model": model, "x": x, "y": y, "opt": opt,
                             "crit": crit, "peak": peak, "step": [], "train": []})
            for _ in range(knobs["speed_reps"]):
                for r in runs:
                    r["step"].append(time_steps(r["method"], r["model"], r["x"], r["y"], knobs["speed_steps"],
                                                device, warmup=1)[0])
                    r["train"].append(time_steps(r["method"], r["model"], r["x"], r["y"], knobs["speed_steps"],
                                                 device, r["opt"], warmup=1)[0])
            ref = runs[0]
            for r in runs:
                flat = {k: [t for rep in r[k] for t in rep] for k in ("step", "train")}
                ratio = {k: _median([_median(a) / _median(b) for a, b in zip(r[k], ref[k], strict=True)])
                         for k in ("step", "train")}
                rows.append({"arch": arch, "layers": n, "method": r["name"], "critical_path": r["crit"],
                             "step_ms": _median(flat["step"]), "step_ms_min": min(flat["step"]),
                             "time_vs_exact": ratio["step"], "train_step_ms": _median(flat["train"]),
                             "train_step_ms_min": min(flat["train"]), "train_time_vs_exact": ratio["train"],
                             "peak_gib": r["peak"]})
            del runs, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, as in the main loop; nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def tree_parallel_main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node W -m chainfree.bench.hbll --out DIR`: step wall time of the
    W-rank tree-parallel HBLL against one-GPU HBLL and one-GPU exact backprop (both on rank 0 while the
    other ranks wait), same models and sizes as `chainfree reproduce hbll`'s speed sweep (full scale)."""
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=tree_parallel_main.__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", default="16,64")
    ap.add_argument("--archs", default="gpt,mlp")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and method")
    ap.add_argument("--reps", type=int, default=4, help="rounds (the methods alternate)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    knobs = dict(SPEED_SCALES["full"] if cuda else SPEED_SCALES["small"])
    # correctness on this backend first: one fp32 step, tree-parallel vs one process, GPT blocks, N = 16
    grads = []
    for mode, everyone in (("auto", True), ("data", False)):
        if everyone or rank == 0:
            method = HBLL(HBLLConfig(distributed=mode))
            base, x, y = speed_model("gpt", 16, knobs, device)
            model = method.prepare(base)
            method.step(model, x, y)
            grads.append({n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None})
            del model, base
        dist.barrier()
    check = None
    if rank == 0:
        tree_g, one_g = grads
        check = max(float((tree_g[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in one_g.items())
        assert set(tree_g) == set(one_g)
        print(f"tree-parallel vs one process, fp32 GPT N=16: max relative grad error {check:.2e}", flush=True)
    rows = []
    for arch in args.archs.split(","):
        for n in (int(v) for v in args.layers.split(",")):
            runs = []  # every rank: the tree-parallel model; rank 0 also one-GPU HBLL and exact
            for name, method, everyone in (
                ("hbll_tree", HBLL(HBLLConfig()), True),
                ("hbll_1gpu", HBLL(HBLLConfig(distributed="data")), False),
                ("exact_1gpu", Exact(), False),
            ):
                if everyone or rank == 0:
                    base, x, y = speed_model(arch, n, knobs, device)
                    model = method.prepare(base)
                    opt = speed_trainer(method, model, device, "hbll_tree" if everyone else "single")
                    _, extra = time_steps(method, model, x, y, 0, device, opt, warmup=2)
                    runs.append(
                        {
                            "name": name,
                            "gpus": world if everyone else 1,
                            "method": method,
                            "model": model,
                            "x": x,
                            "y": y,
                            "opt": opt,
                            "crit": extra.get("critical_path"),
                            "step": [],
                            "train": [],
                        }
                    )
                dist.barrier()
            for _ in range(args.reps):  # alternate, so that host drifts hit every method alike
                for gpus in (world, 1):  # every rank runs the same sequence of collectives and barriers
                    for r in (r for r in runs if r["gpus"] == gpus):
                        for key, opt in (("step", None), ("train", r["opt"])):
                            r[key] += time_steps(
                                r["method"], r["model"], r["x"], r["y"], args.steps, device, opt, warmup=1
                            )[0]
                    if gpus == 1:
                        dist.barrier()
            for r in runs:
                med = {k: sorted(r[k])[len(r[k]) // 2] for k in ("step", "train")}
                rows.append(
                    {
                        "arch": arch,
                        "layers": n,
                        "method": r["name"],
                        "gpus": r["gpus"],
                        "step_ms": med["step"],
                        "step_ms_min": min(r["step"]),
                        "train_step_ms": med["train"],
                        "train_step_ms_min": min(r["train"]),
                        "critical_path": r["crit"],
                    }
                )
            del runs
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        for row in rows:
            ref = next(
                r for r in rows if (r["arch"], r["layers"], r["method"]) == (row["arch"], row["layers"], "exact_1gpu")
            )
            row["time_vs_exact"] = row["step_ms"] / ref["step_ms"]
            row["train_time_vs_exact"] = row["train_step_ms"] / ref["train_step_ms"]
        args.out.mkdir(parents=True, exist_ok=True)
        env = {**environment(), "world_size": world, "backend": dist.get_backend(), "max_rel_grad_err_fp32": check}
        (args.out / "hbll_tree_parallel.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=1, default=str)
        )
        table = markdown_table(
            rows,
            [
                (k, k)
                for k in (
                    "arch",
                    "layers",
                    "method",
                    "gpus",
                    "step_ms",
                    "step_ms_min",
                    "time_vs_exact",
                    "train_step_ms",
                    "train_step_ms_min",
                    "train_time_vs_exact",
                    "critical_path",
                )
            ],
        )
        (args.out / "hbll_tree_parallel.md").write_text(
            f"# HBLL tree-parallel over {world} ranks ({env.get('cuda_device') or 'CPU'})\n\n{table}\n\n"
            f"torch {env['torch']}, commit {env['git_commit']}, backend {env['backend']}\n"
        )
        print(table, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    tree_parallel_main()
