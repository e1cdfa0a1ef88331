"""chainfree in the Hugging Face ecosystem, as a user fine-tunes: `transformers.Trainer` with `chainfree.apply`
(SUS, BASIS), PEFT LoRA in both orders, padded and packed batches with SUS (loss equal to SDPA's, gradients
finite and unbiased), and undo. Everything runs on a tiny random LLaMA built here (no download)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import chainfree  # noqa: E402
from chainfree.nn.basis import BasisLinear, BasisMLP, BasisSwiGLU  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pretrained.md"
V = 128


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """2 layers, d=32, 4 query / 2 KV heads, float64; weights larger than the default init so attention is
    peaky and gradients are far from zero."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.train()


def trainer_example() -> str:
    """The code block after `<!-- trainer-example -->` in docs/pretrained.md, verbatim."""
    text = DOCS.read_text()
    match = re.search(r"<!-- trainer-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/pretrained.md lost its <!-- trainer-example --> block"
    return match.group(1)


@pytest.mark.parametrize("variant", ["as written", "or-alternative"])
def test_docs_trainer_example(variant, tmp_path, monkeypatch):
    """The docs' "With your own Trainer" block runs as written (SUS) and with its `# or:` apply line
    (BASIS): the Trainer trains (loss finite and lower at the end, weights moved), SUS / BASIS were really
    installed during training, and `chainfree.remove` gives back the plain model."""
    code = trainer_example()
    apply_line = next(line for line in code.splitlines() if "chainfree.apply(" in line)
    if variant == "or-alternative":
        alternative = apply_line.split("# or:")[1].strip()
        code = code.replace(apply_line, f"model = {alternative}")
    seen = {}
    real_train = transformers.Trainer.train

    def train(self, *args, **kwargs):  # what the model looks like while the Trainer trains it
        seen["attn"] = self.model.config._attn_implementation
        seen["basis"] = [type(m).__name__ for m in self.model.modules() if isinstance(m, BasisLinear | BasisSwiGLU)]
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, str(DOCS), "exec"), ns)  # noqa: S102 - the documented example, verbatim
    losses = [r["loss"] for r in ns["trainer"].state.log_history if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    if variant == "as written":
        assert seen["attn"].startswith("chainfree_sus") and not seen["basis"]
    else:
        assert seen["attn"] == "sdpa" and "BasisSwiGLU" in seen["basis"]
    model = ns["model"]
    torch.manual_seed(0)
    fresh = transformers.AutoModelForCausalLM.from_config(ns["config"])
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, BasisLinear | BasisSwiGLU | BasisMLP) for m in model.modules())
    assert list(model.state_dict()) == list(fresh.state_dict())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, fresh.get_parameter(n))]
    assert len(moved) == len(list(model.parameters())), "every parameter trains"


