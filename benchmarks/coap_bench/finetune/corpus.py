"""The text ``coap-bench finetune`` fine-tunes on: a second offline corpus, not the one the base model was
pretrained on, tokenized with the base model's tokenizer.

By default it is the documentation that installed packages ship (:func:`package_docs_corpus`): for each
package (numpy by default), each of its modules is one document (``module:<package>.<module>``) made of
the module's docstring and those of its classes and functions, read from the source with :mod:`ast`
(never importing the package) exactly as ``coap-bench llama`` reads the standard library's. numpydoc
sections, parameter tables and doctest examples are a different register from Python's own
documentation, which the default base model learnt. ``--corpus PATH`` takes a folder of ``*.txt`` /
``*.md`` files instead (:func:`coap_bench.text.folder_corpus`).

Documents are sorted by id and split into training and held-out documents by a hash of their id
(:func:`coap_bench.text.split_documents`); :func:`tokenize_corpus` joins each split's tokens with the
tokenizer's end-of-text token, and the JSON records the corpus hash, the token hashes and the package
versions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..environment import package_version
from ..text import Corpus, Document, _concat, _stdlib_docstrings, folder_corpus, split_documents, tensor_sha256

__all__ = ["FinetuneData", "load_finetune_corpus", "package_docs_corpus", "tokenize_corpus"]

#: The packages whose documentation is the default fine-tuning corpus.
DEFAULT_PACKAGES = ("numpy",)


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # a top-level name: found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--corpus-packages: {package!r} is not an installed package")
    return Path(min(spec.submodule_search_locations))


def _distribution_version(package: str) -> str | None:
    from importlib import metadata

    for distribution in metadata.packages_distributions().get(package, [package]):
        version = package_version(distribution)
        if version is not None:
            return version
    return None


def package_docs_corpus(packages: Sequence[str] = DEFAULT_PACKAGES, *, max_documents: int | None = None) -> Corpus:
    """The documentation of the installed ``packages``: one document per module with at least
    :data:`~coap_bench.text.MIN_DOCSTRING_CHARS` characters of docstrings (tests left out), sorted by id;
    ``max_documents`` keeps the first documents (for quick tests)."""
    documents = []
    for package in sorted(set(packages)):
        root = _package_root(package)
        documents += [Document(f"module:{package}.{name}", text) for name, text in _stdlib_docstrings(root)]
    if not documents:
        raise ValueError(f"--corpus-packages {','.join(packages)}: no documented module found")
    documents.sort(key=lambda doc: doc.id)
    if max_documents is not None:
        documents = documents[:max_documents]
    return Corpus(f"package-docs:{','.join(sorted(set(packages)))}", tuple(documents))


@dataclass
class FinetuneData:
    """The fine-tuning corpus tokenized: training and held-out tokens (1-D long, documents joined by the
    end-of-text token) and where they came from."""

    train: Tensor
    heldout: Tensor
    corpus_name: str
    corpus_sha256: str
    train_documents: int
    heldout_documents: int
    chars: int
    train_sha256: str
    heldout_sha256: str
    packages: dict[str, str | None] | None = None

    def describe(self) -> dict[str, Any]:
        """Everything but the tensors, for the JSON report."""
        found = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("train", "heldout")}
        return {**found, "train_tokens": int(self.train.numel()), "heldout_tokens": int(self.heldout.numel())}


def load_finetune_corpus(
    folder: str | None, packages: Sequence[str], max_documents: int | None
) -> tuple[Corpus, dict[str, str | None] | None]:
    """The corpus of ``--corpus`` (a folder) or else of ``--corpus-packages``, and the packages' versions."""
    if folder is not None:
        corpus = folder_corpus(folder)
        if max_documents is not None:
            corpus = Corpus(corpus.name, corpus.documents[:max_documents])
        return corpus, None
    corpus = package_docs_corpus(packages, max_documents=max_documents)
    return corpus, {package: _distribution_version(package) for package in sorted(set(packages))}


def tokenize_corpus(corpus: Corpus, tokenizer: Any, packages: dict[str, str | None] | None = None) -> FinetuneData:
    """``corpus`` split by document id and tokenized with ``tokenizer`` (a ``transformers`` tokenizer, no
    special tokens added), each split's documents joined by its end-of-text token (none if it has none)."""
    train_docs, heldout_docs = split_documents(corpus)

    def encode(documents: list[Document]) -> Tensor:
        ids = tokenizer([doc.text for doc in documents], add_special_tokens=False)["input_ids"]
        tokens = _concat(ids, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1)
        return tokens[tokens >= 0]

    train, heldout = encode(train_docs), encode(heldout_docs)
    return FinetuneData(
        train=train,
        heldout=heldout,
        corpus_name=corpus.name,
        corpus_sha256=corpus.sha256,
        train_documents=len(train_docs),
        heldout_documents=len(heldout_docs),
        chars=corpus.chars,
        train_sha256=tensor_sha256(train),
        heldout_sha256=tensor_sha256(heldout),
        packages=packages,
    )
