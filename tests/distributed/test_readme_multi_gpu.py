"""The multi-process snippets of docs/distributed.md and the README (```py blocks that start with a
torchrun line) run as written.

tests/test_docs.py executes the ```python blocks in one process; these need torchrun.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "docs" / "distributed.md", ROOT / "README.md"]
SCRIPTS = [
    script
    for page in PAGES
    if page.is_file()
    for script in re.findall(
        r"```py\n# torchrun --nproc-per-node (\d+) (\S+)\n(.*?)```", page.read_text(), flags=re.DOTALL
    )
]


def test_the_docs_have_ddp_and_fsdp2_scripts():
    assert {name for _, name, _ in SCRIPTS} >= {"train_ddp.py", "train_fsdp2.py"}


@pytest.mark.parametrize(("nproc", "name", "code"), SCRIPTS, ids=[name for _, name, _ in SCRIPTS])
def test_torchrun_script_runs(tmp_path, nproc, name, code):
    script = tmp_path / name
    script.write_text(code)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
