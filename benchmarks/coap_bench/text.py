"""Token data for the LLaMA pretraining benchmark: an offline corpus, a local tokenizer, batches.

Three sources of text:

* the **built-in corpus** (the default): text that ships with Python itself, so nothing is
  downloaded. Each help topic of :mod:`pydoc_data.topics` is one document (``topic:<name>``), and
  each standard-library module is one document (``module:<dotted name>``): its docstring and the
  docstrings of its classes and functions, when they add up to at least
  :data:`MIN_DOCSTRING_CHARS` characters. Docstrings are read with :func:`ast.get_docstring`,
  never by importing the modules. About 2.2 million characters (600 thousand tokens at the
  default vocabulary) with Python 3.11. The corpus depends on the Python version, which is recorded with it;
  machines with the same version get the same documents in the same order (sorted by id).
* :func:`folder_corpus`: any folder of plain-text files (``*.txt``, ``*.md``), one document each.
* ``"c4"``: the English C4 corpus streamed from the Hugging Face Hub with the ``t5-base``
  tokenizer, as in the paper (needs internet access and the ``datasets`` package).

For the first two, documents are split into training and held-out sets by a hash of their id
(:func:`is_heldout`), so adding or removing a document never moves another one between the splits.
A byte-level BPE tokenizer is trained with ``tokenizers`` on the training documents only, and both
the tokenizer and the token tensors are cached on disk (:func:`default_cache_dir`), keyed by the
corpus hash, the vocabulary size and the split.

:class:`TokenBatches` draws training windows at seeded random offsets and can be checkpointed and
resumed exactly; :func:`heldout_windows` cuts the held-out tokens into fixed windows.
"""

from __future__ import annotations

import array
import ast
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import platform
import re
import stat
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._deps import require

__all__ = [
    "Corpus",
    "CorpusInfo",
    "Document",
    "TokenBatches",
    "TokenData",
    "builtin_corpus",
    "default_cache_dir",
    "folder_corpus",
    "heldout_windows",
    "is_heldout",
    "load_token_data",
    "remove_stale_temporaries",
    "split_documents",
    "tensor_sha256",
    "train_tokenizer",
]

#: Special token put between documents (and the only special token of the local tokenizers).
EOS_TOKEN = "<|endoftext|>"
#: Default vocabulary size of the local byte-level BPE tokenizer.
DEFAULT_VOCAB_SIZE = 4096
#: Default share of documents (in percent) held out.
DEFAULT_HELDOUT_PERCENT = 10
#: Modules whose documentation (all docstrings together) is shorter than this are left out of the built-in corpus.
MIN_DOCSTRING_CHARS = 200
#: Standard-library folders that are not walked (tests, the IDE, third-party packages, old tools).
SKIPPED_STDLIB_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "turtledemo",
        "lib-dynload",
        "__pycache__",
    }
)
#: Name of the built-in corpus.
BUILTIN_NAME = "python-docs"
#: Name of the streamed C4 corpus and its tokenizer.
C4_NAME = "c4"
C4_TOKENIZER = "t5-base"
#: Default number of C4 documents read for each split (train from ``train``, held out from ``validation``).
C4_TRAIN_DOCUMENTS = 20_000
C4_HELDOUT_DOCUMENTS = 1_000
#: Bumped when the cached files change meaning, so that old caches are not reused.
_CACHE_FORMAT = 1
#: A temporary cache file older than this was left by a killed process (a live write takes a second or
#: so); younger ones may be another process's write in progress, and are left alone.
_STALE_CACHE_TMP_S = 600.0
_TOKENIZERS_HINT = "pip install tokenizers"
_C4_HINT = "pip install datasets transformers"


