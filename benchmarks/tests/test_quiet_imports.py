"""Peers are imported quietly: what a package prints while imported is a note below the table, never lines
before our own output, and never advice to enable remote code. ``import coap_torch`` imports no peer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from coap_bench._quiet import describe, import_note_lines
from coap_bench.runner import run_guarded

PEERS = ("bitsandbytes", "galore_torch", "transformers", "diffusers", "apollo_torch", "kernels")
FOREIGN = (
    "trust_remote_code",
    "allowlist",
    "kernels-community",
    "Skipping publisher trust check",
    "gemm_4bit_forward",
    "pip install kernels",
)
KERNEL_NOTE = "bitsandbytes could not load an optional CPU 4-bit kernel; not used here"

# A package that talks in every way a peer can while imported: print to both streams, logging, a
# warning, writes to file descriptors 1 and 2 from below Python, and advice to trust remote code.
CHATTY = """
import logging, os, sys, warnings
print("chatty_peer: hello on stdout")
print("chatty_peer: hello on stderr", file=sys.stderr)
logging.getLogger("chatty_peer.kernels").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: could not verify publisher trust status. "
    "Set trust_remote_code=True or add the repository ID to the trust_remote_code allowlist.")
warnings.warn("chatty_peer: a future change", FutureWarning)
os.write(1, b"chatty_peer: native stdout\\n")
os.write(2, b"chatty_peer: native stderr. Set trust_remote_code=True to load it.\\n")
logging.getLogger("chatty_peer").addHandler(logging.StreamHandler())  # made while sys.stderr is diverted
"""
BROKEN = """
print("chatty_broken: about to fail")
raise RuntimeError("chatty_broken cannot start here")
"""
RUN = """
from coap_bench._deps import require


def run(module):
    require(module)
    return {"name": "chatty", "lr": 0.1}
"""


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300, **kwargs
    )


def _loaded_peers(statement: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``statement`` in a fresh interpreter; what it printed, and the peers in its ``sys.modules``
    (written to stderr last, after ``PEERS``)."""
    listing = f"sorted(m for m in sys.modules if m.split('.')[0] in {PEERS!r})"
    done = _python(f"{statement}\nimport sys\nsys.stderr.write('PEERS ' + ','.join({listing}))")
    assert done.returncode == 0, done.stderr
    return done, [peer for peer in done.stderr.rpartition("PEERS ")[2].split(",") if peer]


def test_import_coap_torch_prints_nothing_and_loads_no_peer():
    done, peers = _loaded_peers("import coap_torch")
    assert done.stdout == "" and done.stderr.startswith("PEERS ")
    assert peers == []


def test_the_command_line_module_loads_no_peer():
    done, peers = _loaded_peers("from coap_bench.cli import build_parser\nbuild_parser()")
    assert done.stdout == "" and done.stderr.startswith("PEERS ")
    assert peers == []


