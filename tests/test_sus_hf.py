"""SUS as a Hugging Face attention implementation (skipped without transformers)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chainfree.integrations.hf import register_sus_attention  # noqa: E402


def tiny(kind: str, attn: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    cfg._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double()
    model.train()
    return model


def grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_sus_exact_at_huge_c_and_stochastic_at_small_c(kind):
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    ref_logits, ref = grads(tiny(kind, "sdpa"), ids)
    logits, got = grads(tiny(kind, register_sus_attention(c=1e12, name="chainfree_sus_exact")), ids)
    torch.testing.assert_close(logits, ref_logits)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)
    model = tiny(kind, register_sus_attention(c=1))
    logits, a = grads(model, ids)
    torch.testing.assert_close(logits, ref_logits)  # forward stays exact
    _, b = grads(model, ids)
    attn = next(n for n in a if "q_proj" in n or "c_attn" in n)
    assert not torch.equal(a[attn], b[attn])  # fresh masks every step


def test_hf_sus_refuses_padding_and_dropout():
    model = tiny("llama", register_sus_attention(c=4))
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    with torch.no_grad():  # inference defers to SDPA, padding allowed
        model(input_ids=ids, attention_mask=mask)
    gpt2 = tiny("gpt2", "chainfree_sus")
    gpt2.config.attn_pdrop = 0.1
    for m in gpt2.modules():
        if hasattr(m, "attn_dropout"):
            m.attn_dropout.p = 0.1
    with pytest.raises(ValueError, match="dropout"):
        gpt2(input_ids=ids, labels=ids, use_cache=False)
