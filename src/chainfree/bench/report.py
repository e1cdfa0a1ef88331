"""Markdown tables, PNG plots and environment records shared by `chainfree compare` and every `chainfree bench`.

Every result records where it was measured (device, torch/triton versions, git commit), because a ratio
without its machine is not a result. Plots: loss curves (compare), a ratio against sequence length
(speed/memory sweeps), and variance per parameter group (fidelity).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from chainfree.logging import pyplot, save_figure

SDPA_OPS = {  # ATen op SDPA dispatched to -> backend name
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def sdpa_backends(fn: Any) -> dict[str, Any]:
    """Run `fn()` once and record which SDPA backends ran: the number of F.scaled_dot_product_attention calls
    (a function mode sees them) and the ATen kernels they dispatched to (a dispatch mode sees those). A call
    that reaches no fused kernel ran the math fallback; no call at all means the model used other attention
    (SUS, or none: Mamba)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.n += 1
            return func(*args, **(kwargs or {}))

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = SDPA_OPS.get(func.overloadpacket.__name__)
            if name is not None:
                self.seen[name] = self.seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Calls() as calls, Kernels() as kernels:
        fn()
    backends = sorted(kernels.seen)
    fused = sum(kernels.seen.values())
    if calls.n and not fused:
        backends = ["math"]
    if not calls.n and not fused:
        backends = ["none (no SDPA call)"]
    return {"sdpa_calls": calls.n, "backends": backends, "kernel_calls": kernels.seen}


def sdpa_probe(device: str | None = None) -> dict[str, Any]:
    """The backend SDPA's default dispatch picks on this machine for a typical causal training shape
    (B=2, H=8, T=512, D=64; bf16 on CUDA, fp32 on CPU). Results that ran a model record their own backends."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    try:
        q = torch.randn(2, 8, 512, 64, device=dev, dtype=dtype, requires_grad=True)
        import torch.nn.functional as F

        return {"shape": "B2 H8 T512 D64 " + str(dtype).removeprefix("torch."),
                **sdpa_backends(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())}
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:160]}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["git_commit"], env["git_dirty"] = _git_state()
    env["sdpa_default_dispatch"] = sdpa_probe()
    return env


def _git_state() -> tuple[str | None, bool | None]:
    """Short commit of the source tree and whether tracked files differ from it; CHAINFREE_GIT_COMMIT, when set,
    names the commit instead (a copied tree on a GPU machine may carry no .git, or a stale one)."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                                timeout=5).stdout.strip() or None
        dirty = None
        if commit:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                                    capture_output=True, text=True, cwd=here, timeout=10).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    if os.environ.get("CHAINFREE_GIT_COMMIT"):  # set by whoever shipped the tree: wins over a stale .git there
        commit = os.environ["CHAINFREE_GIT_COMMIT"]
    return commit, dirty


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """columns: (key, header) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_result(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write NAME.json (payload + environment) and NAME.md side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    env = payload["environment"]
    dirty = " (+ uncommitted changes)" if env.get("git_dirty") else ""
    footer = (f"\n\nDevice: {env['cuda_device'] or 'CPU (' + str(env['cpu_threads']) + ' threads)'}; "
              f"torch {env['torch']}; triton {env['triton']}; commit {env['git_commit']}{dirty}.\n")
    sdpa = env.get("sdpa_default_dispatch") or {}
    if sdpa.get("backends"):
        footer += f"SDPA default dispatch here: {', '.join(sdpa['backends'])} ({sdpa.get('shape')}).\n"
    if payload.get("command"):
        footer += f"Command: `{payload['command']}`\n"
    md_path.write_text(markdown + footer)
    return json_path, md_path


def _mem_key(row: dict[str, Any]) -> int | None:
    """The memory figure the frontier uses: activation bytes where measured, else the step's peak."""
    mem = row.get("memory") or {}
    for key in ("activation_bytes", "peak_bytes"):
        if mem.get(key) is not None:
            return int(mem[key])
    return row.get("training_peak_memory_bytes")