@pytest.fixture
def chatty(tmp_path, monkeypatch):
    for name, source in (("chatty_peer", CHATTY), ("chatty_broken", BROKEN)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(source)
    (tmp_path / "chatty_run.py").write_text(RUN)
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned run's process gets this sys.path too
    return tmp_path


def test_what_an_import_writes_becomes_notes(chatty):
    code = textwrap.dedent("""
        import json, logging
        from coap_bench._deps import require
        from coap_bench._quiet import import_notes
        require("chatty_peer", package="chatty-peer")
        print(json.dumps(import_notes()))
        logging.getLogger("chatty_peer").warning("after the import")
    """)
    done = _python(code, cwd=chatty, env={**os.environ, "PYTHONPATH": str(chatty)})
    assert done.returncode == 0, done.stderr
    notes = json.loads(done.stdout)
    assert notes[0] == KERNEL_NOTE
    assert notes[1].startswith(
        "chatty-peer printed a message while being imported, which did not stop the run: "
        "FutureWarning: chatty_peer: a future change (and 4 more)"
    )
    assert len(notes) == 2
    # The package's handler, made during the import, writes to the real stderr afterwards.
    assert done.stderr == "after the import\n"
    assert not any(text in done.stdout for text in FOREIGN)


def test_notes_and_errors_come_back_from_a_runs_process(chatty, capfd):
    from chatty_run import run

    result = run_guarded(run, ("chatty_peer",), name="chatty", lr=0.1, isolate=True)
    assert not result.get("failed") and KERNEL_NOTE in result["import_notes"]
    assert "chatty_peer" not in sys.modules  # imported in the run's process only

    broken = run_guarded(run, ("chatty_broken",), name="broken", lr=0.1, isolate=True)
    assert broken["failed"] and broken["error"] == "RuntimeError: chatty_broken cannot start here"
    assert broken["import_notes"] == [
        (
            "chatty_broken printed a message while being imported, and then failed to "
            "import: chatty_broken: about to fail"
        )
    ]
    out, err = capfd.readouterr()
    assert "chatty" not in out + err


def test_remote_code_advice_is_never_shown():
    advice = "Kernel foo could not verify publisher trust status. Set trust_remote_code=True to allow it."
    assert describe("foo", [(None, advice)]) == [
        (
            "foo printed a message while being imported, which did not stop the run: Kernel foo could not verify "
            "publisher trust status."
        )
    ]
    assert describe("foo", [(None, "Set trust_remote_code=True or add it to the allowlist.")]) == []
    run = {
        "import_notes": [KERNEL_NOTE, "x: use trust_remote_code"],
        "results": [{"import_notes": [KERNEL_NOTE]}, {"name": "adamw"}],
    }
    assert import_note_lines(run) == [f"note: {KERNEL_NOTE}"]


@pytest.fixture(scope="module")
def bitsandbytes_talks() -> bool:
    """Whether ``import bitsandbytes`` prints the kernels-community message on this machine."""
    if importlib.util.find_spec("bitsandbytes") is None:  # not imported here: it would talk in this process
        return False
    done = _python("import bitsandbytes")
    return "kernels-community" in done.stdout + done.stderr


def _micro_llama(tmp_path_factory, *extra: str) -> tuple[list[str], dict]:
    """``coap-bench llama --preset micro`` (2 steps) in a fresh interpreter: its lines and its JSON."""
    tmp_path = tmp_path_factory.mktemp("quiet-llama")
    env = {**os.environ, "COAP_TORCH_CACHE": str(tmp_path_factory.getbasetemp() / "coap-cache")}
    command = [sys.executable, "-m", "coap_bench.cli", "llama", "--preset", "micro", "--steps", "2",
               "--vocab-size", "512", "--max-documents", "300", "--max-heldout-windows", "16", "--no-progress",
               "--json", str(tmp_path / "run.json"), *extra]  # fmt: skip
    done = subprocess.run(
        command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert next(line for line in lines if line.strip()).startswith("llama micro: ")
    assert not any(text in done.stdout for text in FOREIGN)
    run = json.loads((tmp_path / "run.json").read_text())
    last_row = max(i for i, line in enumerate(lines) if line.startswith("| "))
    for note in run["import_notes"]:  # each once, below the table
        assert [i for i, line in enumerate(lines) if line == f"note: {note}"] > [last_row]
        assert sum(line == f"note: {note}" for line in lines) == 1
    return lines, run


def test_a_talking_peer_in_a_runs_process_becomes_one_note_under_the_table(tmp_path_factory, bitsandbytes_talks):
    pytest.importorskip("transformers")
    pytest.importorskip("galore_torch")
    # galore-torch imports bitsandbytes, in galore_adamw's own process.
    _, run = _micro_llama(tmp_path_factory, "--optimizers", "galore_adamw")
    assert [r["name"] for r in run["results"]] == ["galore_adamw"] and not run["results"][0].get("failed")
    if bitsandbytes_talks:
        assert run["import_notes"] == run["results"][0]["import_notes"] == [KERNEL_NOTE]


@pytest.mark.slow  # four run processes; the test above checks the same capture with one
def test_the_main_job_starts_with_its_own_header(tmp_path_factory, bitsandbytes_talks):
    pytest.importorskip("transformers")
    pytest.importorskip("galore_torch")
    _, run = _micro_llama(tmp_path_factory)
    assert [r["name"] for r in run["results"]] == ["adamw", "coap_adamw", "coap_adamw8bit", "galore_adamw"]
    if bitsandbytes_talks:  # galore-torch imports bitsandbytes in galore_adamw's process
        assert run["import_notes"] == [KERNEL_NOTE]
        assert run["results"][3]["import_notes"] == [KERNEL_NOTE]


def test_the_memory_job_starts_with_its_table(bitsandbytes_talks):
    pytest.importorskip("galore_torch")
    done = subprocess.run(
        [sys.executable, "-m", "coap_bench.cli", "memory", "--models", "sit-xl-2"],
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| model | optimizer |")
    assert not any(text in done.stdout for text in FOREIGN)
    if bitsandbytes_talks:  # the GaLore and 8-bit rows import bitsandbytes
        assert lines.count(f"note: {KERNEL_NOTE}") == 1
        assert lines.index(f"note: {KERNEL_NOTE}") > max(i for i, line in enumerate(lines) if line.startswith("| "))
