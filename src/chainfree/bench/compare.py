"""`chainfree compare`: train several methods under the same seed and batches, against exact baselines.

Entries are method names with optional exact-baseline suffixes, so the strongest exact practice is one
more entry beside the methods: ``exact,exact+ckpt,exact+sac,exact+compile,basis,basis+ckpt,...``

  ``+ckpt``        train.activation_checkpoint = full (torch.utils.checkpoint per block)
  ``+sac``         train.activation_checkpoint = selective (save matmuls, recompute pointwise)
  ``+compile``     train.compile = true (torch.compile, default mode)
  ``+cudagraphs``  train.compile = true, compile_mode = reduce-overhead (CUDA graphs)
  ``+autotune``    train.compile = true, compile_mode = max-autotune
  ``+blocks``      train.compile_scope = blocks (with a compile suffix: each block compiled on its own)
  ``+accumK``      train.grad_accum = K (same effective batch in K micro-batches)

Timing is interleaved: the run is cut into `rounds` equal spans of steps and every method trains one span
in turn (the order rotating each round), resuming from its checkpoint, so a change of machine load hits
all methods alike instead of whichever ran during it. Resuming is exact (the data and RNG state are
restored), so the losses are those of uninterrupted runs. Per method the report gives the median step time
and its spread over steps, and per round the step-time ratio against exact; a ratio whose per-round values
fall on both sides of 1 is flagged as within noise. The first step of every resumed span is left out of
the timing (allocator warm-up, recompilation under torch.compile); the first step of the run stays in the
wall-clock axis because a user pays it once. Memory is measured after training on one step of a freshly
built model per entry (CUDA allocator peak on a GPU, torch MemTracker elsewhere).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

from chainfree.config import RunConfig, load_config, parse_set
from chainfree.errors import ConfigError

SUFFIXES: dict[str, list[str]] = {
    "ckpt": ['train.activation_checkpoint="full"'],
    "sac": ['train.activation_checkpoint="selective"'],
    "compile": ["train.compile=true"],
    "cudagraphs": ["train.compile=true", 'train.compile_mode="reduce-overhead"'],
    "autotune": ["train.compile=true", 'train.compile_mode="max-autotune"'],
    "blocks": ['train.compile_scope="blocks"'],
}
_ACCUM = re.compile(r"accum(\d+)$")
BASELINE = "exact"


@dataclass
class Entry:
    """One compared run: `label` as written (`exact+ckpt`), the registry method and its train overrides."""

    label: str
    method: str
    overrides: list[str] = field(default_factory=list)

    @property
    def is_exact(self) -> bool:
        return self.method == BASELINE


def parse_entry(text: str) -> Entry:
    """`METHOD[+suffix...]` -> Entry; an unknown suffix is a ConfigError naming the known ones."""
    name, *suffixes = [s.strip() for s in text.strip().split("+")]
    if not name:
        raise ConfigError(f"--methods entry {text!r} has no method name (write e.g. exact+ckpt)")
    overrides: list[str] = []
    seen: dict[str, str] = {}
    for suffix in suffixes:
        accum = _ACCUM.match(suffix)
        if accum:
            items = [f"train.grad_accum={int(accum.group(1))}"]
        elif suffix in SUFFIXES:
            items = SUFFIXES[suffix]
        else:
            known = ", ".join(f"+{s}" for s in SUFFIXES) + ", +accumK"
            raise ConfigError(f"--methods entry {text!r}: unknown suffix +{suffix}; known: {known}")
        for item in items:
            key = item.split("=", 1)[0]
            if key in seen and seen[key] != item:
                raise ConfigError(f"--methods entry {text!r}: +{suffix} conflicts with an earlier suffix on {key}")
            seen[key] = item
        overrides += items
    return Entry(text.strip(), name, overrides)


def parse_entries(methods: str) -> list[Entry]:
    """Comma-separated entries; plain `exact` is always included (first), duplicates are refused."""
    entries = [parse_entry(m) for m in methods.split(",") if m.strip()]
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"--methods lists {', '.join(dup)} twice; list each entry once")
    if BASELINE not in labels:
        entries.insert(0, Entry(BASELINE, BASELINE))  # every comparison carries its own exact baseline
    return entries


def method_overrides(overrides: list[str], name: str, names: list[str]) -> list[str]:
    """`--set method.key=v` in a comparison goes to the methods that have `key` (exact has none); a key that no
    compared method knows is still an error, so typos are not silently dropped."""
    from chainfree.methods import method_class

    def knows(method: str, key: str) -> bool:
        return key in {f.name for f in dataclasses.fields(method_class(method).Config)}

    kept = []
    for item in overrides:
        section, key, _ = parse_set(item)
        if section == "method":
            if not any(knows(m, key) for m in names):
                raise ConfigError(f"method.{key} is not a setting of any compared method ({', '.join(names)})")
            if not knows(name, key):
                continue
        kept.append(item)
    return kept


def entry_configs(entries: list[Entry], config: Path | None, overrides: list[str], model: str | None,
                  steps: int | None, device: str | None) -> dict[str, RunConfig]:
    """A validated RunConfig per entry: the shared settings, the method's own `--set method.*`, the suffixes."""
    names = sorted({e.method for e in entries})
    return {e.label: load_config(config, method_overrides(overrides, e.method, names) + e.overrides, model=model,
                                 method=e.method, steps=steps, device=device) for e in entries}


