"""Reproduce the LBI paper's quality table in shape: dense vs causal LBI vs the authors' leaky LBI.

Paper: Mamba-2, Mamba-3, Transformer and a Mamba–Transformer hybrid (47–61M block parameters), regions of
2 layers, r = 16 within 0.16–0.35 CE of dense on FineWeb-Edu after 20k steps at T = 1024. Their message is
pooled over the whole sequence (not causal), so their CE is not comparable to a causal dense model; this
reproduction trains, for every architecture, under identical seed, data order and token count:
  dense                (exact backprop, the baseline)
  LBI r=...            our causal chunked interface (C1), the gradients exact for the LBI model
  token r=16           our token-local interface (C2): cheap Jacobians, weaker model
  paper_leaky r=16     the authors' construction, to show how much of their number the leak explains
and reports val CE and the gap to dense beside the paper's 0.16–0.35.

Gradients: the scan backward and plain autograd through the LBI model give the same gradients (float64
tests: rel. err <= 1e-10), so quality runs use `method.backward=autograd` by default (faster on one
device); pass `--set method.backward=scan` to train through the scan itself.

Scales: small (CPU, minutes): 4-layer d=64 models, byte tokens, K = 4 regions of 1 layer, r in {4, 16}.
full (one GPU, one architecture per call: `--set model.kind=gpt`): the ~50M presets of configs/*-50m.toml
(47-61M block parameters), regions of 2 layers, T = 1024, BPE 8192 on the `pystdlib` corpus, bf16 autocast,
fused AdamW, the same seed / data order / token budget for every case. Cases `dense`, `lbi r=16` (causal C1,
C = 4 chunks, the method's defaults) and `paper_leaky r=16`, trained by autograd (same gradients as the
scan); then the scan backward's own training step is timed for a few steps (Jacobians 'vjp' and 'prefix')
and, on one batch in fp32, its gradients are compared with autograd's. Writes lbi_full_<arch>_<device>.json,
.md and .png (val loss vs tokens). Keys consumed here, not by the config: `repro.tokens` (train tokens per
run, default 15,728,640 = 480 steps of 32 x 1024), `repro.cases` (comma list of case names, e.g.
`dense,lbi_r16,paper_leaky_r16,lbi_r4,lbi_r64`), `repro.scan_steps` (default 6; 0 = skip the scan timing).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from chainfree.bench.report import markdown_table, write_result
from chainfree.config import load_config
from chainfree.logging import plot_losses, read_metrics

PAPER_GAP_R16 = (0.16, 0.35)  # CE gap to dense at r = 16 across the four architectures (abstract)
ARCHS = ("gpt", "mamba2", "mamba3", "hybrid")

SMALL_MODEL = [
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.seq_len=64",
    "model.d_state=16",
    "model.ssm_head_dim=16",
    "model.chunk_size=16",
    "model.attn_every=2",
    "model.hybrid_mixer=mamba3",
    "data.tokenizer=bytes",
    "data.max_chars=400000",
]
SCALES: dict[str, dict[str, Any]] = {
    "small": {
        "ranks": (4, 16),
        "region_size": 1,
        "n_chunks": 4,
        "base": [
            *SMALL_MODEL,
            "train.steps=150",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.warmup_steps=10",
            "train.eval_every=50",
            "train.eval_batches=8",
            "train.ckpt_every=150",
        ],
        "config": None,
    },
    "full": {
        "ranks": (4, 8, 16, 32, 64),
        "region_size": 2,
        "n_chunks": 8,
        "base": [],
        "config": "{arch}-50m",
    },
}


def cases(scale: str, region_size: int | None = None) -> dict[str, list[str]]:
    s = SCALES[scale]
    lbi = ["method.name=lbi", f"method.region_size={region_size or s['region_size']}", "method.backward=autograd"]
    out: dict[str, list[str]] = {"dense": ["method.name=exact"]}
    for r in s["ranks"]:
        out[f"lbi r={r}"] = [*lbi, f"method.rank={r}", f"method.n_chunks={s['n_chunks']}"]
    out["token r=16"] = [*lbi, "method.rank=16", "method.interface=token"]
    out["paper_leaky r=16"] = [*lbi, "method.rank=16", "method.interface=paper_leaky"]
    return out


def run(out: Path, scale: str, device: str, overrides: list[str]) -> None:
    """Train dense and LBI variants for every architecture; write lbi_reproduction.{json,md} and loss PNGs."""
    from chainfree.train import train

    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "full":
        run_full(Path(out), device, overrides)
        return
    out = Path(out)
    spec = SCALES[scale]
    archs = ARCHS
    arch_override = [o for o in overrides if o.startswith("model.kind=")]
    if arch_override:
        archs = (arch_override[-1].split("=", 1)[1],)
    rows: list[dict[str, Any]] = []
    summaries: dict[str, dict[str, Any]] = {}
    for arch in archs:
        config = spec["config"].format(arch=arch) if spec["config"] else None
        base = [*spec["base"], f"model.kind={arch}", f"train.device={device}"]
        dense_val = None
        n_layers = load_config(config, [*base, *overrides]).model.n_layers
        region_size = spec["region_size"] if n_layers % spec["region_size"] == 0 else 1  # odd depth: 1-block regions
        for name, method in cases(scale, region_size).items():
            cfg = load_config(config, [*base, *method, *overrides])
            run_dir = out / arch / name.replace(" ", "_").replace("=", "")
            summary = train(cfg, run_dir)
            summaries[f"{arch}/{name}"] = summary
            val = summary["final_val_loss"]
            if name == "dense":
                dense_val = val
            rows.append(
                {
                    "arch": arch,
                    "case": name,
                    "val_loss": val,
                    "gap": val - dense_val,
                    "tokens": cfg.train.steps * cfg.train.batch_size * cfg.model.seq_len,
                    "step_time_ms": 1000 * summary["step_time_s"],
                    "params": summary["params"],
                }
            )
        plot_losses(
            {
                n: read_metrics(out / arch / n.replace(" ", "_").replace("=", "") / "metrics.jsonl")
                for n in cases(scale)
            },
            out / f"loss_{arch}.png",
            title=f"LBI vs dense ({arch})",
        )
    md = (
        f"# LBI reproduction ({scale})\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\nGap = val CE − dense val CE of the same architecture (same seed, data order, tokens). Paper: r=16 "
        f"within {PAPER_GAP_R16[0]}–{PAPER_GAP_R16[1]} CE of dense (FineWeb-Edu, 47–61M block params, 20k steps, "
        "non-causal pooled message). `paper_leaky` is that non-causal construction: its CE can beat dense "
        "because every position sees a summary of the whole sequence, targets included."
    )
    write_result(
        out, "lbi_reproduction", {"scale": scale, "overrides": overrides, "rows": rows, "summaries": summaries}, md
    )
    print(md)


COLUMNS = [
    ("arch", "arch"),
    ("case", "case"),
    ("val_loss", "val CE"),
    ("gap", "gap to dense"),
    ("tokens", "train tokens"),
    ("params", "params"),
    ("step_time_ms", "step time (ms)"),
]


# ---- full scale: one architecture per call, the ~50M presets on one GPU --------------------------------------
FULL_TOKENS = 15 * 2**20  # 480 steps of 32 x 1024 tokens
# quality rows: regions of 2 layers, autograd through the LBI model (the same gradients as the scan)
_LBI = ["method.name=lbi", "method.region_size=2", "method.backward=autograd"]
FULL_CASES: dict[str, list[str]] = {
    "dense": ["method.name=exact"],
    "lbi_r16": [*_LBI, "method.rank=16"],
    "paper_leaky_r16": [*_LBI, "method.rank=16", "method.interface=paper_leaky"],
    "lbi_r4": [*_LBI, "method.rank=4"],
    "lbi_r64": [*_LBI, "method.rank=64"],
    "token_r16": [*_LBI, "method.rank=16", "method.interface=token"],
}
DEFAULT_FULL_CASES = ("dense", "lbi_r16", "paper_leaky_r16")


def _split_repro_keys(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """`repro.KEY=VALUE` settings of the reproduction itself, and the rest (config overrides)."""
    repro, rest = {}, []
    for o in overrides:
        if o.startswith("repro."):
            key, _, value = o[len("repro."):].partition("=")
            if key not in ("tokens", "cases", "scan_steps", "keep"):
                raise ValueError(f"unknown reproduction key repro.{key} (tokens, cases, scan_steps, keep)")
            repro[key] = value
        else:
            rest.append(o)
    return repro, rest


def block_params(cfg: Any) -> int:
    """Parameters of the model's blocks (the paper's 'block parameters': no embedding/head, no interface)."""
    import dataclasses

    import torch

    from chainfree.models import build_model

    with torch.device("meta"):  # block parameters do not depend on the vocabulary
        lm = build_model(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 256))
    return sum(p.numel() for p in lm.blocks.parameters())


def full_base(arch: str, device: str, tokens: int, overrides: list[str]) -> tuple[list[str], int]:
    """Config overrides shared by every case of one architecture, and the step count for `tokens`."""
    cfg = load_config(f"{arch}-50m", [f"model.kind={arch}", *overrides])
    per_step = cfg.train.batch_size * cfg.model.seq_len
    steps = max(2, math.ceil(tokens / per_step))
    base = [
        f"model.kind={arch}",
        "data.corpus=pystdlib",
        f"train.device={device}",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, min(cfg.train.warmup_steps, steps // 10))}",
        f"train.eval_every={max(1, steps // 5)}",
        "train.eval_batches=20",
        f"train.ckpt_every={steps}",
    ]
    return [*base, *overrides], steps


def _grad_check(cfg: Any, batch_size: int = 4) -> dict[str, Any]:
    """On one batch in fp32 (no autocast): the scan backward's gradients against autograd's through the same
    LBI model (max relative error over parameters) -- the claim that the quality rows' autograd training
    follows the scan's gradients, checked at full size on the device that ran them."""
    import torch

    from chainfree.data import BatchSampler
    from chainfree.data.tokens import load_tokens
    from chainfree.methods.lbi import LBI, LBIConfig, scan_backward
    from chainfree.models import build_model

    data = load_tokens(cfg.data)
    cfg.model.fit_vocab(data.vocab_size)
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu")
    torch.manual_seed(cfg.train.seed)
    lm = build_model(cfg.model).to(device)
    keys = {k: v for k, v in cfg.method.items() if k in LBIConfig.__dataclass_fields__}
    keys["backward"] = "scan"
    model = LBI(LBIConfig(**keys)).prepare(lm)
    ids, tgt = BatchSampler(data, batch_size, cfg.model.seq_len, cfg.train.seed).batch("train", 0)
    ids, tgt = ids.to(device), tgt.to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 both ways
    try:
        model.zero_grad(set_to_none=True)
        model(ids, tgt).backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        scan_backward(model, ids, tgt, keys.get("jacobian", "vjp"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    worst = max(float((p.grad - ref[n]).norm() / ref[n].norm().clamp_min(1e-30))
                for n, p in model.named_parameters() if n in ref)
    del model, lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"grad_check_max_rel_err_fp32": worst, "grad_check_batch": batch_size}


def _plot_vs_tokens(runs: dict[str, list[dict[str, Any]]], tokens_per_step: int, path: Path, title: str) -> None:
    """Val (markers) and train (thin) loss against training tokens, one colour per case."""
    from chainfree.logging import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        tr = [(r["step"] * tokens_per_step, r["train_loss"]) for r in records if "train_loss" in r]
        va = [(r["step"] * tokens_per_step, r["val_loss"]) for r in records
              if "val_loss" in r and math.isfinite(r["val_loss"])]
        if tr:
            ax.plot(*zip(*tr, strict=True), color=f"C{i}", alpha=0.35, lw=0.8)
        if va:
            ax.plot(*zip(*va, strict=True), "o-", color=f"C{i}", label=f"{name} (val)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_full(out: Path, device: str, overrides: list[str]) -> dict[str, Any]:
    """The full-scale table for one architecture (`--set model.kind=ARCH`, default gpt); see the module doc.
    Results are rewritten after every case, so a run stopped by a time limit keeps what it finished."""
    import torch

    from chainfree.train import train

    repro, overrides = _split_repro_keys(overrides)
    kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("model.kind=")]
    arch = kinds[-1] if kinds else "gpt"
    tokens = int(float(repro.get("tokens", FULL_TOKENS)))
    # 'none': no training case (with repro.keep=1: only the scan timing, against a kept dense row)
    case_names = [c for c in repro.get("cases", ",".join(DEFAULT_FULL_CASES)).split(",") if c and c != "none"]
    unknown = [c for c in case_names if c not in FULL_CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(FULL_CASES)}")
    scan_steps = int(repro.get("scan_steps", 6))
    base, steps = full_base(arch, device, tokens, overrides)
    dev_type = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")).type
    name = f"lbi_full_{arch}_{dev_type}"
    earlier = _earlier_run(out / f"{name}.json", overrides, steps) if repro.get("keep") == "1" else None
    if "dense" not in case_names and not (earlier and "dense_val" in earlier["rows"][0]):
        case_names.insert(0, "dense")
    command = _command_line()
    cfg0 = load_config(f"{arch}-50m", base)
    tokens_per_step = cfg0.train.batch_size * cfg0.model.seq_len
    row: dict[str, Any] = {
        "arch": arch,
        "params": block_params(cfg0),
        "n_layers": cfg0.model.n_layers,
        "d_model": cfg0.model.d_model,
        "regions": cfg0.model.n_layers // 2,
        "tokens": steps * tokens_per_step,
        "steps": steps,
        "batch": f"{cfg0.train.batch_size}x{cfg0.model.seq_len}",
        "lr": cfg0.train.lr,
        "paper_gap_r16": "0.16-0.35",
        "data": (f"{cfg0.data.corpus}" if cfg0.data.corpus != "tokens"
                 else f"pre-tokenised {Path(cfg0.data.path).name}"),
    }
    summaries: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    if earlier:  # cases finished by an earlier call with the same settings, not run again here
        kept = [c for c in earlier["summaries"] if c in FULL_CASES and c not in case_names]
        prev = earlier["rows"][0]
        for c in kept:
            summaries[c] = {"commit": earlier.get("commit"), **earlier["summaries"][c]}
            runs[c] = _records(earlier["curves"][c])
            row.update({k: v for k, v in prev.items() if k.startswith((c, f"step_ms_{c}"))})
        if "dense" in kept:
            for k in ("device", "torch", "train_split_tokens", "epochs", "dense_val"):
                row[k] = prev.get(k)
        if scan_steps == 0:  # the scan's timing and gradient check, when this call does not redo them
            for k, v in prev.items():
                if "scan_" in k or k.startswith("grad_check"):
                    row[k] = v
            summaries.update({c: v for c, v in earlier["summaries"].items() if c.startswith("lbi_r16_scan_")})
        row["kept_from_earlier_call"] = kept
        _gaps(row, summaries)

    def save() -> None:
        curves = {case: [[r["step"], r.get("train_loss"), r.get("val_loss")] for r in recs]
                  for case, recs in runs.items()}  # the plot's data, so it can be redrawn anywhere
        payload = {"scale": "full", "command": command, "commit": os.environ.get("CHAINFREE_GIT_COMMIT"),
                   "overrides": overrides, "repro": repro, "rows": [row], "tokens_per_step": tokens_per_step,
                   "summaries": summaries, "curves": curves}
        write_result(out, name, payload, full_markdown(row))
        if runs:
            title = f"LBI vs dense, {arch} ({row['params'] / 1e6:.1f}M block params)"
            try:
                _plot_vs_tokens(runs, tokens_per_step, out / f"{name}.png", title)
            except ImportError as e:  # no matplotlib on the GPU image: redraw from the JSON's curves later
                print(f"plot skipped: {e}", flush=True)

    for case in case_names:
        cfg = load_config(f"{arch}-50m", [*base, *FULL_CASES[case]])
        t0 = time.perf_counter()
        summary = train(cfg, out / arch / case, progress=False)
        summary["wall_s"] = time.perf_counter() - t0
        summary["commit"] = os.environ.get("CHAINFREE_GIT_COMMIT")  # cases kept across calls may differ
        summaries[case] = summary
        runs[case] = read_metrics(out / arch / case / "metrics.jsonl")
        row[f"{case}_val"] = summary["final_val_loss"]
        row[f"step_ms_{case}"] = 1000 * summary["step_time_s"]
        if case == "dense":
            row["device"] = summary["device"]
            row["torch"] = summary["torch"]
            train_tokens = _train_split_tokens(cfg)
            row["train_split_tokens"] = train_tokens
            row["epochs"] = row["tokens"] / train_tokens if train_tokens else None
        _gaps(row, summaries)
        print(f"[{arch}] {case}: val {summary['final_val_loss']:.4f}, {1000 * summary['step_time_s']:.1f} ms/step, "
              f"{summary['wall_s']:.0f} s", flush=True)
        save()
    row["lbi_r16_val"] = row.get("lbi_r16_val")
    row["paper_leaky_val"] = row.get("paper_leaky_r16_val")
    row["gap_r16"] = row.get("gap_lbi_r16")
    save()
    # the scan backward's own training step (LBI's algorithm), timed beside the autograd rows
    for jac in ("vjp", "prefix") if scan_steps > 0 else ():
        cfg = load_config(f"{arch}-50m", [*base, *FULL_CASES["lbi_r16"], "method.backward=scan",
                                          f"method.jacobian={jac}", f"train.steps={scan_steps}",
                                          f"train.eval_every={scan_steps}", "train.eval_batches=1",
                                          f"train.ckpt_every={10 * scan_steps}"])
        if jac == "prefix" and cfg.train.compile:  # compiled blocks run 'prefix' as 'loop', i.e. as 'vjp' there
            row["scan_prefix_note"] = "not timed: with compiled blocks jacobian='prefix' runs as 'loop', like 'vjp'"
            continue
        try:
            summary = train(cfg, out / arch / f"lbi_r16_scan_{jac}", progress=False)
            summary["commit"] = os.environ.get("CHAINFREE_GIT_COMMIT")
            summaries[f"lbi_r16_scan_{jac}"] = summary
            row[f"step_ms_lbi_r16_scan_{jac}"] = 1000 * summary["step_time_s"]
            row[f"scan_{jac}_over_dense"] = summary["step_time_s"] * 1000 / row["step_ms_dense"]
            print(f"[{arch}] scan ({jac}): {1000 * summary['step_time_s']:.1f} ms/step", flush=True)
        except torch.OutOfMemoryError as e:  # recorded, not hidden
            row[f"step_ms_lbi_r16_scan_{jac}"] = f"out of memory: {str(e)[:120]}"
        save()
    if scan_steps > 0:
        cfg = load_config(f"{arch}-50m", [*base, *FULL_CASES["lbi_r16"]])
        row.update(_grad_check(cfg))
        save()
    print(full_markdown(row), flush=True)
    return row


def _gaps(row: dict[str, Any], summaries: dict[str, Any]) -> None:
    """Each LBI case's val loss minus dense's, and the device and commit of every case (recomputed whenever
    cases are added, so a dense row re-run in a later call is the one every gap uses)."""
    row["case_devices"] = {c: f"{v.get('device')} @ {v.get('commit')}" for c, v in summaries.items()}
    if row.get("dense_val") is None:
        return
    for case in summaries:
        if case in FULL_CASES and case != "dense" and f"{case}_val" in row:
            key = "gap_paper_leaky" if case == "paper_leaky_r16" else f"gap_{case}"
            row[key] = row[f"{case}_val"] - row["dense_val"]


def _records(curve: list[list[Any]]) -> list[dict[str, Any]]:
    """A result's stored curve ([step, train, val] rows, None where absent) as metrics records."""
    return [{"step": st, **({"train_loss": tr} if tr is not None else {}),
             **({"val_loss": va} if va is not None else {})} for st, tr, va in curve]


def _earlier_run(path: Path, overrides: list[str], steps: int) -> dict[str, Any] | None:
    """An earlier result at `path` made with the same overrides and step count (its finished cases can be
    kept), or None. A result with other settings is never mixed in: it is named and left alone."""
    import json

    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    if payload.get("overrides") != overrides or payload["rows"][0].get("steps") != steps:
        print(f"repro.keep: {path} was made with other settings; its cases are not kept", flush=True)
        return None
    return payload


def _train_split_tokens(cfg: Any) -> int | None:
    from chainfree.data.tokens import load_tokens

    try:
        return len(load_tokens(cfg.data).train)
    except Exception:  # noqa: BLE001 - the count is a label, never worth failing a finished run
        return None


def _fmt(v: Any, spec: str = ".4f") -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec) if math.isfinite(v) else "nan"
    return "—" if v is None else str(v)