def dominated_by(results: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """For each non-exact entry, the exact-baseline entries (exact, exact+ckpt, ...) at least as good on
    final val loss, step time and memory, and strictly better on one. Memory counts only where both have it."""
    out: dict[str, list[str]] = {}
    bases = [k for k, r in results.items() if r.get("is_exact", k.split("+")[0] == "exact")]
    for name, r in results.items():
        if name in bases:
            continue
        found = []
        for b in bases:
            base = results[b]
            axes = [(base["final_val_loss"], r["final_val_loss"]), (base["step_time_s"], r["step_time_s"])]
            mb, mr = _mem_key(base), _mem_key(r)
            if mb is not None and mr is not None:
                axes.append((mb, mr))
            if any(not (isinstance(x, int | float) and math.isfinite(x)) for pair in axes for x in pair):
                continue
            if all(x <= y for x, y in axes) and any(x < y for x, y in axes) and len(axes) == 3:
                found.append(b)
        if found:
            out[name] = found
    return out


def compare_rows(results: dict[str, dict[str, Any]], baseline: str = "exact") -> list[dict[str, Any]]:
    """One row per entry with differences and ratios against the baseline run of the same comparison."""
    base = results.get(baseline)
    dominated = dominated_by(results)
    rows = []
    for name, s in results.items():
        mem = s.get("memory") or {}
        peak = mem.get("peak_bytes", s.get("training_peak_memory_bytes", s.get("peak_memory_bytes")))
        row: dict[str, Any] = {
            "method": name, "val_loss": s["final_val_loss"], "train_loss": s.get("final_train_loss"),
            "step_time_s": s["step_time_s"], "peak_memory_mib": peak / 2**20 if peak else None,
            "activation_mib": mem["activation_bytes"] / 2**20 if mem.get("activation_bytes") is not None else None,
            "sdpa": ", ".join((mem.get("sdpa") or {}).get("backends", [])) or None,
            "dominated_by": ", ".join(dominated.get(name, [])) or None,
        }
        if s.get("step_time_p10_s") is not None:
            row["step_spread"] = f"{s['step_time_p10_s']:.3g}-{s['step_time_p90_s']:.3g}"
        if s.get("unigram_entropy") is not None:
            row["below_unigram"] = s["unigram_entropy"] - s["final_val_loss"]
        if base is not None:
            row["delta_val"] = s["final_val_loss"] - base["final_val_loss"]
            row["time_ratio"] = s.get("time_ratio", s["step_time_s"] / base["step_time_s"])
            if s.get("time_ratio_min") is not None and name != baseline:
                row["ratio_range"] = f"{s['time_ratio_min']:.2f}-{s['time_ratio_max']:.2f}"
                row["noise"] = "within noise" if s.get("time_ratio_within_noise") else None
            bm = base.get("memory") or {}
            for key, out_key in (("peak_bytes", "peak_ratio"), ("activation_bytes", "activation_ratio")):
                if mem.get(key) is not None and bm.get(key):
                    row[out_key] = mem[key] / bm[key]
        rows.append(row)
    return rows


COMPARE_COLUMNS = [("method", "method"), ("val_loss", "final val loss"), ("delta_val", "Δ val vs exact"),
                   ("below_unigram", "below unigram"), ("step_time_s", "step time (s, median)"),
                   ("step_spread", "p10-p90 (s)"), ("time_ratio", "time ratio vs exact"),
                   ("ratio_range", "ratio per round (min-max)"), ("noise", "noise"),
                   ("peak_memory_mib", "peak MiB"), ("activation_mib", "activation MiB"),
                   ("activation_ratio", "activation ratio"), ("sdpa", "SDPA backend"),
                   ("dominated_by", "dominated by")]

READING_GUIDE = """## How to read this

* **final val loss**: mean cross-entropy (nats/token) on fixed val batches, the same for every entry.
  *below unigram* is how far it is under the unigram entropy -- the loss of a model that ignores context and
  predicts token frequencies; an entry at or above that line has learned nothing about context yet.
  *Δ val vs exact*: negative = better than exact backprop at the same steps and tokens.
* **step time**: median over steps of one optimizer step (method step, clip, AdamW; evaluation excluded),
  with its 10th-90th percentile. Entries train interleaved, one span of steps in turn for {rounds} rounds, so
  machine load hits all alike; *time ratio* is the median over rounds of the per-round ratio to exact, and
  *within noise* means the rounds disagreed on whether it is faster or slower than exact -- treat it as parity.
* **memory**: *peak* is the most memory one training step holds; *activation* = peak - weights - gradients -
  optimizer state, the part the methods (and activation checkpointing) change. {memory_note}
* **the frontier** (`memory_time.png`): one point per entry, activation memory against step time; down-left is
  better. A method is worth its approximation only where it beats the exact baselines (`exact+ckpt`,
  `exact+sac`, `exact+compile`, ...) on some axis; **dominated by** names an exact baseline that is at least
  as good on loss, time and memory.
* **this machine**: losses are deterministic for a given torch build, device and thread count; times and memory
  are those of the machine named at the bottom, and a run elsewhere (or under other load) gives other times.
* Plots: `loss_vs_tokens.png` (learning per token: the gradient quality), `loss_vs_time.png` (learning per
  second: what a user waits for; training steps only, the first step of each resumed round counted as a median
  step), `loss.png` (per step).
"""


def _curve_plot(runs: dict[str, list[dict[str, Any]]], xs: dict[str, list[float]], path: Path, title: str,
                xlabel: str, unigram: float | None) -> None:
    """Val loss (markers) and train loss (thin) against a per-step x (tokens or seconds), unigram line drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        x = xs[name]
        train = [(x[r["step"] - 1], r["train_loss"]) for r in records if r["step"] - 1 < len(x)]
        val = [(x[r["step"] - 1], r["val_loss"]) for r in records
               if "val_loss" in r and math.isfinite(r["val_loss"]) and r["step"] - 1 < len(x)]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", alpha=0.3, lw=1)
        if val:
            ax.plot(*zip(*val), color=f"C{i}", marker="o", lw=2, label=f"{name} (val)")
    if unigram is not None and math.isfinite(unigram):
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _frontier_plot(results: dict[str, dict[str, Any]], path: Path, title: str, dominated: dict[str, list[str]]
                   ) -> None:
    """Memory-time scatter, one point per entry, labelled with its final val loss."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_point = False
    for i, (name, r) in enumerate(results.items()):
        mem = _mem_key(r)
        t = r.get("step_time_s")
        if mem is None or t is None or not math.isfinite(t):
            continue
        any_point = True
        marker = "s" if r.get("is_exact") else ("x" if name in dominated else "o")
        ax.scatter([t * 1e3], [mem / 2**20], color=f"C{i}", marker=marker, s=60)
        ax.annotate(f"{name}\nval {r['final_val_loss']:.3f}", (t * 1e3, mem / 2**20), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")
    if not any_point:
        ax.text(0.5, 0.5, "no memory measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step time (ms, median)")
    ax.set_ylabel("activation memory (MiB; peak where not measured)")
    ax.set_title(title + "\nsquares: exact baselines; x: dominated by one", fontsize=10)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_compare_report(out: Path, results: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]],
                         title: str, unigram: float | None = None, rounds: int | None = None, notes: str = "",
                         command: str | None = None) -> str:
    """`chainfree compare`'s output: report.json/.md, summary.json and four PNGs (val loss vs tokens, vs
    wall-clock, vs step; the memory-time frontier). `results[label]` is the run summary plus timing
    (`step_time_s`, `wall_clock_s`, ratios per round) and `memory` of the entry."""
    rows = compare_rows(results)
    dominated = dominated_by(results)
    on_gpu = any((r.get("memory") or {}).get("memory_source", "").startswith("torch.cuda") for r in results.values())
    memory_note = ("Measured with the CUDA allocator (torch.cuda.max_memory_allocated) on one step." if on_gpu else
                   "Off the GPU there is no allocator peak: figures come from torch's MemTracker, which follows "
                   "every tensor alive during one step; compiled entries are opaque to it (n/a).")
    md = f"# {title}\n\n" + markdown_table(rows, COMPARE_COLUMNS)
    if unigram is not None:
        md += f"\n\nUnigram entropy of the corpus (context-free baseline): {unigram:.4f} nats/token."
    if not on_gpu:
        md += " Step times are CPU wall time: they say nothing about GPU speed."
    if dominated:
        def why(m: str) -> str:
            noisy_time = results[m].get("time_ratio_within_noise")
            return f"{m} by {', '.join(dominated[m])}" + (" (its time ratio is within noise)" if noisy_time else "")

        md += ("\n\n**Dominated** (an exact baseline is at least as good on loss, step time and memory): "
               + "; ".join(why(m) for m in dominated) + ".")
    unmeasured = {name: (r.get("memory") or {}).get("tracked_note") or (r.get("memory") or {}).get("note")
                  for name, r in results.items() if _mem_key(r) is None}
    if unmeasured:
        md += ("\n\nMemory not measured (not in the frontier plot, never flagged as dominated): "
               + "; ".join(f"{n}" + (f" ({why_not})" if why_not else "") for n, why_not in unmeasured.items()) + ".")
    noisy = [r["method"] for r in rows if r.get("noise")]
    if noisy:
        md += ("\n\nStep-time ratios **within noise** (the rounds disagree on faster vs slower): "
               + ", ".join(noisy) + ".")
    if notes:
        md += "\n\n" + notes
    md += "\n\n![val loss vs wall-clock](loss_vs_time.png) ![val loss vs tokens](loss_vs_tokens.png)"
    md += "\n\n![memory vs time](memory_time.png)\n\n"
    md += READING_GUIDE.format(rounds=rounds or "several", memory_note=memory_note)
    payload = {"results": results, "rows": rows, "dominated": dominated, "command": command, "rounds": rounds}
    write_result(out, "report", payload, md)
    (out / "summary.json").write_text(json.dumps({"summaries": results, "rows": rows}, indent=1, default=str))
    tokens = {name: [float(r.get("tokens", r["step"])) for r in recs] for name, recs in runs.items()}
    wall = {name: list(results[name].get("wall_clock_s") or
                       [results[name]["step_time_s"] * (i + 1) for i in range(len(recs))])
            for name, recs in runs.items()}
    _curve_plot(runs, tokens, out / "loss_vs_tokens.png", title, "tokens seen", unigram)
    _curve_plot(runs, wall, out / "loss_vs_time.png", title, "training wall-clock (s)", unigram)
    _curve_plot(runs, {n: [float(i + 1) for i in range(len(r))] for n, r in runs.items()}, out / "loss.png", title,
                "step", unigram)
    _frontier_plot(results, out / "memory_time.png", title, dominated)
    return md


