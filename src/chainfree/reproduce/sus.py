"""Reproduce SUS backprop's claim on our corpus: variance cost vs c and n, and training with SUS.

Paper (arXiv 2505.15080, abstract): cutting ~99% of the attention gradient flow (c ~ 25-30) raises the
relative gradient variance by ~1% at n ~ 2000, and less for longer n (measured on pretrained OPT-125m).

Ours, three phases, each writing its results before the next starts (a run cut short keeps what it has):
1. pretrain: a GPT trained with exact backprop on the bundled corpus at seq_len = max(n) (so every n
   below is in-distribution for its positions);
2. variance: at that checkpoint, for every n in `ns` and c in `cs`, `chainfree.bench.fidelity` compares
   SUS gradients with exact ones on the same M single-sequence minibatches (K SUS draws each, fp32, the
   reference semantics). The reported quantity is the paper's relative variance increase,
   (Var_total(SUS) - Var_total(exact)) / Var_total(exact) over minibatch sampling, read from its precise
   form `variance_increase_noise` = E‖ĝ - g‖² / Var_b(g) (SUS is unbiased, so the between-batch term is
   zero in expectation), with a jackknife standard error over the M minibatches. Also per parameter kind,
   and for the 'systematic' variant (at most c kept per row) at the largest n.
3. training: exact vs SUS (c = `compare_c`) from the same seed for the same steps at seq_len `compare_seq`;
   final val loss difference.
Outputs in OUT: sus_variance.{json,md}, variance_vs_c.png, variance_vs_n.png, sus_training.{json,md},
loss.png, sus_reproduction.md (all tables, beside the paper's number).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chainfree.bench.report import environment, markdown_table, write_result
from chainfree.config import RunConfig, load_config
from chainfree.logging import pyplot, save_figure

PAPER = {"c": "25-30", "n": "~2000", "variance_increase": 0.01, "model": "pretrained OPT-125m"}


@dataclass(frozen=True)
class Scale:
    pretrain: tuple[str, ...]  # --set overrides of the exact pretraining run (seq_len is set to max(ns))
    ns: tuple[int, ...]
    cs: tuple[int, ...]
    batches: int  # M minibatches (one sequence each) per (n, c)
    draws: int  # K SUS gradients per minibatch
    compare_seq: int
    compare_steps: int
    compare_c: int = 32


SCALES: dict[str, Scale] = {
    # CPU minutes on 2 cores: a 2-layer GPT with d=64, short sequences.
    "small": Scale(
        pretrain=(
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=2",
            "train.batch_size=4",
            "train.steps=150",
            "train.lr=3e-3",
            "train.warmup_steps=15",
            "train.eval_every=75",
            "train.eval_batches=4",
            "train.ckpt_every=150",
        ),
        ns=(64, 128, 256),
        cs=(4, 8, 16, 32, 64),
        batches=12,
        draws=2,
        compare_seq=128,
        compare_steps=150,
    ),  # fmt: skip
    # One GPU, a few minutes: 4 layers, d=256, head dim 64, trained at T=4096.
    "full": Scale(
        pretrain=(
            "model.d_model=256",
            "model.n_layers=4",
            "model.n_heads=4",
            "train.batch_size=8",
            "train.steps=300",
            "train.lr=2e-3",
            "train.warmup_steps=30",
            "train.eval_every=100",
            "train.eval_batches=8",
            "train.ckpt_every=300",
        ),
        ns=(512, 1024, 2048, 4096),
        cs=(4, 8, 16, 32, 64),
        batches=24,
        draws=2,
        compare_seq=2048,
        compare_steps=300,
    ),  # fmt: skip
}


def _device(device: str) -> torch.device:
    from chainfree.runtime import resolve_device

    return resolve_device(device or "auto")


def attention_backend(cfg: RunConfig, device: torch.device) -> str:
    """Which SUS backend `backend='auto'` picks for this model in training (bf16 autocast on CUDA)."""
    from chainfree.ops.sus import _triton_module, _triton_supports

    module = _triton_module() if device.type == "cuda" else None
    if module is None:
        return "reference"
    head_dim, heads, kv = cfg.model.d_model // cfg.model.n_heads, cfg.model.n_heads, cfg.model.kv_heads
    q = torch.empty(1, heads, 8, head_dim, device=device, dtype=torch.bfloat16)
    k = torch.empty(1, kv, 8, head_dim, device=device, dtype=torch.bfloat16)
    return "triton" if _triton_supports(module, q, k, k, True) else "reference"


def pretrain_config(scale: Scale, device: str, overrides: list[str]) -> RunConfig:
    return load_config(None, [*scale.pretrain, f"model.seq_len={max(scale.ns)}", f"train.device={device}", *overrides])


def load_trained(cfg: RunConfig, ckpt: Path, device: torch.device):
    """(model, data) with the weights of the exact run's last checkpoint."""
    from chainfree.checkpoint import load_checkpoint
    from chainfree.train import build_optimizer, build_run

    data, model, _ = build_run(cfg, device)
    load_checkpoint(ckpt, model, build_optimizer(model, cfg.train, device), cfg.to_dict())
    return model, data


