"""What a user types, for every registered method x every model kind: `chainfree train` for 2 steps, the same
command again (it resumes), `chainfree generate` 3 tokens, `chainfree bench fidelity` on one batch, each in
its own process exactly as typed in a shell. A cell either works or exits non-zero with exactly one
`error:` line; a traceback fails it, and so does a cell that stops working (`WORKS` names the cells that
must train, generate and measure).

The default suite runs one cell per distinct path (`FAST`: 7 cells, about 105 CPU-seconds, so about a minute
on 2 idle cores); the whole matrix (56 cells, about 560 CPU-seconds) is marked slow:
`python -m pytest tests/test_cli_matrix.py -m slow`. Cells run two at a time, one thread each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from chainfree.config import LM_KINDS, MODEL_KINDS
from chainfree.methods import METHODS

# the same short run on every kind: two steps, tiny batches, one val batch, little text to read
COMMON = ["--steps", "2", "--device", "cpu", "--set", "train.batch_size=2", "--set", "train.eval_batches=1",
          "--set", "data.max_chars=60000"]
CHAR_RNN = ["--model", "char_rnn", "--set", "data.tokenizer=bytes", "--set", "model.seq_len=64",
            "--set", "model.d_model=32"]
# settings a method needs on the kinds it trains (the time tree: seq_len / chunk a power of two)
METHOD_ARGS = {"hbll_time": ["--set", "method.chunk=16", "--set", "method.window=8"],
               "tbptt": ["--set", "method.chunk=16"]}
# HBLL stacks its leaves, which must be alike: on the hybrid (attention every 2nd block) a leaf is 2 blocks
CELL_ARGS = {("hybrid", "hbll"): ["--set", "method.block_size=2"]}

DENSE = ("exact", "basis", "sus")  # keep the architecture: also pretrained models
STRUCTURAL = ("lbi", "hbll", "flat_bll")  # rebuild a LanguageModel's blocks
TIME = ("hbll_time", "tbptt")  # the character RNN over time
ATTENTION_KINDS = ("gpt", "hybrid")  # SUS needs attention blocks
WORKS = (
    {(k, m) for k in LM_KINDS for m in ("exact", "basis", *STRUCTURAL)}
    | {(k, "sus") for k in ATTENTION_KINDS}
    | {("char_rnn", m) for m in ("exact", "basis", *TIME)}
    | {("hf", m) for m in DENSE}
)
# methods `bench fidelity` measures (gradient estimates beside exact autograd on the same weights)
FIDELITY = {(k, m) for k, m in WORKS if m != "hbll_time"}  # hbll_time: no exact counterpart (bench/cli.py)

# one cell per distinct path through the commands, in the default suite
FAST = {("gpt", "lbi"), ("mamba3", "hbll"), ("hybrid", "sus"), ("char_rnn", "hbll_time"), ("hf", "exact"),
        ("hf", "lbi"), ("vision", "exact")}
CELLS = [(k, m) for k in MODEL_KINDS for m in METHODS]


def _cell_param(kind: str, method: str):
    marks = () if (kind, method) in FAST else (pytest.mark.slow,)
    return pytest.param(kind, method, id=f"{kind}-{method}", marks=marks)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A local transformers folder (tiny random LLaMA + a byte-level BPE tokenizer trained here) and a text
    file to fine-tune on: `model.kind = hf` without a download."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("pretrained")
    text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(300))
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    folder = root / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, corpus


def kind_args(kind: str, pretrained: tuple[Path, Path] | None) -> list[str]:
    """How a user picks the kind: a bundled tiny preset (bytes tokenizer) where there is one."""
    if kind in LM_KINDS:
        return ["--config", f"{kind}-tiny"]
    if kind == "char_rnn":
        return list(CHAR_RNN)
    if kind == "hf":
        assert pretrained is not None
        folder, corpus = pretrained
        return ["--model", "hf", "--set", f"model.pretrained={folder}", "--set", "data.corpus=text",
                "--set", f"data.path={corpus}", "--set", "model.seq_len=32"]
    return ["--model", kind, "--set", "data.tokenizer=bytes"]


def chainfree(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`chainfree ARGS` in a fresh process (the console script's entry point), one thread, wide terminal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    code = "import sys; from chainfree.cli import main; sys.argv[0] = 'chainfree'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def works_or_one_error_line(proc: subprocess.CompletedProcess[str], what: str) -> bool:
    """True when the command worked; False when it refused with exactly one `error:` line; fails otherwise."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, f"{what} raised:\n{output[-3000:]}"
    if proc.returncode == 0:
        return True
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{what} exited {proc.returncode} without exactly one error: line:\n{output[-3000:]}"
    return False


