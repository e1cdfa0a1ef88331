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


def test_hf_sus_refuses_dropout_and_runs_padding():
    model = tiny("llama", register_sus_attention(c=4))
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    gpt2 = tiny("gpt2", "chainfree_sus")
    gpt2.config.attn_pdrop = 0.1
    for m in gpt2.modules():
        if hasattr(m, "attn_dropout"):
            m.attn_dropout.p = 0.1
    with pytest.raises(ValueError, match="dropout"):
        gpt2(input_ids=ids, labels=ids, use_cache=False)


def _batch(kind: str, ids: torch.Tensor) -> dict:
    """Batches as transformers' collators make them: right/left padding (2-D attention_mask, labels -100 on
    padding), packing (position_ids restarting per document, as DataCollatorWithFlattening)."""
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[1, -4:] = True
    if kind == "left":
        pad = pad.flip(-1)
    if kind == "packed":
        return {"input_ids": ids[:1], "labels": ids[:1], "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1,
                                                                                       2, 3, 4, 5, 6, 7, 8, 9, 10]])}
    return {"input_ids": ids.masked_fill(pad, 0), "attention_mask": (~pad).long(), "labels": ids.masked_fill(pad, -100)}


@pytest.mark.parametrize("kind", ["right", "left", "packed"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_sus_padded_and_packed_equal_sdpa_when_nothing_is_cut(kind, arch):
    """Issue 28 item 4: a padded or packed batch (what the collators give) trains; with c huge the loss and
    every gradient equal transformers' SDPA on the same batch (float64), so the mask is read exactly."""
    ids = torch.randint(1, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    batch = _batch(kind, ids)

    def run(attn):
        model = tiny(arch, attn)
        out = model(**batch, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref = run("sdpa")
    loss, got = run(register_sus_attention(c=1e300, name="chainfree_sus_uncut"))
    torch.testing.assert_close(loss, ref_loss, atol=1e-13, rtol=1e-12)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)
    loss, got = run(register_sus_attention(c=1))
    torch.testing.assert_close(loss, ref_loss, atol=1e-13, rtol=1e-12)  # the forward stays exact
    assert all(torch.isfinite(g).all() for g in got.values())


def test_mask_plan_reads_what_transformers_builds():
    """The 4-D masks transformers passes become document ids (padding / packing), nothing (plain causal) or a
    dense mask (anything else, e.g. a sliding window), and the ids rebuild the mask exactly."""
    from chainfree.integrations.hf import mask_plan

    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert mask_plan(causal[None, None], 6, 6, True) == ("plain", None)
    right = causal & torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)  # key padding, as sdpa_mask builds it
    kind, (q_ids, k_ids) = mask_plan(right[None, None], 6, 6, True)
    assert kind == "documents" and k_ids.tolist() == [[0, 0, 0, 0, -1, -1]] and q_ids.tolist() == [[0] * 6]
    left = causal & torch.tensor([0, 0, 1, 1, 1, 1], dtype=torch.bool)
    kind, ids = mask_plan(left[None, None], 6, 6, True)
    assert kind == "documents" and ids.tolist() == [[-1, -1, 2, 2, 2, 2]]  # empty rows: id -1, no key
    docs = torch.tensor([0, 0, 0, 1, 1, 1])
    packed = causal & (docs[:, None] == docs[None, :])
    kind, ids = mask_plan(packed[None, None], 6, 6, True)
    assert kind == "documents" and ids.tolist() == [[0, 0, 0, 3, 3, 3]]
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~packed, torch.finfo(torch.float32).min)
    assert mask_plan(additive, 6, 6, True)[0] == "documents"
    window = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    kind, dense = mask_plan(window[None, None], 6, 6, True)
    assert kind == "dense" and torch.equal(dense, window[None, None])


def test_unsupported_masks_fall_back_to_sdpa_with_one_warning(monkeypatch):
    """A mask SUS cannot take (here a 3-D one, as no transformers model builds) runs transformers' SDPA for
    that call, warning once per process, instead of stopping a training run."""
    import warnings

    from chainfree import errors
    from chainfree.integrations.hf import sus_attention_forward

    monkeypatch.setattr(errors, "_WARNED", set())
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 5, 5, dtype=torch.bool).tril()
    with pytest.warns(RuntimeWarning, match="3-D torch.bool mask run transformers' SDPA"):
        out, _ = sus_attention_forward(module, q, k, v, mask, c=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sus_attention_forward(module, q, k, v, mask, c=1)
