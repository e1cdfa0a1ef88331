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


HF = ['model.kind="hf"', 'model.pretrained="some/folder"']


def test_pretrained_kind_defaults_to_fine_tuning_lr_unless_set(tmp_path):
    """A pretrained model gets HF Trainer's fine-tuning lr (5e-5, no warmup), not the from-scratch 3e-3 / 10;
    a value the user gives (--set, or a config file) wins, and other kinds keep their defaults."""
    cfg = load_config(overrides=HF)
    assert cfg.train.lr == 5e-5 and cfg.train.warmup_steps == 0
    assert load_config(model="hf", overrides=HF[1:]).train.lr == 5e-5  # --model hf, as typed
    assert load_config(overrides=[*HF, "train.lr=2e-4"]).train.lr == 2e-4
    own = tmp_path / "ft.toml"
    own.write_text('[model]\nkind = "hf"\npretrained = "x"\n[train]\nlr = 1e-4\nwarmup_steps = 3\n')
    assert (load_config(own).train.lr, load_config(own).train.warmup_steps) == (1e-4, 3)
    assert load_config().train.lr == 3e-3 and load_config().train.warmup_steps == 10


def test_pretrained_config_toml_records_what_ran_not_unused_settings(tmp_path):
    """config.toml of a pretrained run leaves out the architecture and tokenizer settings that do not apply
    (d_model, n_layers, data.tokenizer, bpe_vocab_size) and records the checkpoint's in [recorded], which
    loading the file skips."""
    import tomllib

    cfg = load_config(overrides=HF)
    text = to_toml(cfg, {"architecture": "LlamaForCausalLM", "num_hidden_layers": 30, "tokenizer": "GPT2Tokenizer"})
    raw = tomllib.loads(text)
    assert not {"d_model", "n_layers", "n_heads", "d_state"} & set(raw["model"])
    assert not {"tokenizer", "bpe_vocab_size"} & set(raw["data"])
    assert raw["recorded"]["num_hidden_layers"] == 30
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path).to_dict() == cfg.to_dict()
    assert "recorded" not in tomllib.loads(to_toml(load_config()))  # own models: the settings say it all


def test_every_setting_has_a_one_line_doc():
    """`chainfree config` prints each key with a doc read from the source: none may be missing."""
    import dataclasses

    from chainfree.config import SECTIONS, field_docs
    from chainfree.methods import METHODS, method_class

    classes = [*SECTIONS.values(), *(method_class(name).Config for name in METHODS)]
    for cls in classes:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: no doc for {missing}"
        assert all("\n" not in d for d in docs.values())
    assert field_docs(SECTIONS["model"])["n_kv_heads"] == "0 = n_heads (no grouped-query attention)"
