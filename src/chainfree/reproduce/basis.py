"""Reproduce the BASIS paper's rank sweep on our corpus and tokenizer.

Paper setup: pre-LN GPT, T = 64, d = 64, 2 heads, 2 layers, batch 1, SGD lr 0.01 momentum 0.9,
50k steps, GPT-2 BPE (vocab 50257) on a fineweb-edu sample; exact vs R in {64, 32, 16, 8, 1}.
Ours: the same architecture shape (our GPT uses RoPE and a tied head), the default corpus and its
locally trained BPE, constant lr (no warmup, no decay), no clipping (clipping would hide the
gradient-norm inflation of the invariant scalars), fp32. Every case uses the same seed, so the same
initial weights and the same batch sequence; only the gradient estimator differs.

With batch 1 x T = 64 every layer sees B = 64 rows, so R = 64 is a signed permutation: its dW is
exact up to the shrink factor (1 - 0.01)^2 -- a useful sanity row. Validation uses the same
`eval_batches` fixed windows of the val split for every case.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from chainfree.bench.report import markdown_table, write_result
from chainfree.config import load_config
from chainfree.logging import plot_losses, read_metrics

# Val losses from the paper, GPT-2 BPE on fineweb-edu after 50k steps.
PAPER_VAL_LOSS: dict[str, float] = {"exact": 6.617, "R=64": 6.573, "R=32": 6.576, "R=16": 6.675, "R=8": 6.762,
                                    "R=1": 7.222}
RANKS = (64, 32, 16, 8, 1)

PAPER_SETUP = [
    "model.kind=gpt", "model.seq_len=64", "model.d_model=64", "model.n_heads=2", "model.n_layers=2",
    "train.batch_size=1", "train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=0",
    "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=0", "train.dtype=fp32",
]
# steps, eval_every, eval_batches (x 64 tokens), ckpt_every
SCALES: dict[str, tuple[int, int, int, int]] = {"small": (1500, 500, 200, 1500), "full": (50_000, 5_000, 1000, 5_000)}


def case_overrides(scale: str, device: str) -> list[str]:
    steps, eval_every, eval_batches, ckpt_every = SCALES[scale]
    return [*PAPER_SETUP, f"train.steps={steps}", f"train.eval_every={eval_every}",
            f"train.eval_batches={eval_batches}", f"train.ckpt_every={ckpt_every}", f"train.device={device}"]


def run(out: Path, scale: str, device: str, overrides: list[str]) -> None:
    """Train exact and BASIS R in RANKS under identical seed/data; write basis_reproduction.{json,md}."""
    from chainfree.training.trainer import train  # heavy import, only when the reproduction runs

    out = Path(out)
    base = case_overrides(scale, device)
    cases: dict[str, list[str]] = {"exact": ["method.name=exact"]}
    cases.update({f"R={r}": ["method.name=basis", f"method.rank={r}"] for r in RANKS})
    summaries: dict[str, dict[str, Any]] = {}
    for name, method in cases.items():
        cfg = load_config(None, [*base, *method, *overrides])
        summaries[name] = train(cfg, out / name.replace("=", ""))
    rows = table_rows(out, summaries)
    cfg = load_config(None, [*base, *overrides])
    tokens = cfg.train.eval_batches * cfg.train.batch_size * cfg.model.seq_len
    md = (
        f"# BASIS reproduction ({scale}): {cfg.train.steps} steps, batch {cfg.train.batch_size} x "
        f"{cfg.model.seq_len} tokens, corpus {cfg.data.corpus}\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\nVal loss over {tokens} val tokens; the paper's column is GPT-2 BPE (50257) on fineweb-edu after "
        "50k steps, ours is our corpus/tokenizer, so compare the *differences to exact*, not the levels. "
        "Grad norm: mean total gradient norm over training (BASIS's invariant scalars inflate it). "
        f"Unigram entropy of our corpus: {summaries['exact']['unigram_entropy']:.4f} nats/token."
    )
    write_result(out, "basis_reproduction", {"scale": scale, "overrides": overrides, "summaries": summaries,
                                             "rows": rows}, md)
    plot_losses({n: read_metrics(out / n.replace("=", "") / "metrics.jsonl") for n in cases}, out / "loss.png",
                title="BASIS rank sweep (paper setup)")
    print(md)


def table_rows(out: Path, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    exact = summaries["exact"]["final_val_loss"]
    rows = []
    for name, s in summaries.items():
        records = read_metrics(out / name.replace("=", "") / "metrics.jsonl")
        norms = [r["grad_norm"] for r in records if math.isfinite(r.get("grad_norm", math.nan))]
        paper = PAPER_VAL_LOSS[name]
        rows.append({
            "case": name,
            "val_loss": s["final_val_loss"],
            "delta": s["final_val_loss"] - exact,
            "paper_val_loss": paper,
            "paper_delta": paper - PAPER_VAL_LOSS["exact"],
            "grad_norm": sum(norms) / len(norms) if norms else math.nan,
            "step_time_ms": 1000 * s["step_time_s"],
        })
    return rows


COLUMNS = [("case", "case"), ("val_loss", "our val loss"), ("delta", "ours − exact"),
           ("paper_val_loss", "paper val loss"), ("paper_delta", "paper − exact"),
           ("grad_norm", "mean grad norm"), ("step_time_ms", "step time (ms)")]