# --------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Document:
    """One document: a stable id and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents sorted by id, with the hash that identifies them."""

    name: str
    documents: tuple[Document, ...]
    python_version: str | None = None

    def __post_init__(self) -> None:
        ids = [doc.id for doc in self.documents]
        if ids != sorted(ids):
            object.__setattr__(self, "documents", tuple(sorted(self.documents, key=lambda doc: doc.id)))
            ids.sort()
        if len(set(ids)) != len(ids):
            raise ValueError(f"corpus {self.name!r} has duplicate document ids")

    @property
    def sha256(self) -> str:
        """sha256 over every (id, text), in order, each length-prefixed (so the encoding is unambiguous)."""
        digest = hashlib.sha256()
        for doc in self.documents:
            for part in (doc.id, doc.text):
                data = part.encode("utf-8")
                digest.update(f"{len(data)}:".encode())
                digest.update(data)
        return digest.hexdigest()

    @property
    def chars(self) -> int:
        return sum(len(doc.text) for doc in self.documents)

    def __len__(self) -> int:
        return len(self.documents)


def _documented(tree: ast.Module) -> list[str]:
    """The module docstring, then ``qualname`` + docstring of every documented class and function, in source order."""
    parts: list[str] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    parts.append(f"{name}\n{doc}")
                visit(child, f"{name}.")

    visit(tree, "")
    return parts


@functools.lru_cache(maxsize=4)
def _stdlib_docstrings(root: Path) -> tuple[tuple[str, str], ...]:
    """(dotted module name, documentation) of every standard-library module under ``root``.

    A module's documentation is its docstring followed by the docstrings of its classes and
    functions (each headed by its qualified name), as :func:`_documented` joins them. Parsing the
    standard library takes a few seconds, so the result is kept for the process.
    """
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Walk packages only (a folder with an __init__.py), never the skipped ones; sorted for determinism.
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIPPED_STDLIB_DIRS and not d.startswith("config-") and (here / d / "__init__.py").is_file()
        )
        rel = here.relative_to(root)
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith("_sysconfigdata"):
                continue
            stem = filename[: -len(".py")]
            parts = rel.parts if stem == "__init__" else (*rel.parts, stem)
            if not parts or parts == (".",):
                continue
            try:
                tree = ast.parse((here / filename).read_bytes())
            except (SyntaxError, ValueError, OSError):
                continue
            doc = "\n\n".join(_documented(tree))
            if len(doc) >= MIN_DOCSTRING_CHARS:
                found[".".join(p for p in parts if p != ".")] = doc
    return tuple(sorted(found.items()))


def builtin_corpus(*, max_documents: int | None = None) -> Corpus:
    """The corpus that ships with Python: the ``pydoc`` help topics and the stdlib module docstrings.

    ``max_documents`` keeps only the first documents by id (for quick tests); the hash changes with it.
    """
    from pydoc_data.topics import topics

    documents = [Document(f"topic:{name}", text) for name, text in topics.items() if text.strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents += [Document(f"module:{name}", text) for name, text in _stdlib_docstrings(stdlib)]
    documents.sort(key=lambda doc: doc.id)
    if max_documents is not None:
        if max_documents < 2:
            raise ValueError(f"max_documents must be at least 2, got {max_documents}")
        documents = documents[:max_documents]
    return Corpus(BUILTIN_NAME, tuple(documents), python_version=platform.python_version())


def folder_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Every ``*.txt`` and ``*.md`` file under ``path`` (recursively) as one document, sorted by relative path.

    Document ids are ``file:<relative path>`` with ``/`` separators, so the hash does not depend on
    where the folder lies. Files with only whitespace are skipped.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"text corpus folder {str(root)!r} does not exist or is not a folder")
    documents = []
    for file in sorted(root.rglob("*")):
        if file.suffix.lower() not in (".txt", ".md") or not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            documents.append(Document(f"file:{file.relative_to(root).as_posix()}", text))
    if not documents:
        raise ValueError(f"text corpus folder {str(root)!r} has no non-empty *.txt or *.md file")
    return Corpus(f"folder:{root.name}", tuple(documents))


def is_heldout(document_id: str, heldout_percent: float = DEFAULT_HELDOUT_PERCENT) -> bool:
    """Whether a document is held out: ``sha256(id) mod 100 < heldout_percent``, independent of other documents."""
    bucket = int.from_bytes(hashlib.sha256(document_id.encode("utf-8")).digest()[:8], "big") % 100
    return bucket < heldout_percent


