"""Lazy imports of the packages the suite needs, with an error that says how to install them."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from ._quiet import quiet_import

__all__ = ["MissingExtraError", "require"]

BENCH_INSTALL_HINT = "pip install -e ./benchmarks"


class MissingExtraError(ImportError):
    """A package the suite needs is not installed."""


def require(
    module: str, *, package: str | None = None, hint: str = BENCH_INSTALL_HINT, names: Sequence[str] = ()
) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the package and the install command.

    The import is quiet (:func:`~coap_bench._quiet.quiet_import`): what the package prints
    while imported becomes a note below the table, not lines before it. ``names`` are the attributes
    the caller will use, looked up in the same quiet import (lazy packages import their modules then).
    """
    name = package or module.split(".")[0]
    try:
        return quiet_import(module, package=name, names=names)
    except ImportError as error:
        raise MissingExtraError(f"coap-bench needs {name}, which is not installed: run `{hint}`") from error