def full_markdown(row: dict[str, Any]) -> str:
    """The one-row table of a full-scale run, beside the paper's gap."""
    g = row.get
    lines = [
        f"# LBI at the paper's scale: {g('arch')} ({_fmt(g('params'), ',')} block parameters)",
        "",
        "| arch | block params | tokens (epochs) | dense val | LBI r=16 val (gap) | paper_leaky r=16 val (gap) "
        "| paper gap r=16 |",
        "|---|---|---|---|---|---|---|",
        f"| {g('arch')} | {_fmt(g('params'), ',')} | {_fmt(g('tokens'), ',')} ({_fmt(g('epochs'), '.2f')}) "
        f"| {_fmt(g('dense_val'))} | {_fmt(g('lbi_r16_val'))} ({_fmt(g('gap_r16'), '+.4f')}) "
        f"| {_fmt(g('paper_leaky_val'))} ({_fmt(g('gap_paper_leaky'), '+.4f')}) | 0.16–0.35 |",
        "",
        "Training step (median ms, incl. clip + fused AdamW, bf16 autocast on CUDA):",
        "",
        "| dense | LBI r=16 autograd | paper_leaky autograd | LBI r=16 scan (vjp) | LBI r=16 scan (prefix) |",
        "|---|---|---|---|---|",
        f"| {_fmt(g('step_ms_dense'), '.1f')} | {_fmt(g('step_ms_lbi_r16'), '.1f')} "
        f"| {_fmt(g('step_ms_paper_leaky_r16'), '.1f')} | {_fmt(g('step_ms_lbi_r16_scan_vjp'), '.1f')} "
        f"({_fmt(g('scan_vjp_over_dense'), '.1f')}× dense) | {_fmt(g('step_ms_lbi_r16_scan_prefix'), '.1f')} "
        f"({_fmt(g('scan_prefix_over_dense'), '.1f')}× dense) |",
        *([f"Scan (prefix): {g('scan_prefix_note')}."] if g("scan_prefix_note") else []),
        "",
        "Extra cases: " + (", ".join(f"{k[:-4]} {_fmt(v)}" for k, v in row.items()
                                       if k.endswith("_val") and k.startswith(("lbi_r4", "lbi_r64", "token")))
                            or "none") + ".",
        *([f"Cases kept from an earlier call with the same settings (repro.keep=1): "
           f"{', '.join(g('kept_from_earlier_call'))}; device @ commit of each case: "
           + ", ".join(f"{c} {d}" for c, d in (g("case_devices") or {}).items()) + "."]
          if g("kept_from_earlier_call") else []),
        f"Scan vs autograd gradients on one batch, fp32, this device: max relative error "
        f"{_fmt(g('grad_check_max_rel_err_fp32'), '.2e')} (float64 CPU tests: <= 1e-10).",
        "",
        f"Same seed, data order and tokens for every case; data: {g('data')} (pystdlib = a Python standard "
        f"library's source, split by file; BPE 8192); batch {g('batch')}; regions of 2 layers; causal LBI = C1 "
        "with C = 4 chunks (the method's defaults). Quality rows are "
        "trained with method.backward=autograd, whose gradients equal the scan's (exact both ways). The paper's "
        "0.16–0.35 is on FineWeb-Edu after 20k steps with the non-causal pooled message, not this budget.",
    ]
    return "\n".join(lines)


