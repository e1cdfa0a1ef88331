"""Reproduce HBLL's claims at our scale: exact backprop vs HBLL vs flat block-local.

Parts (select with `--set hbll.parts=speed,vision,lm,rnn`; all by default):
  speed   critical path (counted by the step) and wall time per step vs depth N, exact vs HBLL
          (GPT blocks and residual-MLP blocks); on CUDA the tree's rounds run as batched vmap calls.
  vision  Fashion-MNIST (Debian `dataset-fashion-mnist`), residual MLP: exact, flat block-local, HBLL;
          test accuracy, and HBLL's accuracy for every sub-network depth (flat: every block's readout).
  lm      GPT on the bundled Shakespeare corpus through chainfree.train.train (THE loop): exact, flat
          block-local and the HBLL variants (knob hbll.methods; a diverged run is reported, not fatal).
  rnn     character GRU: full BPTT vs truncated BPTT vs the time-tree, same batches and steps.
Every part trains in the one Trainer: lm through chainfree.train.train on token data, vision and rnn
through `fit` (the Trainer on their own batches, models from the model factory: kinds 'vision', 'char_rnn').

Scales: small (CPU, minutes; tiny models, few steps: checks the pipeline, not the claims) and full (one
GPU). Other `--set hbll.<key>=value` override the scale's knobs (e.g. hbll.vision_steps=300).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chainfree.bench.critical_path import count_exact_critical_path
from chainfree.bench.hbll import SPEED_SCALES, speed_sweep
from chainfree.bench.report import markdown_table, write_result
from chainfree.logging import pyplot, save_figure
from chainfree.methods.base import Method
from chainfree.methods.exact import Exact
from chainfree.methods.hbll import HBLL, FlatBlockLocal, HBLLConfig
from chainfree.models.hbll_tree import HBLLTree

# HBLL as configured by default (paired leaves, weak top-down message); without the message (leaves trained
# by their readout CE only: critical path log2 N + 2); without pairing and with message weight 1 (shows what
# pairing and the weak message contribute); and with one fixed-point sweep (free on the critical path for
# N >= 4, one more leaf round of compute; docs/hbll.md compares them)
HBLL_VARIANTS = {
    "hbll": HBLLConfig(),
    "hbll_local": HBLLConfig(global_weight=0.0),
    "hbll_v0": HBLLConfig(pair_leaves=False, global_weight=1.0),
    "hbll_fix1": HBLLConfig(corrections=1),
}


def method_overrides(cfg: HBLLConfig) -> list[str]:
    """`method.key=value` for every field of cfg that differs from the default HBLLConfig (for chainfree.train)."""
    base = HBLLConfig()
    return [f"method.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(base, f.name)]

SCALES: dict[str, dict[str, Any]] = {
    "small": {
        "parts": "speed,vision,lm,rnn",
        "methods": "exact,flat_bll,hbll,hbll_local,hbll_v0,hbll_fix1",  # vision and lm: baselines and HBLL_VARIANTS
        **SPEED_SCALES["small"],
        "vision_d": 64,
        "vision_layers": 4,
        "vision_steps": 300,
        "vision_batch": 128,
        "vision_lr": 3e-3,
        "vision_test": 2000,
        "lm_overrides": "model.d_model=64,model.n_layers=4,model.n_heads=4,model.seq_len=64,data.tokenizer=bytes,"
        "data.max_chars=400000,train.steps=300,train.batch_size=16,train.lr=3e-3,train.warmup_steps=20,"
        "train.eval_every=100,train.eval_batches=8,train.ckpt_every=300",
        "rnn_d": 64,
        "rnn_seq": 128,
        "rnn_chunk": 16,
        "rnn_window": 8,
        "rnn_steps": 300,
        "rnn_batch": 16,
        "rnn_lr": 3e-3,
    },
    "full": {
        "parts": "speed,vision,lm,rnn",
        "methods": "exact,flat_bll,hbll,hbll_local,hbll_v0,hbll_fix1",  # vision and lm: baselines and HBLL_VARIANTS
        **SPEED_SCALES["full"],
        "vision_d": 256,
        "vision_layers": 8,
        "vision_steps": 2000,
        "vision_batch": 128,
        "vision_lr": 1e-3,
        "vision_test": 10000,
        "lm_overrides": "model.d_model=256,model.n_layers=8,model.n_heads=4,model.seq_len=128,data.tokenizer=bpe,"
        "data.bpe_vocab_size=4096,train.steps=800,train.batch_size=32,train.lr=1e-3,train.warmup_steps=50,"
        "train.eval_every=200,train.eval_batches=16,train.ckpt_every=800",
        "rnn_d": 256,
        "rnn_seq": 256,
        "rnn_chunk": 32,
        "rnn_window": 16,
        "rnn_steps": 800,
        "rnn_batch": 32,
        "rnn_lr": 2e-3,
    },
}


def _knobs(scale: str, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    knobs, rest = dict(SCALES[scale]), []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("hbll."):
            name = key.removeprefix("hbll.")
            if name not in knobs:
                raise ValueError(f"--set {key}: unknown knob; choose from {', '.join('hbll.' + k for k in knobs)}")
            default = knobs[name]
            knobs[name] = type(default)(value) if not isinstance(default, str) else value
        else:
            rest.append(item)
    return knobs, rest


def _methods(knobs: dict[str, Any]) -> list[str]:
    """The compared methods of the vision and lm parts (knob hbll.methods); exact first (the reference)."""
    names = [n for n in knobs["methods"].split(",") if n]
    known = ("exact", "flat_bll", *HBLL_VARIANTS)
    bad = [n for n in names if n not in known]
    if bad or not names or names[0] != "exact":
        raise ValueError(
            f"hbll.methods={knobs['methods']!r}: give a comma list starting with exact, from {', '.join(known)}"
        )
    return names


# ----------------------------------------------------------------------------------------- fit (vision)
def fit(method: Method, model: torch.nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        steps: int, lr: float, device: torch.device) -> dict[str, Any]:
    """Train `model` (built, seeded, on `device`) with `method` in the Trainer: AdamW without weight decay
    (betas 0.9, 0.999), linear warmup over 5% of the steps, cosine to 10% of lr, grad clip 1.0. Returns the
    mean train loss of the last 20 steps, the median step time (after 2 warm-up steps), the last step's
    critical path and the loss curve. The trained model is `model` itself (or its prepared wrapper:
    `method.prepare` returns an already prepared model unchanged)."""
    from chainfree.config import TrainConfig
    from chainfree.training import Callback, Trainer

    losses: list[float] = []
    crit = [0.0]

    class Record(Callback):
        def on_step_end(self, trainer, state, record):
            losses.append(record["train_loss"])
            crit[0] = record.get("critical_path", crit[0])

    tc = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1, weight_decay=0.0,
                     beta2=0.999, grad_clip=1.0, device=str(device))
    trainer = Trainer(tc, method, device=device, strategy="single", callbacks=[Record()])
    state = trainer.fit(trainer.setup(model), batches)
    timed = sorted(state.step_times[2:] or state.step_times)
    return {"final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "step_ms": 1000 * timed[len(timed) // 2],
            "critical_path": crit[0], "losses": losses}


@torch.no_grad()
def _accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for s in range(0, len(x), 1000):
        correct += int((logits_fn(x[s : s + 1000]).argmax(-1) == y[s : s + 1000]).sum())
    return correct / len(x)


def vision_part(knobs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from chainfree.config import ModelConfig
    from chainfree.data.vision import load_fashion_mnist
    from chainfree.models import build_model

    data = load_fashion_mnist()
    tx, ty, vx, vy = data.to_tensors(device)
    vx, vy = vx[: knobs["vision_test"]], vy[: knobs["vision_test"]]
    n_layers = knobs["vision_layers"]

    def batches(step: int):
        g = torch.Generator().manual_seed(10_000 + step)
        idx = torch.randint(0, len(tx), (knobs["vision_batch"],), generator=g).to(device)
        return tx[idx], ty[idx]

    rows, subs, curves = [], [], {}
    methods: list[tuple[str, Method]] = [(name, Exact() if name == "exact" else FlatBlockLocal() if name == "flat_bll"
                                          else HBLL(HBLL_VARIANTS[name])) for name in _methods(knobs)]
    for name, method in methods:
        torch.manual_seed(0)
        model = method.prepare(build_model(ModelConfig(kind="vision", in_features=784, n_classes=10,
                                                       d_model=knobs["vision_d"], n_layers=n_layers)).to(device))
        res = fit(method, model, batches, knobs["vision_steps"], knobs["vision_lr"], device)
        curves[name] = res.pop("losses")
        if name == "exact":  # counted with hooks on one more step (gradients discarded)
            res["critical_path"] = count_exact_critical_path(model, *batches(0))
            model.zero_grad(set_to_none=True)
        model.eval()
        acc = _accuracy(model, vx, vy)
        rows.append({"method": name, "test_acc": acc, **res})
        if isinstance(model, HBLLTree):
            for sub, depth in model.subnetworks():
                def sub_logits(x, s=sub, tree=model):
                    return tree.model.head(tree.model.norm(tree.subnetwork_hidden(x, s)))
                a = _accuracy(sub_logits, vx, vy)
                subs.append({"method": name, "subnetwork": sub, "depth": depth, "test_acc": a})
        elif name == "flat_bll":
            for i in range(n_layers - 1):  # flat sub-networks: the first i+1 blocks and block i's readout
                def logits(x, i=i, flat=model):
                    z = flat.model.embed(x)
                    for leaf in flat.leaves[: i + 1]:
                        z = leaf(z)
                    aux = flat.aux[i]
                    return aux.linear(aux.norm(z))
                subs.append({"method": "flat_bll", "subnetwork": f"block{i}", "depth": i + 1,
                             "test_acc": _accuracy(logits, vx, vy)})
            subs.append({"method": "flat_bll", "subnetwork": "chain", "depth": n_layers, "test_acc": acc})
    exact = next(r for r in rows if r["method"] == "exact")
    for r in rows:
        r["acc_vs_exact"] = r["test_acc"] - exact["test_acc"]
    return {"rows": rows, "subnetworks": subs, "curves": curves, "source": data.source}


# ---------------------------------------------------------------------------------------------------- lm
def lm_part(knobs: dict[str, Any], device: torch.device, out: Path, rest: list[str]) -> dict[str, Any]:
    from chainfree.config import load_config
    from chainfree.logging import read_metrics
    from chainfree.train import train

    base = [s for s in knobs["lm_overrides"].split(",") if s] + rest + [f"train.device={device.type}"]
    rows, curves = [], {}
    for name in _methods(knobs):
        method = name if name in ("exact", "flat_bll") else "hbll"
        extra = method_overrides(HBLL_VARIANTS[name]) if method == "hbll" else []
        cfg = load_config(None, base + extra, model="gpt", method=method)
        try:
            summary = train(cfg, out / f"lm_{name}", progress=False)
        except FloatingPointError as e:  # a diverged run is a result too; the other methods still run
            rows.append({"method": name, "val_loss": float("nan"), "error": str(e)})
            curves[name] = []
            continue
        metrics = read_metrics(out / f"lm_{name}" / "metrics.jsonl")
        curves[name] = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
        crit = next((r["critical_path"] for r in reversed(metrics) if "critical_path" in r), None)
        rows.append({"method": name, "val_loss": summary["final_val_loss"], "train_loss": summary["final_train_loss"],
                     "step_ms": 1000 * summary["step_time_s"], "critical_path": crit,
                     "unigram": summary["unigram_entropy"]})
    exact = rows[0]
    from chainfree.models.lm import LanguageModel

    ids = torch.randint(0, cfg.model.vocab_size, (1, 9))
    exact["critical_path"] = count_exact_critical_path(LanguageModel(cfg.model), ids[:, :-1], ids[:, 1:])
    for r in rows:
        r["ce_vs_exact"] = r["val_loss"] - exact["val_loss"]
    return {"rows": rows, "curves": curves}


# --------------------------------------------------------------------------------------------------- rnn
def rnn_part(knobs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from chainfree.config import DataConfig, ModelConfig
    from chainfree.data import BatchSampler, load_tokens
    from chainfree.methods.hbll_rnn import TBPTT, HBLLTime, TBPTTConfig, TimeTreeConfig
    from chainfree.models import build_model

    data = load_tokens(DataConfig(tokenizer="bytes", max_chars=2_000_000))
    T, B = knobs["rnn_seq"], knobs["rnn_batch"]
    sampler = BatchSampler(data, B, T, seed=0)

    def batches(step: int):
        x, y = sampler.batch("train", step)
        return x.to(device), y.to(device)

    rows, curves = [], {}
    chunk = knobs["rnn_chunk"]
    methods: dict[str, Method] = {
        "bptt": Exact(),
        "tbptt": TBPTT(TBPTTConfig(chunk=chunk)),
        "hbll_time": HBLLTime(TimeTreeConfig(chunk=chunk, window=knobs["rnn_window"]), seq_len=T),
    }
    for name, method in methods.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind="char_rnn", vocab_size=256, d_model=knobs["rnn_d"], seq_len=T))
        model = model.to(device)
        res = fit(method, method.prepare(model), batches, knobs["rnn_steps"], knobs["rnn_lr"], device)
        if name == "bptt":  # full backprop through time: T forward + T backward cell steps
            res["critical_path"] = 2.0 * T
        curves[name] = res.pop("losses")
        with torch.no_grad():
            val = sum(float(model(*(t.to(device) for t in sampler.batch("val", i)))) for i in range(8)) / 8
        rows.append({"method": name, "val_loss": val, **res})
    ref = rows[0]
    for r in rows:
        r["ce_vs_bptt"] = r["val_loss"] - ref["val_loss"]
    return {"rows": rows, "curves": curves, "seq_len": T, "chunk": chunk}


# ---------------------------------------------------------------------------------------------- report
def _plots(out: Path, results: dict[str, Any]) -> None:
    plt = pyplot()

    if "speed" in results:
        rows = results["speed"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for arch, style in (("gpt", "-"), ("mlp", "--")):
            for method in ("exact", "hbll"):
                rs = [r for r in rows if r["arch"] == arch and r["method"] == method]
                ns = [r["layers"] for r in rs]
                axes[0].plot(ns, [r["critical_path"] for r in rs], style, marker="o", label=f"{arch} {method}")
                axes[1].plot(ns, [r["step_ms"] for r in rs], style, marker="o", label=f"{arch} {method}")
        for ax, ylabel in zip(axes, ("critical path (sequential layer evals)", "step wall time (ms)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("layers N")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        save_figure(fig, out / "hbll_speed.png")
    if "vision" in results:
        subs = results["vision"]["subnetworks"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for method in sorted({r["method"] for r in subs}):
            rs = sorted((r for r in subs if r["method"] == method and r["subnetwork"] != "tree"),
                        key=lambda r: r["depth"])
            ax.plot([r["depth"] for r in rs], [r["test_acc"] for r in rs], marker="o", label=method)
        exact = next(r for r in results["vision"]["rows"] if r["method"] == "exact")
        ax.axhline(exact["test_acc"], color="k", ls=":", label="exact (full depth)")
        ax.set_xlabel("effective depth (layers)")
        ax.set_ylabel("test accuracy")
        ax.legend()
        save_figure(fig, out / "hbll_subnetworks.png")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, part, title in zip(axes, ("vision", "lm", "rnn"), ("vision train CE", "LM val CE", "char-GRU train CE"),
                               strict=True):
        if part not in results:
            ax.set_visible(False)
            continue
        for name, curve in results[part]["curves"].items():
            if curve and isinstance(curve[0], (list, tuple)):
                ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=name)
            else:
                k = max(1, len(curve) // 100)
                ax.plot(range(0, len(curve), k), [sum(curve[i : i + k]) / len(curve[i : i + k])
                                                  for i in range(0, len(curve), k)], label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    save_figure(fig, out / "hbll_curves.png")


def _markdown(results: dict[str, Any], scale: str) -> str:
    parts = [f"# HBLL reproduction ({scale} scale)\n"]
    if "speed" in results:
        parts.append("## Critical path and step wall time vs depth\n")
        parts.append(markdown_table(results["speed"], [("arch", "arch"), ("layers", "N"), ("method", "method"),
                                                       ("critical_path", "critical path"), ("step_ms", "step ms"),
                                                       ("step_ms_min", "min"), ("time_vs_exact", "time / exact"),
                                                       ("train_step_ms", "train step ms (+clip+AdamW)"),
                                                       ("train_step_ms_min", "min"),
                                                       ("train_time_vs_exact", "train / exact"),
                                                       ("peak_gib", "peak GiB")]))
    if "vision" in results:
        parts.append(f"\n\n## Vision ({results['vision']['source']})\n")
        parts.append(markdown_table(results["vision"]["rows"], [("method", "method"), ("test_acc", "test acc"),
                                                                ("acc_vs_exact", "acc - exact"),
                                                                ("final_train_loss", "train CE"),
                                                                ("critical_path", "critical path"),
                                                                ("step_ms", "step ms")]))
        parts.append("\n\n### Sub-networks (accuracy vs effective depth)\n")
        parts.append(markdown_table(results["vision"]["subnetworks"], [("method", "method"),
                                                                       ("subnetwork", "sub-network"),
                                                                       ("depth", "depth"), ("test_acc", "test acc")]))
    if "lm" in results:
        parts.append("\n\n## Language model (GPT, Shakespeare)\n")
        parts.append(markdown_table(results["lm"]["rows"], [("method", "method"), ("val_loss", "val CE"),
                                                            ("ce_vs_exact", "CE - exact"), ("unigram", "unigram CE"),
                                                            ("critical_path", "critical path"),
                                                            ("step_ms", "step ms")]))
    if "rnn" in results:
        r = results["rnn"]
        parts.append(f"\n\n## Recurrent: char GRU, T={r['seq_len']}, chunk={r['chunk']}\n")
        parts.append(markdown_table(r["rows"], [("method", "method"), ("val_loss", "val CE (full sequence)"),
                                                ("ce_vs_bptt", "CE - BPTT"), ("critical_path", "critical path"),
                                                ("step_ms", "step ms")]))
    return "\n".join(parts)


def run(out: Path, scale: str, device: str, overrides: list[str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    knobs, rest = _knobs(scale, overrides)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    parts = [p for p in knobs["parts"].split(",") if p]
    results: dict[str, Any] = {}
    for part in parts:
        t0 = time.perf_counter()
        if part == "speed":
            results["speed"] = speed_sweep(knobs, dev)
        elif part == "vision":
            results["vision"] = vision_part(knobs, dev)
        elif part == "lm":
            results["lm"] = lm_part(knobs, dev, out, rest)
        elif part == "rnn":
            results["rnn"] = rnn_part(knobs, dev)
        else:
            raise ValueError(f"hbll.parts: unknown part {part!r}; choose from speed, vision, lm, rnn")
        print(f"[hbll] {part} done in {time.perf_counter() - t0:.1f}s", flush=True)
        (out / "hbll_partial.json").write_text(json.dumps(results, default=str))
    _plots(out, results)
    payload = {"scale": scale, "device": str(dev), "knobs": knobs, "results": results,
               "command": f"chainfree reproduce hbll --scale {scale} --device {dev.type} "
               + " ".join(f"--set {o}" for o in overrides)}
    write_result(out, "hbll", payload, _markdown(results, scale))