def round_bounds(steps: int, rounds: int) -> list[int]:
    """End step of each interleaving round: `rounds` near-equal spans covering 1..steps."""
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    rounds = min(rounds, steps)
    return sorted({math.ceil(steps * (r + 1) / rounds) for r in range(rounds)})


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timing_stats(step_times: dict[str, list[float]], bounds: list[int], baseline: str = BASELINE,
                 skip_session_starts: bool = True) -> dict[str, dict[str, Any]]:
    """Per entry: median step time, p10-p90 spread, per-round medians, per-round ratio against `baseline`
    (median, min, max, within_noise) and the wall-clock after each step.

    `step_times[label][i]` is the time of step i+1; `bounds` are the round ends. Session starts (step 0 of
    each resumed round) are excluded from the statistics; in the wall-clock they count as the median step,
    except the very first step of the run, which counts as measured. `skip_session_starts=False` keeps
    every step (timings taken after a separate warm-up).
    """
    starts = {0, *bounds[:-1]} if skip_session_starts else set()
    out: dict[str, dict[str, Any]] = {}
    for label, times in step_times.items():
        kept_idx = [i for i in range(len(times)) if i not in starts] or list(range(len(times)))
        kept = [times[i] for i in kept_idx]
        med = median(kept) if kept else float("nan")
        per_round = []
        lo = 0
        for hi in bounds:
            vals = [times[i] for i in kept_idx if lo <= i < hi]
            per_round.append(median(vals) if vals else float("nan"))
            lo = hi
        wall, total = [], 0.0
        for i, t in enumerate(times):
            total += med if (i in starts and i > 0) else t
            wall.append(total)
        out[label] = {"step_time_s": med, "step_time_p10_s": _quantile(kept, 0.1),
                      "step_time_p90_s": _quantile(kept, 0.9), "round_step_time_s": per_round,
                      "timed_steps": len(kept), "wall_clock_s": wall}
    base = out.get(baseline)
    for label, stats in out.items():
        if base is None:
            continue
        ratios = [a / b for a, b in zip(stats["round_step_time_s"], base["round_step_time_s"])
                  if math.isfinite(a) and math.isfinite(b) and b > 0]
        stats["round_time_ratios"] = ratios
        if ratios:
            stats["time_ratio"] = median(ratios)
            stats["time_ratio_min"], stats["time_ratio_max"] = min(ratios), max(ratios)
            # a ratio is within noise when the rounds disagree on which side of parity it lies
            stats["time_ratio_within_noise"] = (min(ratios) <= 1.0 <= max(ratios)) if len(ratios) > 1 else None
        if label == baseline:
            stats["time_ratio"], stats["time_ratio_within_noise"] = 1.0, None
    return out