def split_documents(
    corpus: Corpus, heldout_percent: float = DEFAULT_HELDOUT_PERCENT
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents of ``corpus``, split by :func:`is_heldout`; both must be non-empty."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in (0, 100), got {heldout_percent}")
    train, heldout = [], []
    for doc in corpus.documents:
        (heldout if is_heldout(doc.id, heldout_percent) else train).append(doc)
    if not train or not heldout:
        raise ValueError(
            f"corpus {corpus.name!r} with {len(corpus)} documents gives {len(train)} training and {len(heldout)} "
            f"held-out documents ({heldout_percent:g}% are held out, picked by a hash of their id); each split "
            "needs at least one document: give more documents (for coap-bench llama, a --data-dir folder with "
            "more *.txt / *.md files)"
        )
    return train, heldout


# ------------------------------------------------------------------------------------------ tokenizer


def default_cache_dir() -> Path:
    """``$COAP_TORCH_CACHE`` if set, else ``~/.cache/coap-torch``."""
    env = os.environ.get("COAP_TORCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "coap-torch"


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Train a byte-level BPE :class:`tokenizers.Tokenizer` on ``texts``, with :data:`EOS_TOKEN` as special token."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, {EOS_TOKEN}, one merge), got {vocab_size}")
    tk = require("tokenizers", hint=_TOKENIZERS_HINT)
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tensor_sha256(tokens: Tensor) -> str:
    """sha256 of the token ids as little-endian int32 (the same on every machine and for any integer dtype)."""
    values = array.array("i", tokens.reshape(-1).tolist())
    if values.itemsize != 4:  # pragma: no cover - every mainstream platform has a 4-byte C int
        values = array.array("l", values)
    if sys.byteorder == "big":  # pragma: no cover
        values.byteswap()
    return hashlib.sha256(values.tobytes()).hexdigest()


