"""The data layer of the LLaMA benchmark: offline corpora, split by document, cached tokenizer, batches."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")

from coap_bench import text
from coap_bench._deps import MissingExtraError
from coap_bench.text import (
    Corpus,
    Document,
    TokenBatches,
    builtin_corpus,
    folder_corpus,
    heldout_windows,
    is_heldout,
    load_token_data,
    split_documents,
)

VOCAB = 512
# A small slice of the built-in corpus keeps tokenizer training quick; 30% held out so both splits are non-empty.
SMALL = {"max_documents": 30, "heldout_percent": 30, "vocab_size": VOCAB}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return load_token_data(cache_dir=tmp_path_factory.mktemp("cache"), **SMALL)


def test_builtin_corpus_is_python_docs_sorted_and_split(tmp_path):
    corpus = builtin_corpus()
    ids = [doc.id for doc in corpus.documents]
    assert len(corpus) > 100 and ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "topic:assert" in ids and "module:json" in ids
    assert all(len(doc.text) >= text.MIN_DOCSTRING_CHARS for doc in corpus.documents if doc.id.startswith("module:"))
    assert not any(doc.id.startswith(("module:test", "module:idlelib", "module:lib2to3")) for doc in corpus.documents)
    assert 100_000 < corpus.chars < 5_000_000
    assert corpus.python_version and builtin_corpus().sha256 == corpus.sha256
    train, heldout = split_documents(corpus)
    assert train and heldout and len(train) + len(heldout) == len(corpus)

    data = load_token_data(vocab_size=VOCAB, cache_dir=tmp_path)
    assert data.corpus.train_documents == len(train) and data.corpus.heldout_documents == len(heldout)
    assert data.corpus_sha256 == corpus.sha256 and data.corpus.python_version == corpus.python_version
    assert data.train.numel() > 0 and data.heldout.numel() > 0


def test_two_loads_give_identical_data(small, tmp_path):
    again = load_token_data(cache_dir=tmp_path, **SMALL)  # a fresh cache: trained and tokenized again
    assert not again.from_cache and again.tokenizer_seconds is not None
    for key in ("corpus_sha256", "train_sha256", "heldout_sha256", "vocab_size", "eos_id", "corpus"):
        assert getattr(again, key) == getattr(small, key), key
    assert torch.equal(again.train, small.train) and torch.equal(again.heldout, small.heldout)


def test_token_tensors(small):
    assert small.vocab_size == VOCAB
    for tokens, docs in ((small.train, small.corpus.train_documents), (small.heldout, small.corpus.heldout_documents)):
        assert tokens.dtype == torch.long and tokens.dim() == 1
        assert 0 <= int(tokens.min()) and int(tokens.max()) < small.vocab_size
        # The end-of-text id only between documents (no document text contains the special token).
        assert int((tokens == small.eos_id).sum()) == docs - 1
    assert small.train_sha256 == text.tensor_sha256(small.train)
    assert small.train_sha256 == text.tensor_sha256(small.train.int())  # independent of the dtype

    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(small.tokenizer_path)
    first_heldout = split_documents(builtin_corpus(max_documents=30), 30)[1][0]
    end = small.heldout.tolist().index(small.eos_id) if small.corpus.heldout_documents > 1 else None
    assert tokenizer.decode(small.heldout[:end].tolist()) == first_heldout.text  # byte-level BPE round-trips


def test_split_is_by_document_and_stable():
    corpus = builtin_corpus()
    train, heldout = split_documents(corpus)
    assert not {d.id for d in train} & {d.id for d in heldout}
    assert all(is_heldout(d.id) for d in heldout) and not any(is_heldout(d.id) for d in train)
    # Removing a document (from either split) leaves every other document where it was.
    for removed in (train[0], heldout[0]):
        rest = Corpus("rest", tuple(d for d in corpus.documents if d != removed))
        train2, heldout2 = split_documents(rest)
        assert [d.id for d in train2] == [d.id for d in train if d != removed]
        assert [d.id for d in heldout2] == [d.id for d in heldout if d != removed]
        assert rest.sha256 != corpus.sha256


def test_second_load_uses_the_cache(small, tmp_path, monkeypatch):
    first = load_token_data(cache_dir=tmp_path, **SMALL)

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(text, "train_tokenizer", no_training)
    second = load_token_data(cache_dir=tmp_path, **SMALL)
    assert second.from_cache and second.tokenizer_seconds is None
    assert (second.train_sha256, second.heldout_sha256) == (first.train_sha256, first.heldout_sha256)
    # Without the token file, the cached tokenizer tokenizes again, to the same tokens.
    tokens_file = Path(first.tokenizer_path).with_name("tokens.pt")
    tokens_file.unlink()
    third = load_token_data(cache_dir=tmp_path, **SMALL)
    assert not third.from_cache and third.train_sha256 == first.train_sha256
    # A corrupt token file is tokenized again, too.
    tokens_file.write_bytes(b"not a torch file")
    fourth = load_token_data(cache_dir=tmp_path, **SMALL)
    assert not fourth.from_cache and fourth.heldout_sha256 == first.heldout_sha256
    assert load_token_data(cache_dir=tmp_path, **SMALL).from_cache
    # Another vocabulary size is another cache entry: it needs training.
    with pytest.raises(AssertionError, match="trained again"):
        load_token_data(cache_dir=tmp_path, **{**SMALL, "vocab_size": VOCAB + 64})


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COAP_TORCH_CACHE", str(tmp_path / "c"))
    assert text.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COAP_TORCH_CACHE")
    assert text.default_cache_dir().parts[-2:] == (".cache", "coap-torch")


def test_folder_corpus(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    words = "the quick brown fox jumps over the lazy dog and runs away into the forest again "
    for i in range(12):
        folder = root / "sub" if i % 2 else root
        (folder / f"doc{i:02d}.{'md' if i % 3 == 0 else 'txt'}").write_text(f"Document {i}. " + words * (i + 3))
    (root / "ignored.py").write_text("print('not text')")
    (root / "blank.txt").write_text("  \n")
    corpus = folder_corpus(root)
    assert len(corpus) == 12 and corpus.name == "folder:texts"
    assert corpus.documents[0].id == "file:doc00.md" and corpus.documents[-1].id == "file:sub/doc11.txt"
    assert folder_corpus(root).sha256 == corpus.sha256

    data = load_token_data(data_dir=root, vocab_size=300, cache_dir=tmp_path / "cache", heldout_percent=40)
    assert data.corpus.name == "folder:texts"
    assert data.corpus.train_documents + data.corpus.heldout_documents == 12
    assert data.vocab_size <= 300 and data.train.numel() > 0 and data.heldout.numel() > 0

    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no non-empty \*\.txt or \*\.md"):
        folder_corpus(tmp_path / "empty")


def test_errors(tmp_path):
    one = Corpus("one", (Document("only", "a single document"),))
    with pytest.raises(ValueError, match="each split needs at least one"):
        split_documents(one)
    with pytest.raises(ValueError, match="heldout_percent"):
        split_documents(builtin_corpus(max_documents=30), 0)
    with pytest.raises(ValueError, match="unknown text source"):
        load_token_data("wikipedia", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_token_data("folder", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        load_token_data(cache_dir=tmp_path, **{**SMALL, "vocab_size": 100})
    with pytest.raises(ValueError, match="duplicate"):
        Corpus("dup", (Document("a", "x"), Document("a", "y")))


def test_c4_without_datasets_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail even where it is installed
    with pytest.raises(MissingExtraError, match="needs datasets"):
        load_token_data("c4", cache_dir=tmp_path)


class _FakeT5:
    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[2 + ord(c) % 50 for c in t] for t in texts]}

    def __len__(self):
        return 52


def _fake_hub(monkeypatch, *, offline: bool) -> list:
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        if offline:
            raise ConnectionError("no route to huggingface.co")
        return ({"text": f"{split} document {i}", "url": "u"} for i in range(10**6))

    datasets = types.SimpleNamespace(load_dataset=load_dataset)
    auto = types.SimpleNamespace(from_pretrained=lambda name, **kwargs: _FakeT5())
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoTokenizer=auto))
    return calls


def test_c4_offline_says_it_needs_internet(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, offline=True)
    with pytest.raises(RuntimeError, match="needs internet access"):
        load_token_data("c4", cache_dir=tmp_path)


def test_c4_path_with_a_fake_hub(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, offline=False)
    data = load_token_data("c4", cache_dir=tmp_path, c4_train_documents=5, c4_heldout_documents=3)
    assert calls == [("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True)]
    assert (data.corpus.train_documents, data.corpus.heldout_documents) == (5, 3)
    assert data.vocab_size == 52 and data.eos_id == 1 and data.tokenizer_path == "t5-base"
    assert int((data.train == 1).sum()) == 4 and int((data.heldout == 1).sum()) == 2
    cached = load_token_data("c4", cache_dir=tmp_path, c4_train_documents=5, c4_heldout_documents=3)
    assert cached.from_cache and len(calls) == 2  # no second download
    assert (cached.train_sha256, cached.corpus) == (data.train_sha256, data.corpus)


def test_batches_are_windows_and_resume_exactly(small):
    seq_len, batch_size = 16, 4
    batches = TokenBatches(small, batch_size, seq_len, seed=3)
    first = [batches.next() for _ in range(3)]
    for batch in first:
        assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == torch.long
        for row in batch:  # each row is one contiguous window of the training tokens
            windows = small.train.unfold(0, seq_len + 1, 1)
            assert (windows == row).all(dim=1).any()

    buffer = io.BytesIO()
    torch.save(batches.state_dict(), buffer)
    expected = [batches.next() for _ in range(4)]

    buffer.seek(0)
    resumed = TokenBatches(small.train, batch_size, seq_len, seed=123)  # the saved state wins over the seed
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 3
    assert all(torch.equal(a, b) for a, b in zip(expected, (resumed.next() for _ in range(4))))

    # Same seed, same batches; another seed, other batches; the global RNG is neither used nor moved.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    again = TokenBatches(small, batch_size, seq_len, seed=3)
    assert all(torch.equal(a, again.next()) for a in first)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(TokenBatches(small, batch_size, seq_len, seed=4).next(), first[0])

    with pytest.raises(ValueError, match="saved with seq_len=16"):
        TokenBatches(small, batch_size, 8).load_state_dict(batches.state_dict())
    with pytest.raises(ValueError, match="too few"):
        TokenBatches(torch.arange(5), 2, 8)


def test_heldout_windows(small):
    seq_len = 32
    windows = heldout_windows(small, seq_len)
    count = small.heldout.numel() // (seq_len + 1)
    assert windows.shape == (count, seq_len + 1) and windows.dtype == torch.long
    assert torch.equal(windows.reshape(-1), small.heldout[: count * (seq_len + 1)])  # disjoint, in order
    assert torch.equal(heldout_windows(small, seq_len), windows)
    assert torch.equal(heldout_windows(small, seq_len, max_windows=2), windows[:2])
    assert heldout_windows(small.heldout, seq_len, max_windows=10**9).shape[0] == count
    with pytest.raises(ValueError, match="too few"):
        heldout_windows(small, small.heldout.numel())
