"""Command line: `chainfree train | compare | reproduce | ...`. Bad input exits non-zero with one line."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from chainfree.bench.cli import FlagCommand, FlagGroup, bench_app
from chainfree.config import MODEL_KINDS, STRATEGIES
from chainfree.errors import ChainfreeError
from chainfree.methods import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=FlagGroup,
                  help="Train networks without paying the full price of backprop; compare against exact backprop.")
app.add_typer(bench_app, name="bench")


def command() -> Any:
    """`@app.command()` with flags rendered without a `<bool>` type (see FlagCommand)."""
    return app.command(cls=FlagCommand)


def _version(value: bool) -> None:
    if value:
        from chainfree import __version__

        typer.echo(f"chainfree {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the chainfree version and exit")] = False) -> None:
    """Train networks without paying the full price of backprop; compare against exact backprop."""

FROM_CONFIG = "the --config file's, else"  # the shortcut options default to the config file's value
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file with \\[model] \\[data] \\[train] \\[method] sections, or a bundled preset name "
    "(gpt-tiny, mamba3-tiny, gpt-small, ...); `chainfree config` lists every key")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="override: section.key=value (repeatable); `chainfree config` lists the keys")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="training steps (train.steps)",
                                              show_default=f"{FROM_CONFIG} 60")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N | auto",
                                               show_default=f"{FROM_CONFIG} auto")]
ModelOpt = Annotated[str | None, typer.Option("--model", help=f"model.kind: {' | '.join(MODEL_KINDS)}",
                                              show_default=f"{FROM_CONFIG} gpt")]
OutOpt = Annotated[Path, typer.Option("--out", help="output folder (rerun to resume)")]
StrategyOpt = Annotated[str | None, typer.Option(
    "--strategy", help=f"train.strategy under torchrun: {' | '.join(STRATEGIES)} (auto = the method's choice)",
    show_default=f"{FROM_CONFIG} auto")]
RunOpt = Annotated[Path, typer.Option("--out", help="folder of a trained run: `chainfree train --out DIR`'s DIR, or "
                                      "DIR/<method> of `chainfree compare --out DIR`")]
METHOD_HELP = (f"gradient method: {' | '.join(METHODS)} (flat_bll: HBLL's block-local baseline; hbll_time, tbptt: "
               "HBLL over time and its truncated-BPTT baseline, for --model char_rnn)")
MethodOpt = Annotated[str | None, typer.Option("--method", help=METHOD_HELP, show_default=f"{FROM_CONFIG} exact")]


@command()
def train(out: OutOpt, model: ModelOpt = None, method: MethodOpt = None,
          config: ConfigOpt = None, set_: SetOpt = None, steps: StepsOpt = None, device: DeviceOpt = None,
          strategy: StrategyOpt = None) -> None:
    """Train one model with one method; writes config.toml, metrics.jsonl, checkpoint/, loss.png.
    Under torchrun (`torchrun --nproc_per_node N -m chainfree.cli train ...`) every rank trains and rank 0
    writes."""
    import os

    from chainfree.config import load_config
    from chainfree.train import train as run_train

    cfg = load_config(config, set_, model=model, method=method, steps=steps, device=device, strategy=strategy)
    from chainfree.training.strategies import close_process_group

    try:
        summary = run_train(cfg, out)
    except BaseException:
        close_process_group(wait=False)
        raise
    close_process_group()
    if os.environ.get("RANK", "0") == "0":
        (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False))
        typer.echo(f"final val loss {summary['final_val_loss']:.4f} (unigram entropy "
                   f"{summary['unigram_entropy']:.4f}) -> {out}")


def _json_safe(value: Any) -> Any:
    """NaN / inf (a figure the run does not have, e.g. the step time of a run of warm-up steps only) as null,
    so summary.json is strict JSON that every reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@command()
def compare(out: OutOpt, methods: Annotated[str, typer.Option(
                "--methods", help="comma-separated entries METHOD[+ckpt|+sac|+compile|+cudagraphs|+accumK|+blocks], "
                "e.g. exact,exact+ckpt,basis,exact+compile+blocks (+blocks: compile each block on its own)")]
                = "exact",
            model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, steps: StepsOpt = None,
            device: DeviceOpt = None,
            rounds: Annotated[int, typer.Option("--rounds", help="interleaving rounds for timing")] = 4) -> None:
    """Train each method under the same seed and data, timed interleaved; one report against the exact baselines."""
    from chainfree.bench.compare import run_compare

    md = run_compare(out, methods, config=config, overrides=list(set_ or []), model=model, steps=steps,
                     device=device, rounds=rounds, command="chainfree " + " ".join(sys.argv[1:]))
    typer.echo(md)