def _concat(token_lists: Sequence[Sequence[int]], eos_id: int) -> Tensor:
    """The documents' tokens joined with ``eos_id`` between documents, as a 1-D long tensor."""
    flat: list[int] = []
    for i, ids in enumerate(token_lists):
        if i:
            flat.append(eos_id)
        flat.extend(ids)
    return torch.tensor(flat, dtype=torch.long)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a partial file.

    The temporary file is ``.<name>.<8 random characters>.tmp``; one left by a process killed while
    writing is removed by :func:`remove_stale_temporaries`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as written:  # on disk before the rename: a crash leaves the old file or the new one
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(path: str | os.PathLike[str], *, older_than_s: float = 0.0) -> list[Path]:
    """Remove the temporary files that :func:`_atomic_write` left for ``path`` when killed while writing it
    (and that were last modified at least ``older_than_s`` seconds ago); the paths removed.

    Only names that :func:`_atomic_write` gives to ``path``'s temporaries are matched:
    ``.<name>.`` + the 8 characters :func:`tempfile.mkstemp` draws + ``.tmp``, never another file.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        candidates = [path.parent / name for name in os.listdir(path.parent) if pattern.fullmatch(name)]
    except OSError:  # no folder yet, or not readable: nothing to clean
        return []
    removed = []
    for candidate in candidates:
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            info = candidate.lstat()
            if stat.S_ISREG(info.st_mode) and (older_than_s <= 0 or time.time() - info.st_mtime >= older_than_s):
                candidate.unlink()
                removed.append(candidate)
    return removed


# ----------------------------------------------------------------------------------------- token data


@dataclass(frozen=True)
class CorpusInfo:
    """What a :class:`TokenData` was made from (JSON-friendly)."""

    name: str
    train_documents: int
    heldout_documents: int
    train_chars: int
    heldout_chars: int
    heldout_percent: float | None
    python_version: str | None = None


@dataclass
class TokenData:
    """Training and held-out tokens (1-D ``torch.long``, documents joined by ``eos_id``) and their provenance."""

    train: Tensor
    heldout: Tensor
    vocab_size: int
    eos_id: int
    corpus: CorpusInfo
    corpus_sha256: str
    train_sha256: str
    heldout_sha256: str
    tokenizer_path: str
    from_cache: bool = False
    tokenizer_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        """Everything but the tensors, for a JSON report."""
        return {
            "corpus": dataclasses.asdict(self.corpus),
            "corpus_sha256": self.corpus_sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "train_tokens": int(self.train.numel()),
            "heldout_tokens": int(self.heldout.numel()),
            "train_sha256": self.train_sha256,
            "heldout_sha256": self.heldout_sha256,
            "tokenizer": self.tokenizer_path,
            "from_cache": self.from_cache,
            "tokenizer_seconds": self.tokenizer_seconds,
        }


def _resolve_corpus(
    source: str | Corpus | None, data_dir: str | os.PathLike[str] | None, max_documents: int | None
) -> Corpus:
    if isinstance(source, Corpus):
        if data_dir is not None:
            raise ValueError("give either a Corpus or data_dir, not both")
        return source
    if source in ("builtin", BUILTIN_NAME) and data_dir is not None:
        raise ValueError("the built-in corpus ships with Python; data_dir does not apply (use source='folder')")
    if source in (None, "builtin", BUILTIN_NAME) and data_dir is None:
        return builtin_corpus(max_documents=max_documents)
    if source in (None, "folder"):
        if data_dir is None:
            raise ValueError("source='folder' needs data_dir (a folder of *.txt / *.md files)")
        corpus = folder_corpus(data_dir)
        if max_documents is not None:
            corpus = Corpus(corpus.name, corpus.documents[:max_documents])
        return corpus
    raise ValueError(
        f"unknown text source {source!r}: use None or 'builtin' (Python's own docs), 'folder' with data_dir, or 'c4'"
    )


def load_token_data(
    source: str | Corpus | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    heldout_percent: float = DEFAULT_HELDOUT_PERCENT,
    max_documents: int | None = None,
    c4_train_documents: int = C4_TRAIN_DOCUMENTS,
    c4_heldout_documents: int = C4_HELDOUT_DOCUMENTS,
) -> TokenData:
    """Tokenized training and held-out data.

    ``source``: ``None`` / ``"builtin"`` (the corpus that ships with Python; a folder if ``data_dir``
    is given), ``"folder"`` (needs ``data_dir``), ``"c4"`` (streamed; ``vocab_size`` and
    ``heldout_percent`` do not apply: the ``t5-base`` vocabulary and C4's own validation split are
    used), or a :class:`Corpus`. ``max_documents`` keeps the first documents of a local corpus.

    The tokenizer is trained on the training documents only. Tokenizer and tokens are cached under
    ``cache_dir`` (default :func:`default_cache_dir`); a second call with the same corpus, vocabulary
    size and split loads them instead of training again.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source == C4_NAME:
        if data_dir is not None:
            raise ValueError("source='c4' streams from the Hugging Face Hub; data_dir does not apply")
        return _load_c4(cache_root, c4_train_documents, c4_heldout_documents)

    corpus = _resolve_corpus(source, data_dir, max_documents)
    train_docs, heldout_docs = split_documents(corpus, heldout_percent)
    corpus_sha = corpus.sha256
    info = CorpusInfo(
        name=corpus.name,
        train_documents=len(train_docs),
        heldout_documents=len(heldout_docs),
        train_chars=sum(len(d.text) for d in train_docs),
        heldout_chars=sum(len(d.text) for d in heldout_docs),
        heldout_percent=heldout_percent,
        python_version=corpus.python_version,
    )
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus.name)
    folder = cache_root / "text" / f"{safe_name}-{corpus_sha[:16]}-v{vocab_size}-h{heldout_percent:g}-f{_CACHE_FORMAT}"
    tokenizer_file = folder / "tokenizer.json"
    tokens_file = folder / "tokens.pt"
    tk = require("tokenizers", hint=_TOKENIZERS_HINT)

    for cached_file in (tokenizer_file, tokens_file):
        remove_stale_temporaries(cached_file, older_than_s=_STALE_CACHE_TMP_S)
    seconds: float | None = None
    tokenizer = _read_tokenizer(tk, tokenizer_file)
    if tokenizer is None:
        start = time.perf_counter()
        tokenizer = train_tokenizer([d.text for d in train_docs], vocab_size)
        seconds = time.perf_counter() - start
        _atomic_write(tokenizer_file, lambda tmp: tokenizer.save(tmp))
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    actual_vocab = tokenizer.get_vocab_size()

    cached = _read_tokens(tokens_file, corpus_sha)
    if cached is not None and seconds is None:
        train, heldout = cached
        from_cache = True
    else:
        train = _concat([e.ids for e in tokenizer.encode_batch([d.text for d in train_docs])], eos_id)
        heldout = _concat([e.ids for e in tokenizer.encode_batch([d.text for d in heldout_docs])], eos_id)
        _write_tokens(tokens_file, corpus_sha, train, heldout)
        from_cache = False
    return TokenData(
        train=train,
        heldout=heldout,
        vocab_size=actual_vocab,
        eos_id=eos_id,
        corpus=info,
        corpus_sha256=corpus_sha,
        train_sha256=tensor_sha256(train),
        heldout_sha256=tensor_sha256(heldout),
        tokenizer_path=str(tokenizer_file),
        from_cache=from_cache,
        tokenizer_seconds=seconds,
    )


