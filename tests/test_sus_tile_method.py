"""The tile variant through every user path: `chainfree.sus_attention(variant='tile')` (also compiled without
a graph break), `method.variant=tile` in the one loop, and `chainfree.apply(model, 'sus', variant='tile')` on a
transformers model. At a huge keep rate every tile is kept with probability 1, so gradients equal exact
autograd; at a small one they differ (the method really samples)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chainfree.errors import ConfigError
from chainfree.ops.sus import sus_attention


def _qkv(n: int = 10, h: int = 2, d: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_tile_variant_exact_at_huge_c_and_stochastic_at_small_c(causal, one_thread):
    q, k, v = _qkv()
    go = torch.randn(1, 2, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    exact = torch.autograd.grad(ref, (q, k, v), go)
    out = sus_attention(q, k, v, is_causal=causal, variant="tile", c=1e12, tile=4)
    assert torch.allclose(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), exact, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    out = sus_attention(q, k, v, is_causal=causal, variant="tile", c=0.05, tile=4)
    assert any(not torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), go), exact, strict=True))


def test_tile_variant_takes_document_ids_and_refuses_bad_tile(one_thread):
    q, k, v = _qkv(n=8)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    out = sus_attention(q, k, v, is_causal=True, variant="tile", c=1e12, tile=4, document_ids=ids)
    allowed = (ids[0, :, None] == ids[0, None, :]) & (ids[0, None, :] >= 0) & torch.ones(8, 8, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(out[..., :7, :], ref[..., :7, :])  # row 7 (padding) sees no key: output 0
    assert torch.all(out[..., 7, :] == 0)
    with pytest.raises(ValueError, match="tile must be a positive int"):
        sus_attention(q, k, v, variant="tile", tile=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        sus_attention(q, k, v, variant="tiles")


def test_tile_variant_in_the_training_loop_equals_exact_at_huge_c(one_thread):
    from chainfree.config import load_config
    from chainfree.methods import method_from_config
    from chainfree.training.trainer import seeded_model

    base = ["model.kind=gpt", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.seq_len=16",
            "model.vocab_size=40", "train.dtype=fp64"]  # fmt: skip
    grads = {}
    for name, extra in {"exact": ["method.name=exact"],
                        "tile": ["method.name=sus", "method.variant=tile", "method.c=1e12", "method.tile=4"]}.items():
        cfg = load_config(None, [*base, *extra])
        method = method_from_config(cfg)
        model = method.prepare(seeded_model(cfg, torch.device("cpu")))
        x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
        method.step(model, x, x.roll(-1, 1))
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["exact"], grads["tile"], strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ConfigError, match="method.proposal"):
        method_from_config(load_config(None, [*base, "method.name=sus", "method.variant=tile", "method.proposal=x8"]))
    def rate(*extra: str) -> float | None:
        return method_from_config(load_config(None, [*base, "method.name=sus", *extra])).config.keep_rate

    assert rate("method.variant=tile") == 4.0 and rate("method.variant=bernoulli") == 32.0
    assert rate() is None and rate("method.c=16") == 16.0  # 'auto': the variant that runs picks its default


def test_auto_variant_is_tile_where_the_kernels_take_the_call(monkeypatch, one_thread):
    """'auto' (the default) runs the tile op where `sus_tile.supports` the call (CUDA bf16/fp16) and the per-pair
    rule elsewhere; a dense attn_mask keeps it per-pair; an explicit variant is left alone."""
    from chainfree.ops import sus, sus_tile

    q, k, v = _qkv()
    assert sus.resolve_variant("auto", q, k, v, 128, True) == "bernoulli"  # CPU float64
    monkeypatch.setattr(sus_tile, "supports", lambda *a, **kw: True)
    assert sus.resolve_variant("auto", q, k, v, 128, True) == "tile"
    assert sus.resolve_variant("auto", q, k, v, 128, True, masked=True) == "bernoulli"
    assert sus.resolve_variant("systematic", q, k, v, 128, True) == "systematic"
    calls = []
    monkeypatch.setattr(sus, "_tile_attention", lambda *a: calls.append(a[8]) or a[0])
    sus_attention(q, k, v, is_causal=True)
    assert calls == [sus.TILE_DEFAULT_C]  # c unset: the tile default, not the per-pair 32


def test_apply_tile_variant_on_a_transformers_model(one_thread):
    transformers = pytest.importorskip("transformers")
    import chainfree

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    exact_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    exact = torch.autograd.grad(exact_loss, list(model.parameters()))
    chainfree.apply(model, "sus", variant="tile", c=1e12, tile=8)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert torch.allclose(loss, exact_loss)
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())), exact, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    chainfree.remove(model)
