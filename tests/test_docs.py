"""The Python snippets of the README, of docs/*.md and of benchmarks/README.md, and the docstring
examples, run as written."""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import pytest

import coap_torch
import coap_torch.optim.adafactor
import coap_torch.optim.adamw
from coap_torch import CoapAdafactor, CoapAdamW

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Every page whose ```python blocks are tests. (The ```py blocks that start with a torchrun line
#: are multi-process scripts: tests/distributed/test_readme_multi_gpu.py runs those.)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SNIPPETS = [
    (page.relative_to(ROOT).as_posix(), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
]


def test_the_pages_exist_and_have_snippets():
    for name in ("docs/algorithm.md", "docs/distributed.md", "benchmarks/README.md"):
        assert (ROOT / name).is_file(), name
    assert {page for page, _, _ in SNIPPETS} >= {"README.md", "docs/algorithm.md", "docs/distributed.md"}


@pytest.mark.parametrize(("page", "index", "code"), SNIPPETS, ids=[f"{page}:{index}" for page, index, _ in SNIPPETS])
def test_snippet_runs(page, index, code):
    exec(compile(code, f"{page} snippet {index}", "exec"), {})  # noqa: S102 - the pages are ours


@pytest.mark.parametrize("module", [coap_torch.optim.adamw, coap_torch.optim.adafactor])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_every_constructor_argument_is_documented_with_its_default(cls):
    doc = cls.__doc__
    readme = README.read_text()  # the Arguments table and the optimizers' list stay in the README
    signature = inspect.signature(cls.__init__)
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        assert re.search(rf"\b{name}\b", doc), f"{name} is not documented"
        if parameter.default is not inspect.Parameter.empty and name not in {"params"}:
            assert re.search(rf"\b{name}\b", readme), f"{name} is missing from the README"