def _read_tokenizer(tk: Any, path: Path) -> Any:
    """The cached tokenizer at ``path``; ``None`` when there is none, or when it cannot be read (a damaged
    file is said on stderr, and the caller trains and writes it again)."""
    if not path.is_file():
        return None
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    else:
        if tokenizer.token_to_id(EOS_TOKEN) is not None:
            return tokenizer
        reason = f"it has no {EOS_TOKEN} token"
    print(f"tokenizer cache {path} is unreadable ({reason}): rebuilding it", file=sys.stderr, flush=True)
    return None


def _read_tokens(path: Path, corpus_sha: str) -> tuple[Tensor, Tensor] | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):  # corrupt: tokenize again
        return None
    if not isinstance(saved, dict) or saved.get("corpus_sha256") != corpus_sha or saved.get("format") != _CACHE_FORMAT:
        return None
    train, heldout = saved.get("train"), saved.get("heldout")
    if not isinstance(train, Tensor) or not isinstance(heldout, Tensor):
        return None
    return train.long(), heldout.long()


def _write_tokens(path: Path, corpus_sha: str, train: Tensor, heldout: Tensor) -> None:
    payload = {"format": _CACHE_FORMAT, "corpus_sha256": corpus_sha, "train": train.int(), "heldout": heldout.int()}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


# ------------------------------------------------------------------------------------------------ C4


