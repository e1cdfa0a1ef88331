"""Shared test setup: one throw-away token cache per test session, tiny configs."""

import os
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="chainfree-test-cache-")
os.environ.setdefault("CHAINFREE_CACHE", _CACHE)


def tiny_overrides(**extra: object) -> list[str]:
    """A GPT and corpus small enough that a step takes milliseconds on one CPU core."""
    base = {
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.seq_len": 32,
        "data.tokenizer": '"bytes"', "data.max_chars": 300_000,
        "train.batch_size": 4, "train.steps": 6, "train.eval_every": 3, "train.eval_batches": 2,
        "train.ckpt_every": 3, "train.warmup_steps": 2, "train.device": '"cpu"',
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny():
    return tiny_overrides


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to oversubscribed CI machines."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