def run_cell(kind: str, method: str, root: Path, pretrained: tuple[Path, Path] | None) -> None:
    out = root / "run"
    train = ["train", *kind_args(kind, pretrained), "--method", method, *COMMON, *METHOD_ARGS.get(method, []),
             *CELL_ARGS.get((kind, method), []), "--out", str(out)]
    first = chainfree(*train, cwd=root)
    trained = works_or_one_error_line(first, f"train {kind}/{method}")
    assert trained == ((kind, method) in WORKS), (
        f"{kind}/{method}: train {'worked' if trained else 'refused'} but WORKS says otherwise: "
        f"{first.stderr.strip()[-500:]}")
    if not trained:
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_val_loss"])

    again = chainfree(*train, cwd=root)  # the same command: resumes from step 2, trains nothing more
    assert works_or_one_error_line(again, f"resume {kind}/{method}"), again.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps

    gen = chainfree("generate", "--out", str(out), "--max-new-tokens", "3", "--temperature", "0",
                    "--prompt", "the ", cwd=root)
    assert works_or_one_error_line(gen, f"generate {kind}/{method}"), gen.stderr[-2000:]
    assert "tokens/s" in gen.stderr and gen.stdout.strip()

    fid = chainfree("bench", "fidelity", "--method", method, "--checkpoint", str(out), "--batches", "1",
                    "--k", "2", "--device", "cpu", "--out", str(root / "fidelity"), cwd=root)
    measured = works_or_one_error_line(fid, f"bench fidelity {kind}/{method}")
    assert measured == ((kind, method) in FIDELITY), (
        f"{kind}/{method}: bench fidelity {'worked' if measured else 'refused'}: {fid.stderr.strip()[-500:]}")

    if kind == "hf":  # a pretrained run records what ran, not the settings that do not apply to it
        recorded = tomllib.loads((out / "config.toml").read_text())
        assert "d_model" not in recorded["model"] and "tokenizer" not in recorded["data"]
        assert recorded["recorded"]["architecture"] == "LlamaForCausalLM"
        assert recorded["recorded"]["num_hidden_layers"] == 2 and recorded["recorded"]["hidden_size"] == 32
        assert recorded["recorded"]["tokenizer"] and len(recorded["recorded"]["tokenizer_identity"]) == 16
        assert recorded["recorded"]["tokenizer_vocab_size"] == recorded["model"]["vocab_size"]
        assert recorded["train"]["lr"] == 5e-5  # a fine-tuning default, not the from-scratch 3e-3
        assert "KV cache" in gen.stderr


@pytest.fixture(scope="module")
def cell_runs(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Future]:
    """Every selected cell of this session, started at once on a pool of one worker per CPU core (at most 2:
    each command runs one thread, and the cells are independent), so the matrix takes about half the time on
    CI's 2 cores; each test waits for its own cell."""
    selected = [(item.callspec.params["kind"], item.callspec.params["method"]) for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec")]
    pretrained = request.getfixturevalue("pretrained") if any(k == "hf" for k, _ in selected) else None
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    request.addfinalizer(lambda: pool.shutdown(wait=True, cancel_futures=True))
    return {(k, m): pool.submit(run_cell, k, m, tmp_path_factory.mktemp(f"{k}-{m}"), pretrained)
            for k, m in selected}


@pytest.mark.parametrize(("kind", "method"), [_cell_param(k, m) for k, m in CELLS])
def test_cli_cell(kind: str, method: str, cell_runs: dict[tuple[str, str], Future]) -> None:
    cell_runs[(kind, method)].result()  # re-raises the cell's failure here


def test_the_matrix_covers_every_method_and_kind() -> None:
    """Every registered method trains on some kind, and the fast subset reaches every method family."""
    assert {m for _, m in WORKS} == set(METHODS)
    assert {k for k, _ in WORKS} == set(MODEL_KINDS) - {"vision"}
    assert FAST <= set(CELLS) and FIDELITY <= WORKS
