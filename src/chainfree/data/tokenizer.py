"""Tokenizers: byte-level BPE trained with Hugging Face `tokenizers` on the train split (cached), and plain
bytes (vocab 256) for tiny tests. Both encode documents independently and join them with an end-of-text
token so a window that crosses a document boundary says so."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

from chainfree.errors import DataError


def private_tmp(path: Path) -> Path:
    """A temp name beside `path` that no other writer uses: processes that build the same cache entry at
    once (ranks of one run, runs sharing a cache) each write their own file and rename it into place."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")

EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; id 0 (NUL, absent from real text) doubles as end-of-text."""

    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"tokenizer file {path} is unreadable ({e}); delete it to retrain") from None
        self.vocab_size = self._tok.get_vocab_size()
        eot = self._tok.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer file {path} has no {EOT} token; delete it to retrain")
        self.eot_id = eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    @staticmethod
    def train(texts: list[str], vocab_size: int, path: Path) -> BPETokenizer:
        """Train a byte-level BPE (GPT-2 style pre-tokenisation) and save it atomically to `path`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = private_tmp(path)
        tok.save(str(tmp))
        tmp.replace(path)
        return BPETokenizer(path)
