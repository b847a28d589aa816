"""The docstring examples of the scale-out modules run as written."""

from __future__ import annotations

import doctest

import pytest

import coap_torch.optim.per_layer
import coap_torch.utils.allocations

MODULES = [coap_torch.optim.per_layer, coap_torch.utils.allocations]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_hf_docstring_examples_run():
    pytest.importorskip("transformers")
    import coap_torch.integrations.hf

    result = doctest.testmod(coap_torch.integrations.hf, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0
