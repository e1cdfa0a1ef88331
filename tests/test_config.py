import subprocess
import sys

import pytest

from chainfree.config import load_config, parse_set, to_toml
from chainfree.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.kind == "gpt" and cfg.method_name == "exact"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_heads=5", "model.n_heads"),  # does not divide d_model
        ("train.lrr=1", "train.lrr"),  # unknown key
        ("train.lr=abc", "train.lr"),  # wrong type
        ("train.steps=0", "train.steps"),  # impossible value
        ("model.kind=rnn", "model.kind"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("train.batch_size=true", "train.batch_size"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "method, override, key",
    [("exact", "method.rank=3", "method.rank"),  # exact has no parameters
     ("basis", "method.rnak=3", "method.rnak"),  # typo
     ("basis", "method.rank=0", "rank must be")],  # impossible value
)
def test_method_settings_are_validated_by_the_method_config(method, override, key):
    from chainfree.methods import method_from_config

    cfg = load_config(overrides=[override], method=method)  # config.py knows no method: it only parses
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        method_from_config(cfg)


def test_config_module_imports_no_method():
    code = "import sys, chainfree.config; print(any(m.startswith('chainfree.methods') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_set_parses_toml_literals_and_strings():
    assert parse_set("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_set("data.corpus=pystdlib") == ("data", "corpus", "pystdlib")
    with pytest.raises(ConfigError, match="section"):
        parse_set("lr=3")


def test_toml_roundtrip(tmp_path):
    cfg = load_config(overrides=["model.d_model=64", "model.n_heads=4", "train.lr=0.01"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_presets_resolve_by_name():
    cfg = load_config("gpt-small")
    assert cfg.model.d_model == 512 and cfg.model.seq_len == 1024


def test_cli_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chainfree.cli", "train", "--out", str(tmp_path), "--set", "model.n_heads=5"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "model.n_heads" in proc.stderr


def test_seq_longer_than_data_is_a_clear_error(tiny, tmp_path):
    from chainfree.errors import DataError
    from chainfree.train import train

    cfg = load_config(overrides=tiny(**{"model.seq_len": 10_000_000}))
    with pytest.raises(DataError, match="model.seq_len"):
        train(cfg, tmp_path, progress=False)


def test_compare_routes_method_settings_to_the_methods_that_have_them():
    from chainfree.bench.compare import method_overrides as _method_overrides

    sets = ["method.rank=16", "train.lr=0.01"]
    assert _method_overrides(sets, "exact", ["exact", "lbi"]) == ["train.lr=0.01"]
    assert _method_overrides(sets, "lbi", ["exact", "lbi"]) == sets
    with pytest.raises(ConfigError, match="method.rnak"):
        _method_overrides(["method.rnak=16"], "lbi", ["exact", "lbi"])
