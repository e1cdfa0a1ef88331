"""Generation: stepping the recurrent states (KV cache, Mamba-2 conv+SSM state, Mamba-3 angle+SSM+previous
input) reproduces the parallel forward's logits in float64 for all four kinds; sampling is seeded and
well-formed; a trained run directory round-trips through `load_trained`."""

from __future__ import annotations

import pytest
import torch

from chainfree.config import ModelConfig
from chainfree.errors import CheckpointError, ConfigError
from chainfree.generate import generate, init_states, prefill, sample, step
from chainfree.models.lm import LanguageModel

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
V = 40

KINDS = {
    "gpt": dict(kind="gpt", n_kv_heads=2),
    "mamba2": dict(kind="mamba2"),
    "mamba3": dict(kind="mamba3"),
    "mamba3-mimo": dict(kind="mamba3", mimo_rank=2),
    "hybrid": dict(kind="hybrid", attn_every=2, n_kv_heads=2),
    "hybrid-mamba2": dict(kind="hybrid", attn_every=2, hybrid_mixer="mamba2"),
}


def tiny_model(name: str, seed: int = 0) -> LanguageModel:
    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=4, n_heads=4, seq_len=24, d_state=8, ssm_head_dim=8,
                      chunk_size=4, mlp_hidden=32, **KINDS[name])
    torch.manual_seed(seed)
    model = LanguageModel(cfg).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move parameters off their symmetric initial values (B/C biases = 1, D = 1, ...)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("name", list(KINDS))
