"""The README's Python snippets and the docstring examples run as written."""

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

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})  # noqa: S102 - the README is ours


@pytest.mark.parametrize("module", [coap_torch.optim.adamw, coap_torch.optim.adafactor])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_every_constructor_argument_is_documented_with_its_default(cls):
    doc = cls.__doc__
    signature = inspect.signature(cls.__init__)
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        assert re.search(rf"\b{name}\b", doc), f"{name} is not documented"
        if parameter.default is not inspect.Parameter.empty and name not in {"params"}:
            readme = README.read_text()
            assert re.search(rf"\b{name}\b", readme), f"{name} is missing from the README"
