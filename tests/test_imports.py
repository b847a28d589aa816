"""``import coap_torch`` loads torch, the standard library and coap_torch itself: nothing else."""

from __future__ import annotations

import json
import subprocess
import sys


def _top_level_modules(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


def test_import_coap_torch_loads_nothing_beyond_torch():
    with_torch = _top_level_modules("import torch")
    added = _top_level_modules("import coap_torch") - with_torch
    assert added - set(sys.stdlib_module_names) == {"coap_torch"}