@command()
def reproduce(name: Annotated[str, typer.Argument(help="basis | sus | lbi | hbll")], out: OutOpt,
              scale: Annotated[str, typer.Option("--scale", help="small (CPU minutes) | full (GPU) | tile (sus "
                                                 "--model only: tile rules beside the per-pair rule)")] = "small",
              device: Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N | auto",
                                                         show_default="auto")] = None,
              set_: Annotated[list[str] | None, typer.Option(
                  "--set", help="override: section.key=value (repeatable; the reproduction's own knobs too)")] = None,
              model: Annotated[str | None, typer.Option("--model", help="sus only: smollm2 | hf (pretrained)")] = None,
              ) -> None:
    """Run a paper's experiment at a scale that fits the machine; writes its table beside the paper's."""
    from chainfree.errors import ConfigError

    if scale not in ("small", "full") and not (scale == "tile" and name == "sus" and model is not None):
        raise ConfigError(f"--scale must be 'small' or 'full' ('tile' only with sus --model), got {scale!r}")
    if importlib.util.find_spec(f"chainfree.reproduce.{name}") is None:
        raise ConfigError(f"no reproduction named {name!r}; available: {', '.join(_reproductions())}")
    module = importlib.import_module(f"chainfree.reproduce.{name}")
    if model is not None:  # a reproduction that runs on another model (sus: a pretrained LLM)
        if "model" not in inspect.signature(module.run).parameters:
            raise ConfigError(f"reproduce {name} does not take --model")
        module.run(out, scale, device or "auto", list(set_ or []), model=model)
        return
    module.run(out, scale, device or "auto", list(set_ or []))


@command()
def generate(out: RunOpt,
             prompt: Annotated[str, typer.Option("--prompt", help="text to continue", show_default="a newline")]
             = "\n",
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to sample")] = 200,
             temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.8,
             top_k: Annotated[int | None, typer.Option("--top-k", help="sample among the k likeliest tokens")] = 50,
             seed: Annotated[int, typer.Option("--seed", help="sampling seed")] = 0,
             device: Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N | auto",
                                                        show_default="auto")] = None) -> None:
    """Continue --prompt with the model trained in --out (every kind and method; GPT, Mamba and hybrid decode
    with per-block KV caches / recurrent states, pretrained models with their KV cache). The text goes to
    stdout, the decode rate (tokens/s) to stderr."""
    import time

    import torch

    from chainfree.generate import check_sampling, decode_path, load_trained
    from chainfree.generate import generate as run_generate

    check_sampling(temperature, top_k, max_new_tokens)  # before the model is loaded
    model, tokenizer = load_trained(out, device or "auto")
    ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise ChainfreeError("--prompt encodes to no tokens; give at least one character")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    t0 = time.perf_counter()
    result = run_generate(model, ids, max_new_tokens, temperature, top_k, gen)
    seconds = time.perf_counter() - t0
    typer.echo(tokenizer.decode(result.tolist()))
    rate = f"{max_new_tokens / seconds:,.1f} tokens/s" if seconds > 0 and max_new_tokens else "n/a"
    typer.echo(f"{max_new_tokens} new tokens in {seconds:.2f} s ({rate}; prompt {ids.numel()} tokens; "
               f"decode: {decode_path(model)})", err=True)


@app.command("config", cls=FlagCommand)
def show_config(model: ModelOpt = None, method: MethodOpt = None, config: ConfigOpt = None, set_: SetOpt = None,
                ) -> None:
    """Print every setting with its value and a one-line description, as TOML: the defaults, or what a run
    with these --model/--method/--config/--set would use. Each line is a `--set section.key=value` key; save
    the output to a file and pass it as --config."""
    typer.echo(settings_toml(model=model, method=method, config=config, overrides=list(set_ or [])))


def settings_toml(model: str | None = None, method: str | None = None, config: Path | None = None,
                  overrides: list[str] | None = None) -> str:
    """`chainfree config`'s text: [model] [data] [train] [method] with every key that applies to the model kind
    (a pretrained kind lists no architecture or tokenizer keys), its value and its doc as a TOML comment.
    Keys whose value is unset (None) are listed commented out."""
    import dataclasses

    from chainfree.config import (
        PRETRAINED_KINDS,
        SECTIONS,
        _toml_value,
        applicable,
        field_docs,
        load_config,
    )
    from chainfree.methods import method_class, method_config

    cfg = load_config(config, overrides, validate=False, model=model, method=method)
    mcls = method_class(cfg.method_name)
    mconf = method_config(cfg.method_name, cfg.method_params)
    sections = applicable(cfg)
    docs = {name: field_docs(cls) for name, cls in SECTIONS.items()}
    docs["method"] = {"name": f"gradient method: {' | '.join(METHODS)}", **field_docs(mcls.Config)}
    sections["method"] = {"name": cfg.method_name, **dataclasses.asdict(mconf)}
    kind = cfg.model.kind
    lines = [f"# chainfree settings for model.kind = {kind!r}, method = {cfg.method_name!r}: pass any of them as "
             "--set section.key=value"]
    if kind in PRETRAINED_KINDS:
        lines.append("# a pretrained model's architecture and tokenizer come from model.pretrained, so their keys "
                     "are not listed; train defaults to fine-tuning values (lr, warmup_steps)")
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            setting = f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"
            doc = docs.get(section, {}).get(key, "")
            lines.append(f"{setting:<34} # {doc}" if doc else setting)
    return "\n".join(lines)


def _reproductions() -> list[str]:
    import pkgutil

    import chainfree.reproduce

    return sorted(m.name for m in pkgutil.iter_modules(chainfree.reproduce.__path__) if not m.name.startswith("_"))


def main() -> None:
    try:
        app()
    except ChainfreeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