def variance_grid(
    model: torch.nn.Module,
    batches_for_n: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    cs: tuple[int, ...],
    draws: int,
    variants: dict[int, tuple[str, ...]] | None = None,
    seed: int = 0,
    log=print,
) -> list[dict[str, Any]]:
    """Relative gradient variance increase of SUS for every (n, c) (and variant), via bench.fidelity.

    One row per (variant, n, c): overall and per parameter kind, with jackknife standard errors, and the
    share of (causally visible) attention entries that carried gradient in the last SUS step.
    """
    from chainfree.bench.fidelity import measure_fidelity
    from chainfree.methods.sus import Sus, SusConfig

    rows = []
    for n, batches in batches_for_n.items():
        for variant in (variants or {}).get(n, ("bernoulli",)):
            for c in cs:
                t0 = time.perf_counter()
                method = Sus(SusConfig(c=c, variant=variant, stats=True))
                report = measure_fidelity(model, method, batches, k=draws, seed=seed)
                o = report.overall
                row = {
                    "variant": variant, "n": n, "c": c,
                    "variance_increase": o["variance_increase_noise"],
                    "variance_increase_se": o["variance_increase_noise_se"],
                    "variance_increase_total": o["variance_increase"],
                    "variance_increase_total_se": o["variance_increase_se"],
                    "cosine": o["cosine"], "bias_corrected": o["bias_corrected"],
                    "kinds": {kind: {"variance_increase": v["variance_increase_noise"],
                                     "variance_increase_se": v["variance_increase_noise_se"]}
                              for kind, v in report.kinds.items()},
                    "seconds": time.perf_counter() - t0,
                    # kept-entry counts of the last SUS step (last minibatch, last draw; reference backend)
                    "kept_fraction": method.stats.kept_fraction if method.stats.rows else float("nan"),
                    "kept_per_row": method.stats.mean_kept_per_row if method.stats.rows else float("nan"),
                }  # fmt: skip
                rows.append(row)
                log(
                    f"  {variant:10s} n={n:5d} c={c:3d}: variance +{100 * row['variance_increase']:.3f}% "
                    f"(se {100 * row['variance_increase_se']:.3f}%), {row['seconds']:.1f}s"
                )
    return rows


