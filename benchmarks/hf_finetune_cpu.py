"""Fine-tune a pretrained LLM on CPU with exact, exact + activation checkpointing, SUS and BASIS.

    python benchmarks/hf_finetune_cpu.py --out runs/hf_finetune --steps 12

Runs `chainfree compare` (bench/compare.py: same seed and batches, interleaved rounds, memory of one
step per entry) on `--model hf --set model.pretrained=smollm2` at T=512, then evaluates the untouched
pretrained model on the same val batches ("val before"), and writes one table (JSON + markdown) to
benchmarks/results/hf_finetune_cpu.{json,md}. All entries share train.dtype (bf16 autocast matmuls on
CPU by default here; fp32 weights and AdamW).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def val_before(overrides: list[str]) -> float:
    from chainfree.config import load_config
    from chainfree.data import BatchSampler
    from chainfree.methods import build_method
    from chainfree.training.trainer import build_run, evaluate

    cfg = load_config(None, overrides)
    device = torch.device("cpu")
    data, model, method = build_run(cfg, device)
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    return evaluate(build_method("exact"), model, sampler, cfg.train.eval_batches, device, cfg.train)


def saved_bytes(overrides: list[str], methods: str, label: str) -> int:
    """Bytes autograd holds for backward at the end of one training forward of the entry (parameters
    excluded; the peak of saved tensors is reached there): the activation memory that checkpointing and
    BASIS cut. A forward per entry instead of E2's two-step MemTracker pass, which this CPU cannot spare."""
    from chainfree.bench.cases import build_step_case, load_batch
    from chainfree.bench.compare import entry_configs, parse_entries
    from chainfree.bench.memory import SavedTensorMeter
    from chainfree.training.trainer import autocast_context

    entries = parse_entries(methods)
    entry = next(e for e in entries if e.label == label)
    cfg = entry_configs(entries, None, overrides, None, None, "cpu")[label]
    batch = load_batch(cfg)
    case = build_step_case(cfg, entry.method, cfg.method_params, batch, torch.device("cpu"))
    params = list(case.model.parameters()) + list(case.model.buffers())
    x, y = case.inputs, case.targets
    with SavedTensorMeter(params) as meter, autocast_context(cfg.train, torch.device("cpu")):
        loss = case.model(x, y)
    del loss
    return int(meter.peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf_finetune"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pretrained", default="smollm2")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    from chainfree.bench.compare import run_compare
    from chainfree.bench.report import environment, markdown_table

    overrides = ['model.kind="hf"', f'model.pretrained="{args.pretrained}"', "model.seq_len=512",
                 "train.batch_size=1", f'train.dtype="{args.dtype}"', "train.lr=1e-4", "train.warmup_steps=2",
                 "train.weight_decay=0.0", f"train.eval_every={args.steps}", "train.eval_batches=1",
                 f"train.ckpt_every={args.steps}", 'train.device="cpu"', "method.c=32", "method.rank=32"]  # fmt: skip
    methods = "exact,exact+ckpt,sus,basis"
    command = f"python benchmarks/hf_finetune_cpu.py --out {args.out} --steps {args.steps} --rounds {args.rounds}"
    t0 = time.perf_counter()
    before = val_before([o for o in overrides if not o.startswith("method.")])
    run_compare(args.out, methods, overrides=overrides, steps=args.steps, device="cpu", rounds=args.rounds,
                command=command, progress=False, measure_memory=False)  # fmt: skip
    saved = {label: saved_bytes(overrides, methods, label) for label in methods.split(",")}
    report = json.loads((args.out / "report.json").read_text())
    rows = []
    exact = report["results"]["exact"]
    for label, r in report["results"].items():
        rows.append({"method": label, "val_before": before, "val_after": r.get("final_val_loss"),
                     "delta_vs_exact": r["final_val_loss"] - exact["final_val_loss"],
                     "step_time_s": r.get("step_time_s"), "time_ratio": r["step_time_s"] / exact["step_time_s"],
                     "saved_mib": saved[label] / 2**20, "saved_ratio": saved[label] / saved["exact"]})  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    md = (f"# Fine-tuning {args.pretrained} on CPU at T=512 ({args.steps} AdamW steps, batch 1, lr 1e-4, "
          f"train.dtype={args.dtype})\n\n"
          + markdown_table(rows, [("method", "method"), ("val_before", "val before"), ("val_after", "val after"),
                                  ("delta_vs_exact", "Δ val vs exact"), ("step_time_s", "step time (s)"),
                                  ("time_ratio", "time ratio"), ("saved_mib", "saved for backward (MiB)"),
                                  ("saved_ratio", "saved ratio")])
          + f"\n\nSUS c=32 (reference backend on CPU), BASIS R=32 (default layers), exact+ckpt = "
          "train.activation_checkpoint=full (training/options.py, per decoder layer). Val: 1 fixed val batch "
          "of 512 tokens of Shakespeare (held-out plays). Saved for backward: bytes autograd holds at the end of "
          "one training forward (parameters excluded; bench.memory.SavedTensorMeter). Step time: median wall time "
          f"of the timed steps on a heavily shared 2-core CPU (noisy). Command: `{command}`; commit {commit}; "
          f"{time.perf_counter() - t0:.0f} s wall on a shared 2-core CPU.\n")  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "hf_finetune_cpu.json").write_text(json.dumps(
        {"command": command, "commit": commit, "environment": environment(), "overrides": overrides,
         "val_before": before, "rows": rows, "report": report}, indent=1, default=str))  # fmt: skip
    (args.results / "hf_finetune_cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
