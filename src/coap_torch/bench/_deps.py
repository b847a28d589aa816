"""Lazy imports of the ``bench`` extra, with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]

BENCH_INSTALL_HINT = 'pip install "coap-torch[bench]"'


class MissingExtraError(ImportError):
    """A module of an optional extra is not installed."""


def require(module: str, *, package: str | None = None, hint: str = BENCH_INSTALL_HINT) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the package and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        name = package or module.split(".")[0]
        raise MissingExtraError(f"coap-bench needs {name}, which is not installed: run `{hint}`") from error