def _plot_variance(rows: list[dict[str, Any]], x_key: str, line_key: str, path: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for line in sorted({r[line_key] for r in rows if r["variant"] == "bernoulli"}):
        pts = sorted((r for r in rows if r[line_key] == line and r["variant"] == "bernoulli"), key=lambda r: r[x_key])
        ax.errorbar([r[x_key] for r in pts], [100 * r["variance_increase"] for r in pts],
                    yerr=[100 * r["variance_increase_se"] for r in pts], marker="o", capsize=3,
                    label=f"{line_key}={line}")  # fmt: skip
    sys_rows = sorted((r for r in rows if r["variant"] == "systematic"), key=lambda r: r[x_key])
    if sys_rows and x_key == "c":
        ax.errorbar([r["c"] for r in sys_rows], [100 * r["variance_increase"] for r in sys_rows],
                    yerr=[100 * r["variance_increase_se"] for r in sys_rows], marker="s", ls="--", capsize=3,
                    label=f"systematic, n={sys_rows[0]['n']}")  # fmt: skip
    if x_key == "c":
        ax.errorbar([27.5], [1.0], xerr=[[2.5], [2.5]], marker="*", ms=12, color="k", ls="none",
                    label="paper: ~1% at c 25-30, n~2000")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("relative gradient variance increase (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def variance_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ns = sorted({r["n"] for r in rows})
    cs = sorted({r["c"] for r in rows})
    lines = [
        "| c \\ n | " + " | ".join(str(n) for n in ns) + " |",
        "|---|" + "|".join("---" for _ in ns) + "|",
    ]
    for c in cs:
        cells = []
        for n in ns:
            r = next((r for r in rows if r["n"] == n and r["c"] == c and r["variant"] == "bernoulli"), None)
            cells.append(f"{100 * r['variance_increase']:.3g}% ± {100 * r['variance_increase_se']:.2g}" if r else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    kept_lines, any_kept = [], False
    for c in cs:
        cells = []
        for n in ns:
            r = next((r for r in rows if r["n"] == n and r["c"] == c and r["variant"] == "bernoulli"), None)
            ok = r is not None and r.get("kept_fraction") == r.get("kept_fraction")  # not NaN
            any_kept = any_kept or ok
            cells.append(f"{100 * r['kept_fraction']:.2f}% ({r['kept_per_row']:.1f}/row)" if ok else "-")
        kept_lines.append(f"| {c} | " + " | ".join(cells) + " |")
    sys_rows = [r for r in rows if r["variant"] == "systematic"]
    md = (
        f"## Relative gradient variance increase of SUS (Bernoulli, the default rule)\n\n"
        f"Model: {meta['model']}; exact pretraining {meta['pretrain_steps']} steps, final val loss "
        f"{meta['pretrain_val_loss']:.4f}. Per (n, c): M={meta['batches']} single-sequence minibatches of the "
        f"train split, K={meta['draws']} SUS draws each, fp32. Cell: 100·E‖ĝ−g‖²/Var_b(g) ± jackknife SE.\n\n"
        + "\n".join(lines)
        + f"\n\nPaper: ~{100 * PAPER['variance_increase']:.0f}% at c {PAPER['c']}, n {PAPER['n']} "
        f"({PAPER['model']}), decreasing with n.\n"
    )
    if any_kept:
        md += (
            "\n## Share of causally visible attention entries that carried gradient (last SUS step)\n\n"
            + lines[0]
            + "\n"
            + lines[1]
            + "\n"
            + "\n".join(kept_lines)
            + "\n"
        )
    if sys_rows:
        cmp_rows = []
        for r in sys_rows:
            b = next(x for x in rows if x["variant"] == "bernoulli" and x["n"] == r["n"] and x["c"] == r["c"])
            ratio = r["variance_increase"] / b["variance_increase"] if b["variance_increase"] else float("nan")
            cmp_rows.append({"n": r["n"], "c": r["c"], "bernoulli": 100 * b["variance_increase"],
                             "systematic": 100 * r["variance_increase"], "ratio": ratio})  # fmt: skip
        md += (
            "\n## Variant: systematic sampling (at most c kept per row, certain)\n\n"
            + markdown_table(cmp_rows, [("n", "n"), ("c", "c"), ("bernoulli", "Bernoulli (%)"),
                                        ("systematic", "systematic (%)"), ("ratio", "systematic / Bernoulli")])
        )  # fmt: skip
    kinds = sorted({k for r in rows for k in r["kinds"]})
    if kinds:
        ref = max(ns)
        kind_rows = []
        for c in cs:
            r = next((r for r in rows if r["n"] == ref and r["c"] == c and r["variant"] == "bernoulli"), None)
            if r:
                kind_rows.append({"c": c, **{k: 100 * r["kinds"][k]["variance_increase"] for k in kinds}})
        md += f"\n\n## Per parameter kind at n={ref} (%)\n\n" + markdown_table(
            kind_rows, [("c", "c"), *((k, k) for k in kinds)]
        )
    return md


def run(out: Path, scale: str | Scale, device: str, overrides: list[str], model: str | None = None) -> None:
    """Pretrain exact, measure the variance grid, then train exact vs SUS; see the module docstring.

    `scale` is 'small' | 'full' or a Scale (for custom grids from Python). `model` = 'smollm2' (or 'hf' with
    `--set model.pretrained=PATH`) runs the variance experiment on that pretrained model instead
    (chainfree.reproduce._sus_pretrained)."""
    if model is not None and model != "gpt":
        return run_pretrained(out, scale, device, overrides, model)
    from chainfree.data.tokens import BatchSampler
    from chainfree.train import train

    if isinstance(scale, Scale):
        sc, scale = scale, "custom"
    elif scale in SCALES:
        sc = SCALES[scale]
    else:
        raise ValueError(f"scale must be one of {tuple(SCALES)}, got {scale!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    command = f"chainfree reproduce sus --scale {scale} --device {device}" + "".join(f" --set {o}" for o in overrides)

    # 1. exact pretraining at T = max(ns)
    cfg = pretrain_config(sc, str(dev), overrides)
    print(f"[sus] pretraining exact GPT at T={cfg.model.seq_len} for {cfg.train.steps} steps on {dev}")
    summary = train(cfg, out / "pretrain_exact")
    model, data = load_trained(cfg, out / "pretrain_exact" / "checkpoint", dev)
    meta = {
        "model": f"GPT d={cfg.model.d_model}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads, "
        f"T={cfg.model.seq_len}, vocab {cfg.model.vocab_size}",
        "pretrain_steps": cfg.train.steps, "pretrain_val_loss": summary["final_val_loss"],
        "batches": sc.batches, "draws": sc.draws,
    }  # fmt: skip

    # 2. variance grid at the trained checkpoint
    batches_for_n = {}
    for n in sc.ns:
        sampler = BatchSampler(data, 1, n, seed=1000 + n)
        batches_for_n[n] = [tuple(t.to(dev) for t in sampler.batch("train", i)) for i in range(sc.batches)]
    print(f"[sus] variance grid: n in {sc.ns}, c in {sc.cs}, M={sc.batches}, K={sc.draws}")
    rows = variance_grid(model, batches_for_n, sc.cs, sc.draws, variants={max(sc.ns): ("bernoulli", "systematic")})
    md = variance_markdown(rows, meta)
    write_result(out, "sus_variance", {"command": command, "scale": scale, "meta": meta, "paper": PAPER,
                                       "rows": rows}, md)  # fmt: skip
    _plot_variance(rows, "c", "n", out / "variance_vs_c.png", "SUS: variance increase vs c")
    _plot_variance(rows, "n", "c", out / "variance_vs_n.png", "SUS: variance increase vs n")
    del model

    # 3. training from scratch, exact vs SUS, equal steps and data
    from chainfree.logging import plot_losses, read_metrics

    base = [*sc.pretrain, f"model.seq_len={sc.compare_seq}", f"train.steps={sc.compare_steps}",
            f"train.ckpt_every={sc.compare_steps}", f"train.device={dev}", *overrides]  # fmt: skip
    runs = {"exact": ["method.name=exact"], f"sus_c{sc.compare_c}": ["method.name=sus", f"method.c={sc.compare_c}"]}
    summaries = {}
    backend = attention_backend(load_config(None, base), dev)
    for name, method in runs.items():
        print(f"[sus] training {name} at T={sc.compare_seq} for {sc.compare_steps} steps")
        summaries[name] = train(load_config(None, [*base, *method]), out / f"train_{name}")
    exact = summaries["exact"]
    train_rows = [
        {"method": name, "val_loss": s["final_val_loss"], "delta_val": s["final_val_loss"] - exact["final_val_loss"],
         "step_time_s": s["step_time_s"], "time_ratio": s["step_time_s"] / exact["step_time_s"]}
        for name, s in summaries.items()
    ]  # fmt: skip
    train_md = (
        f"## Training from scratch: exact vs SUS (c={sc.compare_c}), T={sc.compare_seq}, {sc.compare_steps} steps, "
        "same seed and batches\n\n"
        + markdown_table(train_rows, [("method", "method"), ("val_loss", "final val loss"),
                                      ("delta_val", "Δ val vs exact"), ("step_time_s", "step time (s)"),
                                      ("time_ratio", "step time ratio")])
        + f"\n\nSUS attention backend (backend='auto' on {dev}): {backend}.\n"
    )  # fmt: skip
    write_result(out, "sus_training", {"command": command, "scale": scale, "summaries": summaries,
                                       "rows": train_rows, "sus_backend": backend}, train_md)  # fmt: skip
    plot_losses(
        {n: read_metrics(out / f"train_{n}" / "metrics.jsonl") for n in runs},
        out / "loss.png",
        title=f"exact vs SUS c={sc.compare_c}, T={sc.compare_seq}",
    )
    env = environment()
    full = f"# SUS backprop reproduction ({scale})\n\n{md}\n\n{train_md}\n\nEnvironment: {json.dumps(env)}\n"
    (out / "sus_reproduction.md").write_text(full + f"Command: `{command}`\n")
    print(full)


def run_pretrained(out: Path, scale: str | Scale, device: str, overrides: list[str], model: str) -> None:
    """`chainfree reproduce sus --model smollm2 [--scale small|full] [--set model.pretrained=PATH]`."""
    from chainfree.config import parse_set
    from chainfree.errors import ConfigError
    from chainfree.reproduce import _sus_pretrained as pretrained

    path = model if model != "hf" else ""
    for item in overrides:
        section, key, value = parse_set(item)
        if (section, key) != ("model", "pretrained"):
            raise ConfigError(f"--set {section}.{key}: the pretrained SUS reproduction takes only model.pretrained")
        path = str(value)
    if not path:
        raise ConfigError("--model hf needs --set model.pretrained=PATH (a transformers folder or a .gguf file)")
    if not isinstance(scale, str) or scale not in pretrained.PLANS:
        raise ConfigError(f"--scale must be one of {tuple(pretrained.PLANS)} for a pretrained model, got {scale!r}")
    command = f"chainfree reproduce sus --model {model} --scale {scale} --device {device}" + "".join(
        f" --set {o}" for o in overrides)
    pretrained.run(Path(out), path, pretrained.PLANS[scale], device, command)


__all__ = ["PAPER", "SCALES", "Scale", "run", "run_pretrained", "variance_grid", "variance_markdown"]