def test_stepwise_logits_equal_parallel_forward(name):
    model = tiny_model(name)
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = model(ids)
        states = init_states(model, 2, "cpu", f64)
        stepped = []
        for t in range(ids.shape[1]):
            logits, states = step(model, ids[:, t], states)
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), parallel, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(KINDS))
def test_prefill_then_step_equals_parallel_forward(name):
    model = tiny_model(name)
    ids = torch.randint(0, V, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(ids)
        logits, states = prefill(model, ids[:, :9])
        got = [logits]
        for t in range(9, ids.shape[1] - 1):
            logits, states = step(model, ids[:, t], states)
            got.append(logits)
    torch.testing.assert_close(torch.stack(got, 1), parallel[:, 8:-1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gpt", "mamba3", "hybrid"])
def test_greedy_generation_matches_argmax_of_parallel_forward(name):
    model = tiny_model(name)
    prompt = torch.randint(0, V, (5,), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (11,) and torch.equal(out[:5], prompt)
    with torch.no_grad():
        for t in range(5, 11):  # each new token is the argmax of the full parallel forward on what came before
            assert out[t] == model(out[None, :t])[0, -1].argmax()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("mamba2")
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(3))
    a = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 12)
    greedy = generate(model, prompt, 8, temperature=0.0)
    top1 = generate(model, prompt, 8, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, top1)


def test_top_k_restricts_support():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(4000, 1)
    draws = sample(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}
    # P(token 1 | top-2) = 1 / (1 + e^-1) = 0.731; 4000 draws: standard error 0.007, allow 5 of them
    assert abs((draws == 1).double().mean().item() - 1 / (1 + torch.e**-1)) < 5 * 0.0070


def test_bad_arguments_are_named():
    model = tiny_model("mamba2")
    with pytest.raises(ConfigError, match="--temperature"):
        generate(model, torch.tensor([1, 2]), 3, temperature=-1)
    with pytest.raises(ConfigError, match="--temperature must be a finite number >= 0"):
        generate(model, torch.tensor([1, 2]), 3, temperature=float("nan"))
    with pytest.raises(ConfigError, match="--top-k must be >= 1"):
        generate(model, torch.tensor([1, 2]), 3, top_k=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros(0, dtype=torch.long), 3)


def test_load_trained_round_trip(tmp_path):
    from chainfree.config import load_config
    from chainfree.errors import ConfigError
    from chainfree.generate import load_trained
    from chainfree.train import train

    with pytest.raises(ConfigError, match="holds no trained run"):
        load_trained(tmp_path / "nothing")
    cfg = load_config("mamba3-tiny", ["train.steps=2", "train.eval_every=2", "train.eval_batches=1",
                                      "train.batch_size=2", "train.device='cpu'", "data.max_chars=20000"])
    train(cfg, tmp_path / "run", progress=False)
    model, tok = load_trained(tmp_path / "run", "cpu")
    ids = torch.tensor(tok.encode("ROMEO: "))
    out = generate(model, ids, 5, temperature=0.0)
    assert out.shape == (len(ids) + 5,)
    assert isinstance(tok.decode(out.tolist()), str)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step GPT run (bytes tokenizer), trained once for the reader tests below."""
    from chainfree.config import load_config
    from chainfree.train import train

    out = tmp_path_factory.mktemp("gen") / "run"
    overrides = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=32",
                 'data.tokenizer="bytes"', "data.max_chars=300000", "train.batch_size=4", "train.steps=2",
                 "train.eval_every=2", "train.eval_batches=1", 'train.device="cpu"']
    train(load_config(overrides=overrides), out, progress=False)
    return out


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_load_trained_refuses_byte_flipped_weights(trained_run, tmp_path):
    from chainfree.generate import load_trained

    run = _copy(trained_run, tmp_path)
    weights = next((run / "checkpoint").glob("step_*")) / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-7] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_trained(run, "cpu")


@pytest.mark.parametrize("target", ["latest", "state.json"])
def test_load_trained_corrupt_json_is_one_line(trained_run, tmp_path, target):
    from chainfree.generate import load_trained

    run = _copy(trained_run, tmp_path)
    ckpt = run / "checkpoint"
    path = ckpt / "latest" if target == "latest" else next(ckpt.glob("step_*")) / "state.json"
    path.write_text('{"step": ')
    with pytest.raises(CheckpointError) as e:  # state.json: its checksum no longer holds; latest: unreadable
        load_trained(run, "cpu")
    assert "\n" not in str(e.value) and ("unreadable" in str(e.value) or "corrupt" in str(e.value))


def test_load_trained_on_a_compare_folder_names_its_runs(trained_run, tmp_path):
    import shutil

    from chainfree.generate import load_trained

    shutil.copytree(trained_run, tmp_path / "compare" / "exact")
    shutil.copytree(trained_run, tmp_path / "compare" / "sus")
    with pytest.raises(ConfigError, match=r"holds the runs exact, sus.*--out .*compare/exact"):
        load_trained(tmp_path / "compare", "cpu")


def _tiny_hf(seed: int = 0):
    """A tiny random LLaMA in memory behind chainfree's pretrained-model wrapper (no download)."""
    transformers = pytest.importorskip("transformers")
    from chainfree.models import hf as hfm

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return hfm.wrap(transformers.LlamaForCausalLM(config).double(), seq_len=64)


def test_pretrained_generation_decodes_with_the_kv_cache():
    """generate() on a pretrained model feeds the prompt once and then one token per step (a KV cache), not
    the whole window per token, and gives the same greedy tokens as re-running the full forward."""
    from chainfree.generate import decode_path

    model = _tiny_hf()
    lengths: list[int] = []
    hook = model.hf.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    prompt = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, max_new_tokens=5, temperature=0.0)
    hook.remove()
    assert lengths == [7, 1, 1, 1, 1]
    assert decode_path(model) == "KV cache"
    with torch.no_grad():
        ids = prompt[None]
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids[0])


def test_decode_path_names_how_each_model_decodes():
    from chainfree.generate import decode_path

    assert decode_path(tiny_model("hybrid")) == "prefill + per-block KV cache / recurrent state"
    rnn = torch.nn.GRU(4, 4)  # no blocks, no cache: a full forward per token
    assert decode_path(rnn).startswith("full forward over all tokens so far")


def test_generate_command_on_an_lbi_run_prints_text_and_rate(tmp_path):
    """`chainfree generate --out RUN` on a run whose model is a method's wrapper (LBI regions: no .embed)
    samples from it and reports tokens/s (it raised AttributeError: 'LBIModel' object has no attribute 'embed')."""
    from typer.testing import CliRunner

    from chainfree.cli import app
    from chainfree.config import load_config
    from chainfree.train import train

    cfg = load_config("gpt-tiny", ["train.steps=1", "train.eval_batches=1", "train.batch_size=2",
                                   "train.device='cpu'", "data.max_chars=20000"], method="lbi")
    train(cfg, tmp_path / "run", progress=False)
    result = CliRunner().invoke(app, ["generate", "--out", str(tmp_path / "run"), "--max-new-tokens", "3",
                                      "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "3 new tokens in" in result.output and "tokens/s" in result.output
    assert "full forward over the last 64 tokens per token" in result.output