def plot_json(path: Path) -> Path:
    """Redraw a full-scale result's loss-vs-tokens PNG from its JSON (`curves`), beside it."""
    import json

    payload = json.loads(Path(path).read_text())
    row = payload["rows"][0]
    runs = {case: _records(recs) for case, recs in payload["curves"].items()}
    png = Path(path).with_suffix(".png")
    _plot_vs_tokens(runs, payload["tokens_per_step"], png,
                    f"LBI vs dense, {row['arch']} ({row['params'] / 1e6:.1f}M block params)")
    return png


def _command_line() -> str:
    """What was typed: `chainfree ...` for the console script, `python -m chainfree.reproduce.lbi ...` for this
    module run directly (whose argv[0] is its file path), else the argv as it is."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0])
    if prog.name == "chainfree":
        return " ".join(["chainfree", *sys.argv[1:]])
    if prog.parts[-3:] == ("chainfree", "reproduce", "lbi.py"):
        return " ".join(["python -m chainfree.reproduce.lbi", *sys.argv[1:]])
    return " ".join(sys.argv)


def main(argv: list[str] | None = None) -> None:
    """`python -m chainfree.reproduce.lbi --out DIR [--device D] [--set KEY=VALUE ...]`: the same as
    `chainfree reproduce lbi --scale full ...` without the CLI's dependencies (typer), for bare GPU images;
    `--plot JSON` redraws a result's PNG from its JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m chainfree.reproduce.lbi")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    if args.plot:
        print(plot_json(args.plot))
        return
    if args.out is None:
        ap.error("--out is required")
    run_full(args.out, args.device, args.sets)


if __name__ == "__main__":
    main()
