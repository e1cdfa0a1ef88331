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
    assert names["hf"] == {"transformers", "accelerate", "gguf", "peft"}  # peft: LoRA with SUS / BASIS
    assert names["data"] == {"datasets"}
    assert names["dev"] == {"chainfree", "ruff"} and "chainfree[test]" in extras["dev"]
    assert names["gpu"] == {"triton"}


def test_flags_render_without_a_type_and_defaults_render_whole():
    """--help / --version are flags (no `<bool>` beside them); generate's newline default does not break
    the help line; train's shortcut options say what they default to."""
    top = help_text()
    assert "<bool>" not in top and "--version print the chainfree version" in top
    for command in (("train",), ("generate",), ("bench", "speed"), ("config",)):
        assert "<bool>" not in help_text(*command), command
    from chainfree.cli import app

    raw = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    assert "[default: (a newline)]" in raw and not re.search(r"\[default:\s*$", raw, re.M)
    train = help_text("train")
    for option, default in (("--model", "gpt"), ("--method", "exact"), ("--steps", "60"), ("--device", "auto")):
        section = train[train.index(option):]
        assert f"[default: (the --config file's, else {default})]" in section[:400], option


def test_help_lists_every_entry_option_and_model_kind():
    assert "+blocks" in help_text("compare")
    speed = help_text("bench", "speed")
    assert "hf" in speed[speed.index("--model"):speed.index("--config")]
    from chainfree.methods import METHODS

    method_help = help_text("bench", "fidelity")
    assert " | ".join(METHODS) in method_help


def test_config_command_lists_every_key_with_default_and_doc(tmp_path):
    """`chainfree config` prints every --set key with its default and doc, as TOML a run can load again."""
    import dataclasses

    from chainfree.cli import app
    from chainfree.config import SECTIONS

    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    listed = tomllib.loads(result.output)
    for section, cls in SECTIONS.items():
        assert set(listed[section]) == {f.name for f in dataclasses.fields(cls)}, section
    assert listed["train"]["lr"] == 3e-3 and listed["method"] == {"name": "exact"}
    line = next(x for x in result.output.splitlines() if x.startswith("n_kv_heads"))
    assert line.split("#", 1)[1].strip() == "0 = n_heads (no grouped-query attention)"
    path = tmp_path / "all.toml"
    path.write_text(result.output)
    assert load_config(path).to_dict() == load_config().to_dict()

    basis = tomllib.loads(CliRunner().invoke(app, ["config", "--method", "basis"]).output)["method"]
    assert basis["name"] == "basis" and {"shrink", "scalars", "fuse_mlp"} <= set(basis)
    hf = CliRunner().invoke(app, ["config", "--model", "hf"])
    assert hf.exit_code == 0, hf.output
    hf_listed = tomllib.loads(hf.output)
    assert "d_model" not in hf_listed["model"] and "tokenizer" not in hf_listed["data"]
    assert hf_listed["train"]["lr"] == 5e-5


def test_readme_command_line_explains_every_method():
    """Every method the CLI offers (--method) is explained in README's command-line section."""
    from chainfree.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("## What we measured")]
    for name in METHODS:
        assert f"`{name}`" in section, name
    assert "chainfree config" in section
