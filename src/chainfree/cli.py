"""Command line: `chainfree train | compare | reproduce | ...`. Bad input exits non-zero with one line."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from chainfree.bench.cli import bench_app
from chainfree.config import MODEL_KINDS, STRATEGIES
from chainfree.errors import ChainfreeError
from chainfree.methods import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train networks without paying the full price of backprop; compare against exact backprop.")
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        from chainfree import __version__

        typer.echo(f"chainfree {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the chainfree version and exit")] = False) -> None:
    """Train networks without paying the full price of backprop; compare against exact backprop."""

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="TOML file with \\[model] \\[data] \\[train] \\[method] sections, or a bundled preset name "
    "(gpt-tiny, mamba3-tiny, gpt-small, ...)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="training steps (train.steps)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N | auto")]
ModelOpt = Annotated[str | None, typer.Option("--model", help=f"model.kind: {' | '.join(MODEL_KINDS)}")]
OutOpt = Annotated[Path, typer.Option("--out", help="output folder (rerun to resume)")]
StrategyOpt = Annotated[str | None, typer.Option(
    "--strategy", help=f"train.strategy under torchrun: {' | '.join(STRATEGIES)} (auto = the method's choice)")]
RunOpt = Annotated[Path, typer.Option("--out", help="folder of a trained run: `chainfree train --out DIR`'s DIR, or "
                                      "DIR/<method> of `chainfree compare --out DIR`")]
MethodOpt = Annotated[str | None, typer.Option("--method", help=f"gradient method: {' | '.join(METHODS)}")]


@app.command()
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
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        typer.echo(f"final val loss {summary['final_val_loss']:.4f} (unigram entropy "
                   f"{summary['unigram_entropy']:.4f}) -> {out}")


@app.command()
def compare(out: OutOpt, methods: Annotated[str, typer.Option(
                "--methods", help="comma-separated entries METHOD[+ckpt|+sac|+compile|+cudagraphs|+accumK], "
                "e.g. exact,exact+ckpt,basis")] = "exact",
            model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, steps: StepsOpt = None,
            device: DeviceOpt = None,
            rounds: Annotated[int, typer.Option("--rounds", help="interleaving rounds for timing")] = 4) -> None:
    """Train each method under the same seed and data, timed interleaved; one report against the exact baselines."""
    from chainfree.bench.compare import run_compare

    md = run_compare(out, methods, config=config, overrides=list(set_ or []), model=model, steps=steps,
                     device=device, rounds=rounds, command="chainfree " + " ".join(sys.argv[1:]))
    typer.echo(md)


@app.command()
def reproduce(name: Annotated[str, typer.Argument(help="basis | sus | lbi | hbll")], out: OutOpt,
              scale: Annotated[str, typer.Option("--scale", help="small (CPU minutes) | full (GPU)")] = "small",
              device: DeviceOpt = None, set_: SetOpt = None,
              model: Annotated[str | None, typer.Option("--model", help="sus only: smollm2 | hf (pretrained)")] = None,
              ) -> None:
    """Run a paper's experiment at a scale that fits the machine; writes its table beside the paper's."""
    from chainfree.errors import ConfigError

    if scale not in ("small", "full"):
        raise ConfigError(f"--scale must be 'small' or 'full', got {scale!r}")
    if importlib.util.find_spec(f"chainfree.reproduce.{name}") is None:
        raise ConfigError(f"no reproduction named {name!r}; available: {', '.join(_reproductions())}")
    module = importlib.import_module(f"chainfree.reproduce.{name}")
    if model is not None:  # a reproduction that runs on another model (sus: a pretrained LLM)
        if "model" not in inspect.signature(module.run).parameters:
            raise ConfigError(f"reproduce {name} does not take --model")
        module.run(out, scale, device or "auto", list(set_ or []), model=model)
        return
    module.run(out, scale, device or "auto", list(set_ or []))


@app.command()
def generate(out: RunOpt, prompt: Annotated[str, typer.Option("--prompt", help="text to continue")] = "\n",
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 200,
             temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.8,
             top_k: Annotated[int | None, typer.Option("--top-k")] = 50,
             seed: Annotated[int, typer.Option("--seed")] = 0, device: DeviceOpt = None) -> None:
    """Continue --prompt with the model trained in --out (any kind; Mamba blocks decode recurrently)."""
    import torch

    from chainfree.generate import generate as run_generate
    from chainfree.generate import load_trained

    model, tokenizer = load_trained(out, device or "auto")
    ids = torch.tensor(tokenizer.encode(prompt), dtype=torch.long)
    if ids.numel() == 0:
        raise ChainfreeError("--prompt encodes to no tokens; give at least one character")
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    result = run_generate(model, ids, max_new_tokens, temperature, top_k, gen)
    typer.echo(tokenizer.decode(result.tolist()))


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