def test_trainer_with_sus_on_padded_batches(tmp_path):
    """The issue's report: SUS + Trainer + DataCollatorForLanguageModeling (padding, batch 2) raised a
    ValueError at the first step. It trains now: finite losses, every parameter moves."""
    from tokenizers import Tokenizer, models

    vocab = {str(i): i for i in range(1, V)} | {"[PAD]": 0}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[PAD]")), pad_token="[PAD]")
    documents = [{"input_ids": [(s + i) % (V - 1) + 1 for i in range(4 + s % 9)]} for s in range(12)]
    model = chainfree.apply(tiny_llama(), "sus", c=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                                          use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=documents,
                                   data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- PEFT LoRA, both orders ----

def lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lora(model, targets: list[str]):
    """get_peft_model with LoRA (r=4) on `targets`; its adapters start from the same random init every time."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))


def with_lora(method: str, order: str, targets: list[str], **settings):
    """A tiny LLaMA with LoRA on `targets` and `method` applied before ('method-then-lora') or after
    ('lora-then-method') get_peft_model."""
    if order == "method-then-lora":
        return lora(chainfree.apply(tiny_llama(), method, **settings), targets)
    return chainfree.apply(lora(tiny_llama(), targets), method, **settings)


@pytest.mark.parametrize("order", ["lora-then-method", "method-then-lora"])
def test_peft_lora_with_sus_both_orders(order):
    """Issue 28 item 3: SUS reaches the transformers model inside a PEFT model in either order. Nothing cut
    (c huge): LoRA gradients equal plain LoRA's; c = 1: stochastic (two steps differ); only LoRA trains;
    remove gives SDPA back and keeps the adapters."""
    targets = ["q_proj", "v_proj"]
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = lora(tiny_llama(), targets)
    ref = lora_grads(plain, ids)
    assert ref and all("lora_" in n for n in ref)
    uncut = with_lora("sus", order, targets, c=10**12)
    got = lora_grads(uncut, ids)
    assert uncut.get_base_model().config._attn_implementation.startswith("chainfree_sus")
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)
    noisy = with_lora("sus", order, targets, c=1)
    a, b = lora_grads(noisy, ids), lora_grads(noisy, ids)
    assert a.keys() == ref.keys() and all(torch.isfinite(g).all() for g in a.values())
    assert any(not torch.equal(a[n], b[n]) for n in a)
    chainfree.remove(noisy)
    assert noisy.get_base_model().config._attn_implementation == "sdpa"
    assert lora_grads(noisy, ids).keys() == ref.keys()


@pytest.mark.parametrize("order", ["lora-then-method", "method-then-lora"])
def test_peft_lora_with_basis_both_orders(order):
    """BASIS with LoRA in both orders (LoRA on attention and on an MLP projection): at full rank without
    shrink or scalars the sketch is exact, so LoRA gradients equal plain LoRA's -- in particular the adapter
    on up_proj inside a fused BASIS MLP is not skipped; remove restores the modules and keeps the adapters."""
    targets = ["q_proj", "v_proj", "up_proj"]
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = lora(tiny_llama(), targets)
    ref = lora_grads(plain, ids)
    model = with_lora("basis", order, targets, rank=64, shrink=0.0, scalars=False)
    assert any(isinstance(m, BasisLinear | BasisSwiGLU) for m in model.modules())
    got = lora_grads(model, ids)
    assert got.keys() == ref.keys() and any("up_proj.lora_B" in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-12, rtol=1e-9, msg=name)
    keys = list(plain.state_dict())
    chainfree.remove(model)
    assert not any(isinstance(m, BasisLinear | BasisSwiGLU) for m in model.modules())
    assert list(model.state_dict()) == keys


# ---- padded and packed batches with SUS ----

def batch(kind: str, copies: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch of 2 (as DataCollatorForLanguageModeling: 2-D attention_mask, labels -100 on
    padding), a left-padded one, or a packed row of 3 documents (as DataCollatorWithFlattening:
    position_ids restarting at 0), repeated `copies` times along the batch."""
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(0))
    if kind == "packed":
        out = {"input_ids": ids[:1], "labels": ids[:1].clone(),
               "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])}
        out["labels"][0, [0, 4, 7]] = -100  # the collator's -100 at each document's first token
    else:
        pad = torch.zeros(2, 12, dtype=torch.bool)
        pad[1, 8:] = True
        pad = pad.flip(-1) if kind == "left" else pad
        out = {"input_ids": ids.masked_fill(pad, 0), "attention_mask": (~pad).long(),
               "labels": ids.masked_fill(pad, -100)}
    return {k: v.repeat(copies, 1) for k, v in out.items()}


def embedding_grads(model, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d input embeddings): the embedding gradient sits below every attention layer, so it
    carries the SUS noise of all of them."""
    embeds = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
    rest = {k: v for k, v in b.items() if k != "input_ids"}
    loss = model(inputs_embeds=embeds, use_cache=False, **rest).loss
    (g,) = torch.autograd.grad(loss, embeds)
    return loss.detach(), g


Z_MAX = 5.0  # two-sided tail per entry: normal 5.7e-7, t with K-1 = 511 dof ~8e-7; <= 768 entries: family-wise < 1e-3


@pytest.mark.parametrize("kind", ["right", "left", "packed"])
def test_sus_padded_and_packed_loss_exact_gradients_finite_and_unbiased(kind):
    """Issue 28 item 4 through the model: the loss of a padded / packed batch equals SDPA's (the SUS forward
    is exact), gradients are finite, and K = 512 independent SUS draws average to SDPA's gradient.

    The K draws come from one call: the batch is repeated K times, and SUS hashes each batch row's keeps
    independently (bh = b*H + h), so copy k's embedding gradient is one draw (times 1/K, the loss being the
    mean over K equal copies). Per entry z = (mean - exact) / (sd / sqrt(K)); entries with no SUS noise
    (padding: its attention sees no key and is no one's key) must match to 1e-12. A 20% error in the target is rejected
    by the same statistic (power)."""
    K, c = 512, 1
    model = tiny_llama()
    exact_loss, exact = embedding_grads(model, batch(kind))
    sus = chainfree.apply(copy.deepcopy(model), "sus", c=c)
    loss, one = embedding_grads(sus, batch(kind))
    torch.testing.assert_close(loss, exact_loss, atol=1e-13, rtol=1e-12)
    assert torch.isfinite(one).all()
    if kind != "packed":  # a padded token's attention sees no key and is no key: its gradient has no SUS noise
        pad = batch(kind)["attention_mask"] == 0  # (left: the last pad predicts the first token, through its MLP)
        assert (one - exact)[pad].abs().max() < 1e-12
    torch.manual_seed(2)
    _, many = embedding_grads(sus, batch(kind, K))
    draws = many.view(K, *exact.shape) * K
    mean, sd = draws.mean(0), draws.std(0)
    noisy = sd > 1e-12
    assert noisy.sum() > 100
    z = (mean - exact)[noisy] / (sd[noisy] / math.sqrt(K))
    assert z.abs().max() < Z_MAX, f"max |z| = {z.abs().max():.2f}"
    assert (mean - exact)[~noisy].abs().max() < 1e-12
    z_off = (mean - 1.2 * exact)[noisy] / (sd[noisy] / math.sqrt(K))
    assert z_off.abs().max() > Z_MAX


# ---- undo ----

def test_apply_exact_and_remove_restore_the_original_model():
    """Issue 28 item 5: `apply(model, "exact")` after SUS (and after SUS + BASIS) restores the attention and
    the modules: same Parameters, state_dict keys and values, outputs equal to the original."""
    model = tiny_llama()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits.detach()
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    mlp_type = type(model.model.layers[0].mlp)
    chainfree.apply(model, "sus", c=4)
    chainfree.apply(model, "sus", c=8)  # a second apply must not make the first one "the original"
    assert chainfree.apply(model, "exact") is model
    assert model.config._attn_implementation == "sdpa"
    chainfree.apply(model, "sus", c=4)
    chainfree.apply(model, "basis", rank=4)
    assert isinstance(model.model.layers[0].mlp, BasisSwiGLU) and list(model.state_dict()) == keys
    lora_free_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    lora_free_loss.backward()
    assert chainfree.remove(model) is model
    assert model.config._attn_implementation == "sdpa" and type(model.model.layers[0].mlp) is mlp_type
    assert type(model.lm_head) is torch.nn.Linear
    assert list(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert chainfree.remove(model) is model  # nothing left to undo: a no-op
