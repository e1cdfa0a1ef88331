"""`chainfree bench {fidelity,speed,memory}`: measure a method against exact backprop, write JSON + markdown
(+ PNG) to benchmarks/results/ (or --out). Every result carries its own exact baseline from the same process,
the device, torch/triton versions, shapes, dtype, the command and the git commit."""

from __future__ import annotations

import importlib
import inspect
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from chainfree.config import MODEL_KINDS
from chainfree.errors import CheckpointError, ConfigError
from chainfree.methods import METHODS

if TYPE_CHECKING:  # torch is imported by the commands, so `chainfree --help` stays fast
    import click
    import torch
    from torch import nn


def _plain_flags(params: list[click.Parameter]) -> list[click.Parameter]:
    """Give on/off flags (--help, --version, --limit) an empty type column: typer would print `<bool>`
    beside them, which reads as if the flag took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class FlagCommand(TyperCommand):
    """A typer command whose flags render without a type (see _plain_flags)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_flags(super().get_params(ctx))


class FlagGroup(TyperGroup):
    """A typer command group whose flags render without a type (see _plain_flags)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_flags(super().get_params(ctx))


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, cls=FlagGroup,
                        help="Measure a method against exact backprop: gradient fidelity, speed, memory.")


def command() -> Any:
    """`@bench_app.command()` with flags rendered without a `<bool>` type (see FlagCommand)."""
    return bench_app.command(cls=FlagCommand)


ModelOpt = Annotated[str | None, typer.Option("--model", help=" | ".join(MODEL_KINDS),
                                              show_default="the --config file's, else gpt")]
MethodOpt = Annotated[str, typer.Option("--method", help=" | ".join(METHODS))]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file with \\[model] \\[data] \\[train] \\[method] sections, or a bundled preset name")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
CkptOpt = Annotated[Path | None, typer.Option("--checkpoint", help="run folder of `chainfree train --out DIR`")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto")]
OutOpt = Annotated[Path, typer.Option("--out", help="results folder")]
NameOpt = Annotated[str | None, typer.Option("--name", help="file stem of the results (default: derived)")]
SeqOpt = Annotated[str | None, typer.Option("--seq-lens", help="comma-separated sequence lengths to sweep")]
DEFAULT_OUT = Path("benchmarks/results")
SCRATCH_OUT = Path("runs/bench")  # fidelity's default: a quick check must not overwrite committed results
ScratchOutOpt = Annotated[Path, typer.Option("--out", help="results folder (pass benchmarks/results to publish)")]


def _command() -> str:
    return "chainfree " + " ".join(sys.argv[1:])


def checkpoint_overrides(run_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """[model]/[data]/[train] of a training run as --set items, and the run's [method] (how it was trained)."""
    from chainfree.config import _toml_value

    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file() or not (run_dir / "checkpoint" / "latest").is_file():
        raise CheckpointError(f"--checkpoint {run_dir} is not a run folder of `chainfree train --out DIR` "
                              "(needs config.toml and checkpoint/latest)")
    raw = tomllib.loads(cfg_path.read_text())
    items = [f"{section}.{key}={_toml_value(value)}" for section in ("model", "data", "train")
             for key, value in raw.get(section, {}).items() if key != "device"]
    return items, dict(raw.get("method", {"name": "exact"}))


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the run's checkpoint (tied aliases restored), read through the verified reader
    (`chainfree.checkpoint.load_model_state`: SHA-256 of every file, one-line CheckpointError otherwise)."""
    from chainfree.checkpoint import load_model_state

    weights, _ = load_model_state(run_dir / "checkpoint")
    return weights


def _config(config: Path | None, set_: list[str] | None, model: str | None, method: str, device: str,
            checkpoint: Path | None):
    from chainfree.config import load_config

    overrides = list(set_ or [])
    trained: dict[str, Any] | None = None
    if checkpoint is not None:
        ckpt_items, trained = checkpoint_overrides(checkpoint)
        kind = tomllib.loads((checkpoint / "config.toml").read_text()).get("model", {}).get("kind", "gpt")
        if model is not None and model != kind:
            raise ConfigError(f"--model {model} differs from the checkpoint's model {kind}; drop --model")
        overrides = ckpt_items + overrides
        model = None
    cfg = load_config(config, overrides, model=model, method=method, device=device)
    return cfg, trained


def _load_model(cfg, device: torch.device, checkpoint: Path | None, trained: dict[str, Any] | None,
                weights: dict[str, torch.Tensor] | None = None):
    """The unprepared model (or, for a checkpoint of a method that restructures the model, the model prepared
    by that training method) with the checkpoint's weights (`weights`, read from it when not given)."""
    from chainfree.bench.cases import build_model
    from chainfree.methods import build_method

    model = build_model(cfg, device)
    if checkpoint is None:
        return model
    weights = checkpoint_weights(checkpoint) if weights is None else weights
    try:
        model.load_state_dict(weights)
        return model
    except RuntimeError:
        pass
    assert trained is not None
    train_method = build_method(trained.get("name", "exact"), {k: v for k, v in trained.items() if k != "name"})
    model = train_method.prepare(model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model: {str(e).splitlines()[0]}") from None
    if cfg.method_name != train_method.name:
        raise ConfigError(f"checkpoint {checkpoint} holds a {train_method.name} model; measure --method "
                          f"{train_method.name} on it, or a dense (exact/basis/sus) checkpoint for {cfg.method_name}")
    return model


# methods whose gradient has no exact-autograd counterpart on the same network to compare with, and why
NO_FIDELITY = {
    "hbll_time": "its time tree trains shortcut GRUs that backprop through the character GRU has no gradient for "
                 "(and the tree has no forward of its own); `chainfree reproduce hbll --set hbll.parts=rnn` measures "
                 "it against exact BPTT and tbptt by training",
}


@command()
def fidelity(method: MethodOpt, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
             checkpoint: CkptOpt = None, device: DeviceOpt = "cpu", out: ScratchOutOpt = SCRATCH_OUT,
             name: NameOpt = None,
             k: Annotated[int, typer.Option("--k", help="estimates per batch (fresh randomness each)")] = 8,
             batches: Annotated[int, typer.Option("--batches", help="M minibatches (>= 3 for error bars)")] = 4,
             reference: Annotated[str, typer.Option("--reference", help="auto | copy | self")] = "auto",
             seed: Annotated[int, typer.Option("--seed")] = 0) -> None:
    """Cosine, bias, variance, norm ratio and variance increase of a method's gradient vs exact, per group."""
    from chainfree.bench.cases import resolve_device, shapes
    from chainfree.bench.fidelity import FIDELITY_COLUMNS, measure_fidelity, sample_batches
    from chainfree.bench.report import markdown_table, plot_variance_by_group, write_result
    from chainfree.data import BatchSampler
    from chainfree.logging import console
    from chainfree.methods import build_method
    from chainfree.training.trainer import autocast_context, run_tokens

    if batches < 1:
        raise ConfigError("--batches must be >= 1")
    if method in NO_FIDELITY:
        raise ConfigError(f"bench fidelity cannot measure --method {method}: {NO_FIDELITY[method]}")
    cfg, trained = _config(config, set_, model, method, device, checkpoint)
    dev = resolve_device(cfg.train.device)
    data = run_tokens(cfg)  # the run's tokens: a pretrained model's corpus is tokenised with its own tokenizer
    cfg.model.fit_vocab(data.vocab_size)
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed)
    batch_list = sample_batches(sampler, batches, dev)
    weights = checkpoint_weights(checkpoint) if checkpoint is not None else None
    base = _load_model(cfg, dev, checkpoint, trained, weights)
    if checkpoint is not None:  # each model measure_fidelity needs is built afresh with the weights, not deep-
        # copied: a method's structure (HBLL's stacked tree) indexes its own modules and does not survive a copy
        def factory() -> nn.Module:
            return _load_model(cfg, dev, checkpoint, trained, weights)

        base = factory
    meth = build_method(cfg.method_name, cfg.method_params)
    autocast = (lambda: autocast_context(cfg.train, dev)) if cfg.train.dtype == "bf16" else None
    with console.status(f"fidelity of {meth.name}: {batches} batches x {k} estimates") as status:
        report = measure_fidelity(base, meth, batch_list, k, reference=reference, seed=seed, autocast=autocast,
                                  on_batch=lambda b: status.update(f"fidelity of {meth.name}: batch {b + 1}/{batches}"))
    stem = name or f"fidelity_{cfg.model.kind}_{meth.name}_{dev.type}"
    dtype = {"auto": "fp32", "fp32": "fp32", "fp64": "fp64", "bf16": "bf16 autocast"}[cfg.train.dtype]
    state = f"checkpoint {checkpoint}" if checkpoint else f"fresh init (seed {cfg.train.seed})"
    md = (f"# Gradient fidelity: {cfg.model.kind} / {meth.name} {report.method}\n\n"
          f"Model state: {state}. {batches} minibatches of {list(batch_list[0][0].shape)} tokens x {k} estimates "
          f"each; reference: {report.reference} (exact autograd); compute dtype {dtype}; {report.seconds:.1f} s.\n"
          "See docs/measurement.md for how to read every column.\n\n"
          + markdown_table(report.rows("kinds" if report.kinds else "groups"), FIDELITY_COLUMNS))
    if report.kinds:
        md += "\n\nPer module:\n\n" + markdown_table(report.rows("groups")[1:], FIDELITY_COLUMNS)
    md += f"\n\n![variance per group]({stem}.png)"
    payload = {"bench": "fidelity", "command": _command(), "device": str(dev), "dtype": dtype, "model_state": state,
               "shapes": shapes(cfg, batch_list[0]), **report.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    plot_variance_by_group(report.rows("groups"), out / f"{stem}.png",
                           f"{cfg.model.kind} / {meth.name}: gradient noise per group ({state})")
    json_path, md_path = write_result(out, stem, payload, md)
    typer.echo(md_path.read_text())
    typer.echo(f"-> {json_path}")


def _sweep(cfg, seq_lens: str | None) -> list[int]:
    if not seq_lens:
        return [cfg.model.seq_len]
    try:
        values = [int(s) for s in seq_lens.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seq-lens must be comma-separated integers, got {seq_lens!r}") from None
    if not values or min(values) < 2:
        raise ConfigError("--seq-lens needs sequence lengths >= 2")
    return values


def _run_sweep(kind: str, cfg, dev: torch.device, seq_lens: list[int], measure) -> tuple[list[dict], dict]:
    """Run `measure(cfg, methods, batch)` for every sequence length; rows get a `seq_len` field."""
    import copy

    from chainfree.bench.cases import load_batch

    rows, payload = [], {}
    methods = [(cfg.method_name, cfg.method_params)]
    for t in seq_lens:
        c = copy.deepcopy(cfg)
        c.model.seq_len = t
        batch = load_batch(c)
        payload = measure(c, methods, batch)
        for r in payload["rows"]:
            rows.append({"seq_len": t, **r})
    return rows, payload


@command()
def speed(method: MethodOpt, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
          checkpoint: CkptOpt = None, device: DeviceOpt = "auto", out: OutOpt = DEFAULT_OUT, name: NameOpt = None,
          op: Annotated[str, typer.Option("--op", help="step | block | attn | mlp | attention (SUS kernel sweep)")]
          = "step", warmup: Annotated[int, typer.Option("--warmup")] = 3,
          repeats: Annotated[int, typer.Option("--repeats")] = 10, seq_lens: SeqOpt = None,
          ns: Annotated[str | None, typer.Option("--ns", help="--op attention: sequence lengths")] = None,
          cs: Annotated[str | None, typer.Option("--cs", help="--op attention: keep rates c")] = None,
          head_dims: Annotated[str | None, typer.Option("--head-dims", help="--op attention: head dims")] = None,
          limit: Annotated[bool, typer.Option("--limit", help="--op step --method sus: GPT step sweep (T = --ns, "
                           "default 8k,16k,32k) vs exact and the zero-attention-backward limit (CUDA)")] = False
          ) -> None:
    """Median step (or module fwd / fwd+bwd) time of a method and of exact, in one process."""
    if op == "attention":
        _attention(method, out, ns, cs, head_dims, name)
        return
    if op == "step" and limit:  # chainfree.bench.attention.run_step_bench (SUS kernel owner's bench)
        if method != "sus":
            raise ConfigError(f"--limit is the SUS long-context step sweep; use --method sus (got {method!r})")
        from chainfree.bench.attention import run_step_bench

        parse = lambda raw, conv, dflt: [conv(x) for x in raw.split(",") if x.strip()] if raw else dflt  # noqa: E731
        try:
            run_step_bench(parse(ns, int, [8192, 16384, 32768]), parse(head_dims, int, [64]),
                           parse(cs, float, [32.0])[0], out_dir=out, name=name or "step_sus")
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        return
    from chainfree.bench.cases import resolve_device
    from chainfree.bench.report import markdown_table, plot_ratio_vs_seq_len, write_result
    from chainfree.bench.speed import SPEED_COLUMNS, measure_speed

    cfg, _ = _config(config, set_, model, method, device, checkpoint)
    dev = resolve_device(cfg.train.device)
    lens = _sweep(cfg, seq_lens)
    rows, last = _run_sweep("speed", cfg, dev, lens,
                            lambda c, m, b: measure_speed(c, m, b, dev, op, warmup, repeats))
    stem = name or f"speed_{op}_{cfg.model.kind}_{cfg.method_name}_{dev.type}"
    columns = [("seq_len", "T"), *SPEED_COLUMNS["step" if op == "step" else "op"]]
    timer = "CUDA events" if dev.type == "cuda" else "CPU wall time (perf_counter) -- not a GPU speed claim"
    what = "one training step (method.step + clip + optimizer)" if op == "step" else \
        f"block 0 .{op} module" if op != "block" else "block 0"
    md = (f"# Speed: {cfg.model.kind} / {cfg.method_name} vs exact, {what}\n\n"
          f"Timer: {timer}; {warmup} warm-up calls, median of {repeats}. Batch {cfg.train.batch_size}, "
          f"dtype {cfg.train.dtype}.\n\n" + markdown_table(rows, columns))
    payload = {**last, "command": _command(), "rows": rows, "seq_lens": lens}
    out.mkdir(parents=True, exist_ok=True)
    if len(lens) > 1:
        keys = [("step_ratio", "step time")] if op == "step" else [("fwd_ratio", "fwd"), ("fwd_bwd_ratio", "fwd+bwd")]
        plot_ratio_vs_seq_len(rows, keys, out / f"{stem}.png", f"{cfg.model.kind}: time vs exact ({dev.type})")
        md += f"\n\n![ratio vs sequence length]({stem}.png)"
    json_path, md_path = write_result(out, stem, payload, md)
    typer.echo(md_path.read_text())
    typer.echo(f"-> {json_path}")


def _attention(method: str, out: Path, ns: str | None, cs: str | None, head_dims: str | None,
               name: str | None) -> None:
    """`--op attention` is the SUS kernel sweep of chainfree.bench.attention (SUS vs SDPA flash, CUDA only)."""
    if method != "sus":
        raise ConfigError(f"--op attention benchmarks the SUS attention kernel; use --method sus (got {method!r}), "
                          "or --op attn for the attention module of any method's model")
    if importlib.util.find_spec("chainfree.bench.attention") is None:
        raise ConfigError("--op attention needs chainfree.bench.attention, which this installation lacks")
    module = importlib.import_module("chainfree.bench.attention")
    fn = getattr(module, "run_attention_bench", None)
    if fn is None:
        raise ConfigError("chainfree.bench.attention has no run_attention_bench; update chainfree")
    kwargs: dict[str, Any] = {"out_dir": out}
    for key, raw, conv in (("ns", ns, int), ("cs", cs, float), ("head_dims", head_dims, int)):
        if raw:
            try:
                kwargs[key] = [conv(x) for x in raw.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"--{key.replace('_', '-')} must be comma-separated numbers, got {raw!r}") from None
    defaults = {"ns": [2048, 4096, 8192, 16384, 32768], "cs": [16.0, 32.0, 64.0], "head_dims": [64, 128]}
    accepted = inspect.signature(fn).parameters
    for key, value in defaults.items():
        if key in accepted and key not in kwargs and accepted[key].default is inspect.Parameter.empty:
            kwargs[key] = value
    if name:
        kwargs["name"] = name
    try:
        fn(**{k: v for k, v in kwargs.items() if k in accepted})
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    typer.echo(f"-> {out}")


@command()
def memory(method: MethodOpt, model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
           checkpoint: CkptOpt = None, device: DeviceOpt = "auto", out: OutOpt = DEFAULT_OUT, name: NameOpt = None,
           warmup: Annotated[int, typer.Option("--warmup")] = 1, seq_lens: SeqOpt = None) -> None:
    """Peak and activation memory of one training step of a method and of exact, in one process."""
    from chainfree.bench.cases import resolve_device
    from chainfree.bench.memory import MEMORY_COLUMNS, measure_memory
    from chainfree.bench.report import markdown_table, plot_ratio_vs_seq_len, write_result

    cfg, _ = _config(config, set_, model, method, device, checkpoint)
    dev = resolve_device(cfg.train.device)
    lens = _sweep(cfg, seq_lens)
    rows, last = _run_sweep("memory", cfg, dev, lens, lambda c, m, b: measure_memory(c, m, b, dev, warmup))
    stem = name or f"memory_{cfg.model.kind}_{cfg.method_name}_{dev.type}"
    note = ("torch.cuda.max_memory_allocated over one full step, reset before it; activation = peak - static "
            "(weights, optimizer state) - gradients." if dev.type == "cuda" else
            "CPU: allocator peaks are CUDA-only, so only the saved-for-backward bytes are measured here.")
    md = (f"# Memory: {cfg.model.kind} / {cfg.method_name} vs exact, one training step\n\n{note} "
          f"Batch {cfg.train.batch_size}, dtype {cfg.train.dtype}.\n\n"
          + markdown_table(rows, [("seq_len", "T"), *MEMORY_COLUMNS]))
    notes = {r.get("saved_note") for r in rows if r.get("saved_note")}
    if notes:
        md += "\n\nsaved-for-backward n/a: " + "; ".join(sorted(notes))
    payload = {**last, "command": _command(), "rows": rows, "seq_lens": lens}
    out.mkdir(parents=True, exist_ok=True)
    if len(lens) > 1:
        keys = [("peak_ratio", "peak"), ("activation_ratio", "activation"), ("saved_peak_ratio", "saved")]
        plot_ratio_vs_seq_len(rows, keys, out / f"{stem}.png", f"{cfg.model.kind}: memory vs exact ({dev.type})")
        md += f"\n\n![ratio vs sequence length]({stem}.png)"
    json_path, md_path = write_result(out, stem, payload, md)
    typer.echo(md_path.read_text())
    typer.echo(f"-> {json_path}")


@command()
def baselines(entries: Annotated[str, typer.Option(
                  "--entries", help="compare-style entries, e.g. exact,exact+compile,exact+cudagraphs,exact+ckpt,"
                  "exact+sac,basis")] = "exact,exact+compile,exact+ckpt,exact+sac",
              model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, device: DeviceOpt = "auto",
              out: OutOpt = DEFAULT_OUT, name: NameOpt = None,
              rounds: Annotated[int, typer.Option("--rounds", help="interleaving rounds")] = 5,
              steps: Annotated[int, typer.Option("--steps", help="timed steps per entry per round")] = 5,
              warmup: Annotated[int, typer.Option("--warmup", help="untimed steps per entry (compilation)")] = 3,
              sweep: Annotated[str | None, typer.Option(
                  "--sweep", help="section.key=v1,v2,... measured one value after another, e.g. "
                  "model.n_layers=8,16,32,64")] = None) -> None:
    """Step time and memory of methods beside the exact baselines (compile, CUDA graphs, checkpointing), interleaved."""
    from chainfree.bench.cases import load_batch, resolve_device
    from chainfree.bench.compare import entry_configs, parse_entries
    from chainfree.bench.speed import measure_entries

    if rounds < 1 or steps < 1 or warmup < 0:
        raise ConfigError("--rounds and --steps must be >= 1, --warmup >= 0")
    parsed = parse_entries(entries)
    values: list[str | None] = [None]
    key = None
    if sweep:
        if "=" not in sweep:
            raise ConfigError(f"--sweep {sweep!r} must look like section.key=v1,v2 (e.g. model.n_layers=8,16)")
        key, raw = sweep.split("=", 1)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--sweep {sweep!r} lists no values")
    rows: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for value in values:
        extra = [f"{key}={value}"] if key else []
        cfgs = entry_configs(parsed, config, list(set_ or []) + extra, model, None, device)
        exact_cfg = cfgs["exact"]
        dev = resolve_device(exact_cfg.train.device)
        batch = load_batch(exact_cfg)
        for cfg in cfgs.values():
            cfg.model.vocab_size = exact_cfg.model.vocab_size
        last = measure_entries(cfgs, batch, dev, rounds, steps, warmup)
        for r in last["rows"]:
            if r.get("error"):
                r["noise"] = r["error"]
                rows.append({**r, **({key: value} if key else {})})
                continue
            r["ratio_range"] = (f"{r['time_ratio_min']:.2f}-{r['time_ratio_max']:.2f}"
                                if r.get("time_ratio_min") is not None and r["method"] != "exact" else None)
            r["noise"] = "within noise" if r.get("within_noise") else None
            r["sdpa_backend"] = ", ".join(r.get("sdpa") or [])
            if key:
                r[key] = value
            rows.append(r)
        typer.echo(f"{key or 'run'}={value}: " + ", ".join(f"{r['method']} {r['step_ms']:.2f} ms"
                                                           for r in last["rows"] if "step_ms" in r))
        md_path = _write_baselines(out, name, rows, last, key, parsed, sweep, rounds, steps, warmup)
    typer.echo(md_path.read_text())
    typer.echo(f"-> {md_path.with_suffix('.json')}")


def _write_baselines(out: Path, name: str | None, rows: list[dict[str, Any]], last: dict[str, Any], key: str | None,
                     parsed: list, sweep: str | None, rounds: int, steps: int, warmup: int) -> Path:
    """Write (or rewrite, after each sweep value, so a time limit keeps what was measured) the result files."""
    from chainfree.bench.report import markdown_table, write_result
    from chainfree.bench.speed import CUDAGRAPH_MEMORY, ENTRY_COLUMNS

    m = last["shapes"]
    stem = name or f"baselines_{m['model']}_{'cuda' if 'cuda' in last['device'] else 'cpu'}"
    timer = "CUDA events" if last["timer"] == "cuda_events" else "CPU wall time (perf_counter) -- not a GPU claim"
    md = (f"# Methods beside the exact baselines: {m['model']} d={m['d_model']} L={m['n_layers']} "
          f"batch {m['batch']} ({m['dtype']})\n\n"
          f"Timer: {timer}. Every entry is built and warmed up ({warmup} steps, compilation included), then timed "
          f"interleaved: {rounds} rounds x {steps} steps, order rotating. *time vs exact* = median over rounds of "
          "the per-round median ratio; *within noise* = the rounds disagree on faster vs slower. Memory: one step "
          "per entry, others idle; activation = peak - allocated before - gradients; peak = own weights + "
          "optimizer state + gradients + activation. A step = method step + clip + AdamW (fused on CUDA).\n\n"
          + markdown_table(rows, ([(key, key)] if key else []) + ENTRY_COLUMNS))
    if any(r.get("memory_source") == CUDAGRAPH_MEMORY for r in rows):
        md += f"\n\nCUDA-graph entries (reduce-overhead): memory {CUDAGRAPH_MEMORY}."
    payload = {**last, "command": _command(), "rows": rows, "entries": [e.label for e in parsed], "sweep": sweep}
    _, md_path = write_result(out, stem, payload, md)
    return md_path
