"""The paths a new user walks: config paths are read or refused (never swapped for a preset), every
`*-tiny` preset exists, the CLI help shows what it means (rich markup escaped, method choices, what
`generate --out` wants, --version), quick benchmarks do not overwrite committed results, SUS says when it
changes only a few blocks, and the package extras install only what each use needs."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chainfree.config import LM_KINDS, load_config, presets, resolve_config_path
from chainfree.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def help_text(*args: str) -> str:
    from chainfree.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)


def test_a_config_path_is_read_or_refused_never_replaced_by_a_preset(tmp_path):
    missing = tmp_path / "any" / "dir" / "gpt-small.toml"
    with pytest.raises(ConfigError, match=r"does not exist; the bundled preset of that name is --config gpt-small"):
        load_config(missing)
    own = tmp_path / "gpt-small.toml"
    own.write_text('[model]\nkind = "gpt"\nd_model = 48\nn_heads = 4\n')
    assert load_config(own).model.d_model == 48  # an existing file wins over the preset of the same name
    for name in ("gpt-small", "gpt-small.toml", "configs/gpt-small.toml"):
        assert resolve_config_path(name).parent.name == "configs"


def test_every_language_model_kind_has_a_tiny_preset():
    for kind in LM_KINDS:
        assert f"{kind}-tiny" in presets()
        assert load_config(f"{kind}-tiny").model.kind == kind


def test_help_shows_config_sections_method_choices_and_run_folder():
    from chainfree.methods import METHODS

    train = help_text("train")
    assert "[model] [data] [train] [method]" in train
    assert " | ".join(METHODS) in train
    gen = help_text("generate").split("Options", 1)[1]
    out_help = gen[gen.index("--out"):gen.index("--prompt")]
    assert "resume" not in out_help and "chainfree compare --out DIR" in out_help
    assert "[model] [data] [train] [method]" in help_text("bench", "fidelity")


def test_version_flag():
    from chainfree import __version__
    from chainfree.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"chainfree {__version__}"


def test_bench_fidelity_does_not_write_into_committed_results_by_default():
    from chainfree.bench import cli as bench_cli

    default = inspect.signature(bench_cli.fidelity).parameters["out"].default
    assert Path(default).parts[0] == "runs"


def test_sus_on_a_hybrid_says_how_many_blocks_it_changes(capsys):
    from chainfree.config import ModelConfig
    from chainfree.methods.sus import Sus
    from chainfree.models.lm import LanguageModel

    cfg = ModelConfig(kind="hybrid", vocab_size=32, d_model=16, n_layers=4, n_heads=4, seq_len=16, d_state=8,
                      ssm_head_dim=8, chunk_size=4, mlp_hidden=32, attn_every=4)
    Sus().prepare(LanguageModel(cfg))
    err = " ".join(capsys.readouterr().err.split())
    assert "SUS changes the backward of 1 of the model's 4 blocks" in err
    Sus().prepare(LanguageModel(ModelConfig(kind="gpt", vocab_size=32, d_model=16, n_layers=2, n_heads=4,
                                            seq_len=16)))
    assert "SUS changes the backward" not in capsys.readouterr().err  # every block: nothing to say


def test_extras_install_only_what_each_use_needs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=\[]", r)[0] for r in v} for k, v in extras.items()}
    assert names["test"] == {"pytest"}
    assert names["hf"] == {"transformers", "accelerate", "gguf"}
    assert names["data"] == {"datasets"}
    assert names["dev"] == {"chainfree", "ruff"} and "chainfree[test]" in extras["dev"]
    assert names["gpu"] == {"triton"}
