"""What installing a backend adds: the installed size of a distribution and of its requirements."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["dependency_report", "distribution_size"]


def _disk_usage(path: Path) -> int:
    """Bytes on disk under ``path`` (like ``du``: allocated blocks, directories included)."""

    def usage(p: Path) -> int:
        st = p.lstat()
        return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size

    if path.is_symlink() or not path.is_dir():
        return usage(path)
    total = usage(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += usage(Path(root) / name)
    return total


def distribution_size(name: str) -> dict[str, Any]:
    """Installed size of distribution ``name``: ``du`` of its top-level entries in site-packages
    (package folders, modules, its .dist-info), in MiB, and its requirements (no extras)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return {"name": name, "installed": False}
    top: set[str] = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if parts and parts[0] not in ("..", "") and not parts[0].startswith("/"):
            top.add(parts[0])
    base = Path(dist.locate_file(""))
    entries = {t: _disk_usage(base / t) for t in sorted(top) if (base / t).exists()}
    requires = []
    for req in dist.requires or ():
        if re.search(r"\bextra\s*==", req):
            continue
        requires.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return {
        "name": name,
        "installed": True,
        "version": dist.version,
        "entries": sorted(entries),
        "size_mib": sum(entries.values()) / 2**20,
        "requires": requires,
    }


def dependency_report(dists: Sequence[str]) -> dict[str, Any]:
    """Sizes of ``dists`` and of their requirements other than torch (which coap-torch needs anyway)."""
    packages = [distribution_size(d) for d in dists]
    requirements = {}
    for pkg in packages:
        for req in pkg.get("requires", ()):
            key = req.lower().replace("_", "-")
            if key == "torch" or key in requirements or key in (d.lower() for d in dists):
                continue
            requirements[key] = distribution_size(req)
    return {
        "packages": packages,
        "size_mib": sum(p.get("size_mib", 0.0) for p in packages),
        "requirements_besides_torch": requirements,
        "requirements_size_mib": sum(r.get("size_mib", 0.0) for r in requirements.values()),
    }