def _load_c4(cache_root: Path, train_documents: int, heldout_documents: int) -> TokenData:
    """English C4 streamed from the Hub (the first documents of ``train`` and ``validation``), ``t5-base`` tokens."""
    if train_documents < 1 or heldout_documents < 1:
        raise ValueError("c4_train_documents and c4_heldout_documents must be positive")
    folder = cache_root / "c4" / f"en-{C4_TOKENIZER}-{train_documents}-{heldout_documents}-f{_CACHE_FORMAT}"
    tokens_file, meta_file = folder / "tokens.pt", folder / "meta.json"
    for cached_file in (tokens_file, meta_file):
        remove_stale_temporaries(cached_file, older_than_s=_STALE_CACHE_TMP_S)
    if tokens_file.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            cached = _read_tokens(tokens_file, meta["corpus_sha256"])
            if cached is not None:
                train, heldout = cached
                return TokenData(
                    train,
                    heldout,
                    meta["vocab_size"],
                    meta["eos_id"],
                    CorpusInfo(**meta["corpus"]),
                    meta["corpus_sha256"],
                    tensor_sha256(train),
                    tensor_sha256(heldout),
                    C4_TOKENIZER,
                    from_cache=True,
                )
        except (OSError, ValueError, KeyError, TypeError):  # a damaged meta.json: stream and tokenize again
            pass

    datasets = require("datasets", hint=_C4_HINT)
    transformers = require("transformers", hint=_C4_HINT, names=("AutoTokenizer",))
    what = f"allenai/c4 (en) and the {C4_TOKENIZER} tokenizer from the Hugging Face Hub"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(C4_TOKENIZER, model_max_length=1 << 30)
        splits = {}
        for split, count in (("train", train_documents), ("validation", heldout_documents)):
            stream = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
            docs = []
            for i, row in enumerate(stream):
                if i >= count:
                    break
                docs.append(Document(f"{split}:{i:08d}", row["text"]))
            splits[split] = docs
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:
        raise RuntimeError(
            f"could not stream {what}: this needs internet access (or a filled Hugging Face cache). "
            f"Use the built-in corpus (source=None) offline. Cause: {type(error).__name__}: {error}"
        ) from error
    train_docs, heldout_docs = splits["train"], splits["validation"]
    if not train_docs or not heldout_docs:
        raise RuntimeError(f"streaming {what} gave no documents for a split")
    corpus_sha = Corpus(C4_NAME, tuple(train_docs + heldout_docs)).sha256
    eos_id = tokenizer.eos_token_id

    def encode(docs: list[Document]) -> Tensor:
        ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
        return _concat(ids, eos_id)

    train, heldout = encode(train_docs), encode(heldout_docs)
    info = CorpusInfo(
        C4_NAME,
        len(train_docs),
        len(heldout_docs),
        sum(len(d.text) for d in train_docs),
        sum(len(d.text) for d in heldout_docs),
        heldout_percent=None,
    )
    _write_tokens(tokens_file, corpus_sha, train, heldout)
    meta = {
        "corpus_sha256": corpus_sha,
        "vocab_size": len(tokenizer),
        "eos_id": eos_id,
        "corpus": dataclasses.asdict(info),
    }
    _atomic_write(meta_file, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return TokenData(
        train,
        heldout,
        len(tokenizer),
        eos_id,
        info,
        corpus_sha,
        tensor_sha256(train),
        tensor_sha256(heldout),
        C4_TOKENIZER,
    )


# -------------------------------------------------------------------------------------------- batches


class TokenBatches:
    """Training batches of shape ``(batch_size, seq_len + 1)``: windows at random offsets of ``tokens``.

    Inputs are ``batch[:, :-1]`` and labels ``batch[:, 1:]``. Offsets come from a CPU
    :class:`torch.Generator` seeded with ``seed`` (never the global RNG). :meth:`state_dict` holds
    the step count and the generator state (ints and a tensor, so ``torch.save`` and
    ``torch.load(weights_only=True)`` work); after :meth:`load_state_dict` the next batches are
    exactly those the saved run would have drawn.
    """

    def __init__(
        self,
        tokens: Tensor | TokenData,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(tokens, TokenData):
            tokens = tokens.train
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{tokens.numel()} tokens are too few for one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens.long().cpu()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.step = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._window = torch.arange(seq_len + 1)

    @property
    def num_offsets(self) -> int:
        """Number of distinct window starts."""
        return self.tokens.numel() - self.seq_len

    def next(self) -> Tensor:
        """The next batch, ``(batch_size, seq_len + 1)`` long."""
        offsets = torch.randint(0, self.num_offsets, (self.batch_size,), generator=self._generator)
        batch = self.tokens[offsets[:, None] + self._window]
        self.step += 1
        return batch.to(self.device) if self.device is not None else batch

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": int(self.tokens.numel()),
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("batch_size", "seq_len", "num_tokens"):
            mine = self.batch_size if key == "batch_size" else self.seq_len if key == "seq_len" else self.tokens.numel()
            if int(state[key]) != mine:
                raise ValueError(f"batch state was saved with {key}={int(state[key])}, these batches have {mine}")
        self._generator.set_state(state["generator_state"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])


def heldout_windows(token_data: TokenData | Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """The held-out tokens cut into disjoint windows of ``seq_len + 1`` from the start: ``(n, seq_len + 1)``.

    The same on every call; ``max_windows`` keeps the first windows. The tail shorter than a window is dropped.
    """
    tokens = token_data.heldout if isinstance(token_data, TokenData) else token_data
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    width = seq_len + 1
    count = tokens.numel() // width
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(
            f"{tokens.numel()} held-out tokens are too few for one window of seq_len + 1 = {width}: "
            "use a shorter sequence (coap-bench llama --seq-len) or more text (a --data-dir folder "
            "with more *.txt / *.md files)"
        )
    return tokens[: count * width].long().reshape(count, width).clone()
