"""Data: corpora split by document, tokenizers, memmapped token files, deterministic batches."""

from chainfree.data.tokens import BatchSampler, TokenData, load_tokens

__all__ = ["BatchSampler", "TokenData", "load_tokens"]
