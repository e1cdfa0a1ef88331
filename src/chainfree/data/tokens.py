"""Token arrays on disk (memmapped, nanoGPT-style .bin files) and a deterministic batch sampler.

The sampler draws batch `step` from a generator seeded by (seed, step) alone, so the data a step sees does
not depend on what ran before it: a resumed run sees exactly the batches an uninterrupted run would, and
every method in a comparison trains on the same token windows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chainfree.config import DataConfig
from chainfree.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, private_tmp
from chainfree.errors import DataError

FORMAT_VERSION = 1


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: Tokenizer | None
    source: str

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the train split's unigram distribution, evaluated on val: the loss of the
        best model that ignores context. A trained LM must beat it."""
        counts = np.bincount(np.asarray(self.train), minlength=self.vocab_size).astype(np.float64) + 1.0
        probs = counts / counts.sum()
        val_counts = np.bincount(np.asarray(self.val), minlength=self.vocab_size).astype(np.float64)
        return float(-(val_counts * np.log(probs)).sum() / val_counts.sum())


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("CHAINFREE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chainfree"


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """Write a token array atomically (private temp file, fsync, rename)."""
    tmp = private_tmp(path)
    with open(tmp, "wb") as f:
        f.write(ids.tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_token_dir(path: Path, dtype: str, vocab_size: int = 0) -> TokenData:
    """nanoGPT-style folder: train.bin and val.bin (raw little-endian ints) and optionally meta.json with
    {"vocab_size": N}. Files are memory-mapped, so corpora larger than RAM work."""
    path = Path(path).expanduser()
    for split in ("train", "val"):
        if not (path / f"{split}.bin").is_file():
            raise DataError(f"token folder {path} has no {split}.bin (expected nanoGPT-style train.bin/val.bin)")
    meta = {}
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        dtype = meta.get("dtype", dtype)
    vocab_size = int(meta.get("vocab_size", vocab_size))
    if vocab_size <= 0:
        raise DataError(f"{path}/meta.json with {{\"vocab_size\": N}} is needed to know the vocabulary size")
    arrays = {s: np.memmap(path / f"{s}.bin", dtype=np.dtype(dtype), mode="r") for s in ("train", "val")}
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = BPETokenizer(path / "tokenizer.json")
    elif meta.get("tokenizer") == "bytes":
        tokenizer = ByteTokenizer()
    return TokenData(arrays["train"], arrays["val"], vocab_size, tokenizer, str(path))


def _encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    if isinstance(tokenizer, BPETokenizer):
        encoded = tokenizer.encode_batch(docs)
    else:
        encoded = [tokenizer.encode(d) for d in docs]
    out: list[int] = []
    for ids in encoded:
        out.extend(ids)
        out.append(tokenizer.eot_id)
    return np.asarray(out, dtype=np.uint16)


def load_tokens(cfg: DataConfig) -> TokenData:
    """Tokenised train/val arrays for the configured corpus, built once and cached on disk."""
    if cfg.corpus == "tokens":
        return read_token_dir(Path(cfg.path), cfg.token_dtype)
    from chainfree.data.corpus import load_corpus

    corpus = load_corpus(cfg)
    key_text = f"v{FORMAT_VERSION}|{corpus.fingerprint}|{cfg.tokenizer}|{cfg.bpe_vocab_size}|{cfg.val_fraction}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    vocab_tag = cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else ""
    folder = cache_root(cfg) / f"{corpus.name}-{cfg.tokenizer}{vocab_tag}-{key}"
    if (folder / "meta.json").is_file():
        return read_token_dir(folder, "uint16")
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    else:
        tokenizer = BPETokenizer.train(corpus.train, cfg.bpe_vocab_size, folder / "tokenizer.json")
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        write_tokens(folder / f"{split}.bin", _encode_documents(tokenizer, docs))
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": "uint16", "corpus": corpus.name,
            "tokenizer": cfg.tokenizer, "fingerprint": corpus.fingerprint}
    tmp = private_tmp(folder / "meta.json")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / "meta.json")  # written last: its presence marks a complete cache entry
    return read_token_dir(folder, "uint16")


class BatchSampler:
    """Random windows of `seq_len + 1` tokens; batch contents are a pure function of (seed, split, step).

    With `world_size > 1` every rank draws the same global batch and keeps its slice, so data-parallel
    training sees exactly the batches of a single process with the global batch size.
    """

    def __init__(self, data: TokenData, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        for split in ("train", "val"):
            n = len(getattr(data, split))
            if n < seq_len + 2:
                raise DataError(
                    f"model.seq_len={seq_len} is longer than the {split} split ({n} tokens); lower model.seq_len"
                )
        if batch_size % world_size:
            raise DataError(f"train.batch_size={batch_size} must be divisible by the world size {world_size}")
        self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size

    def batch(self, split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.data.train if split == "train" else self.data.val
        salt = 0 if split == "train" else 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 2 + salt) % (2**63))
        starts = torch.randint(0, len(tokens) - self.seq_len - 1, (self.batch_size,), generator=g).tolist()
        per_rank = self.batch_size // self.world_size
        starts = starts[self.rank * per_rank:(self.rank + 1) * per_rank]
        windows = np.stack([np.asarray(tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]