def plot_ratio_vs_seq_len(rows: list[dict[str, Any]], keys: list[tuple[str, str]], path: Path, title: str) -> None:
    """One line per (method, key) of `key` (a ratio vs exact) against `seq_len`; 1 = as fast/small as exact."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "exact"]
    for i, method in enumerate(methods):
        for j, (key, label) in enumerate(keys):
            pts = sorted((r["seq_len"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="os^v"[j % 4], color=f"C{i}", ls=("-", "--", ":")[j % 3],
                        label=f"{method}: {label}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ratio vs exact (same process)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_variance_by_group(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Relative variance and 1 − cosine per parameter group (log scale, jackknife error bars)."""
    plt = pyplot()
    rows = [r for r in rows if r.get("variance") is not None and math.isfinite(r.get("variance", float("nan")))]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
    if not rows:
        ax.text(0.5, 0.5, "no finite variance (k < 2 or zero exact gradient)", ha="center", transform=ax.transAxes)
    else:
        xs = range(len(rows))
        floor = 1e-12  # a log axis cannot show the exact zeros of a deterministic method
        var = [max(r["variance"], floor) for r in rows]
        err = [r.get("variance_se") if r.get("variance_se") is not None and math.isfinite(r["variance_se"]) else 0
               for r in rows]
        inc = [r.get("variance_increase_noise") for r in rows]
        inc = [max(v, floor) if v is not None and math.isfinite(v) else floor for v in inc]
        ax.bar([x - 0.27 for x in xs], var, width=0.27, yerr=err, label="relative variance E‖ĝ−Eĝ‖²/‖g‖²")
        ax.bar(list(xs), inc, width=0.27, label="variance increase over minibatch noise (noise part)")
        ax.bar([x + 0.27 for x in xs], [max(1 - r["cosine"], floor) for r in rows], width=0.27,
               label="1 − cosine to exact")
        ax.set_ylabel(f"(values below {floor:g} drawn at {floor:g})")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["group"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