def _memory(cfg: RunConfig, entry: Entry, batch: tuple[torch.Tensor, torch.Tensor],
            device: torch.device) -> dict[str, Any]:
    """Peak / activation bytes and the SDPA backends of one step of a freshly built model of the entry."""
    from chainfree.bench.cases import build_step_case
    from chainfree.bench.memory import case_memory
    from chainfree.bench.report import sdpa_backends

    case = build_step_case(cfg, entry.method, cfg.method_params, batch, device)
    compiled = bool(cfg.train.compile)
    try:
        row = case_memory(case, warmup=1, saved_meter=not compiled)
        row["sdpa"] = {"backends": ["compiled graph"]} if compiled else sdpa_backends(case.step)
    finally:
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_compare(out: Path, methods: str, *, config: Path | None = None, overrides: list[str] | None = None,
                model: str | None = None, steps: int | None = None, device: str | None = None, rounds: int = 4,
                measure_memory: bool = True, command: str | None = None, progress: bool = True) -> str:
    """Train every entry of `methods` interleaved into `out/<label>/`, measure memory, write the report.

    Rerunning the same command resumes every entry from its checkpoint. Returns the report's markdown.
    """
    from chainfree.bench.cases import load_batch, resolve_device
    from chainfree.bench.report import write_compare_report
    from chainfree.logging import read_metrics
    from chainfree.train import train as run_train

    out = Path(out)
    entries = parse_entries(methods)
    cfgs = entry_configs(entries, config, list(overrides or []), model, steps, device)
    exact_cfg = cfgs[BASELINE]
    total = exact_cfg.train.steps
    for label, cfg in cfgs.items():
        if cfg.train.steps != total:
            raise ConfigError(f"{label} has train.steps={cfg.train.steps} but exact has {total}; compare equal runs")
    bounds = round_bounds(total, rounds)
    summaries: dict[str, dict[str, Any]] = {}
    peaks: dict[str, int] = {}
    for r, stop in enumerate(bounds):
        order = entries[r % len(entries):] + entries[:r % len(entries)]  # rotate: no entry always runs first
        for entry in order:
            summary = run_train(cfgs[entry.label], out / entry.label, stop_at=stop, progress=progress)
            summaries[entry.label] = summary
            if summary.get("peak_memory_bytes") is not None:
                peaks[entry.label] = max(peaks.get(entry.label, 0), int(summary["peak_memory_bytes"]))
    runs = {e.label: read_metrics(out / e.label / "metrics.jsonl") for e in entries}
    times = {label: [float(r["step_time"]) for r in recs] for label, recs in runs.items()}
    timing = timing_stats(times, bounds)
    dev = resolve_device(exact_cfg.train.device)
    memory: dict[str, dict[str, Any]] = {}
    if measure_memory:
        batch = load_batch(exact_cfg)
        for entry in entries:
            try:
                memory[entry.label] = _memory(cfgs[entry.label], entry, batch, dev)
            except (RuntimeError, NotImplementedError) as e:  # a method whose step cannot be metered
                memory[entry.label] = {"note": str(e).splitlines()[0][:160]}
    results = {}
    for entry in entries:
        s = dict(summaries[entry.label])
        s.update({k: v for k, v in timing[entry.label].items()})
        s["label"], s["train_overrides"] = entry.label, entry.overrides
        s["is_exact"] = entry.is_exact
        s["training_peak_memory_bytes"] = peaks.get(entry.label)
        s["memory"] = memory.get(entry.label, {})
        results[entry.label] = s
    title = (f"compare: {summaries[BASELINE]['model']} on {exact_cfg.data.corpus}, {total} steps of "
             f"{exact_cfg.train.batch_size}x{exact_cfg.model.seq_len} tokens")
    return write_compare_report(out, results, runs, title=title, unigram=summaries[BASELINE]["unigram_entropy"],
                                rounds=len(bounds), command=command)
