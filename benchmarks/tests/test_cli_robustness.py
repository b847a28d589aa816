"""``coap-bench`` as a user meets it, through subprocesses: output paths checked before anything trains,
damaged checkpoints and tokenizer caches, leftovers of killed saves, workers that die with their parent,
non-finite settings and runs that end non-finite or with every optimizer failed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

from bench_helpers import process_env

from coap_bench.cli import build_parser
from coap_bench.outputs import OutputPathError, check_output_paths
from coap_bench.runner import CheckpointError, check_checkpoint_archive, load_checkpoint
from coap_bench.text import is_heldout, remove_stale_temporaries

#: Generous: a command here takes a few seconds, but the machine may be busy.
TIMEOUT = 240


class NotAllowed:
    """A class the checkpoint loader does not allowlist."""


def _env(cache: Path) -> dict[str, str]:
    return process_env(COAP_TORCH_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cli(cache: Path, *args: str, python: tuple[str, ...] = ("-m", "coap_bench.cli")):
    """``coap-bench ARGS`` in a fresh interpreter, with ``cache`` as tokenizer cache."""
    return subprocess.run(
        [sys.executable, *python, *args], check=False, capture_output=True, text=True, env=_env(cache), timeout=TIMEOUT
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small folder of text (some of Python's help topics): the llama job trains on it in seconds."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    for name, text in sorted(topics.items())[:40]:
        (folder / f"{name}.txt").write_text(text)
    assert any(is_heldout(f"file:{name}.txt") for name in sorted(topics)[:40])
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus) -> Path:
    """A tokenizer cache for ``corpus``, filled once by a first llama run."""
    folder = tmp_path_factory.mktemp("cache")
    done = _cli(folder, *_llama(corpus), "--in-process")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _llama(corpus: Path, *extra: str) -> list[str]:
    return [
        "llama",
        "--preset",
        "micro",
        "--vocab-size",
        "300",
        "--data-dir",
        str(corpus),
        "--max-heldout-windows",
        "4",
        "--steps",
        "2",
        "--optimizers",
        "adamw",
        "--no-progress",
        *extra,
    ]


# ---------------------------------------------------------------------------------------- output paths


@pytest.mark.parametrize(
    ("command", "flag", "where", "reason"),
    [
        ("llama", "--json", "file/r.json", "{file} is a file, not a folder"),
        ("llama", "--checkpoint-dir", "file", "it is a file, not a folder"),
        # The same check in two more commands: slow tier.
        pytest.param("ddpm", "--checkpoint-dir", "file/sub", "{file} is a file, not a folder", marks=pytest.mark.slow),
        pytest.param("digits", "--plots", "file/plots", "{file} is a file, not a folder", marks=pytest.mark.slow),
        ("memory", "--json", "folder", "it is a folder; give a file name"),
    ],
)
def test_an_unusable_output_path_stops_the_command_before_it_starts(tmp_path, corpus, command, flag, where, reason):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a user's file\n")
    before = sorted(tmp_path.rglob("*"))
    path = tmp_path / where
    extra = _llama(corpus)[1:] if command == "llama" else []
    done = _cli(tmp_path / "cache", command, *extra, flag, str(path))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [f"coap-bench: error: {flag} {path}: {reason.format(file=tmp_path / 'file')}"], (
        done.stderr
    )
    assert done.stdout == ""  # no table: nothing ran
    assert not (tmp_path / "cache").exists()  # no data loaded (the tokenizer cache is made first)
    assert sorted(tmp_path.rglob("*")) == before  # no probe file or folder left
    assert (tmp_path / "file").read_text() == "a user's file\n"


def _namespace(**paths: object) -> argparse.Namespace:
    return argparse.Namespace(**{"json": None, "plots": None, "checkpoint_dir": None, **paths})


def test_a_folder_that_cannot_be_written_in_is_named(tmp_path, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)  # as a read-only folder does, even for root
    with pytest.raises(OutputPathError) as error:
        check_output_paths(_namespace(json=str(tmp_path / "new" / "r.json")))
    assert str(error.value) == f"--json {tmp_path / 'new' / 'r.json'}: cannot write in {tmp_path} (Permission denied)"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(tmp_path, corpus):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        done = _cli(tmp_path / "cache", *_llama(corpus), "--plots", str(folder / "plots"))
    finally:
        folder.chmod(0o700)
    assert done.returncode == 2
    expected = f"coap-bench: error: --plots {folder / 'plots'}: cannot write in {folder} (Permission denied)"
    assert done.stderr.splitlines() == [expected]


def test_usable_output_paths_pass_and_leave_nothing_behind(tmp_path):
    (tmp_path / "r.json").write_text("old results\n")
    check_output_paths(
        _namespace(json=str(tmp_path / "r.json"), plots=str(tmp_path / "a" / "b"), checkpoint_dir=str(tmp_path / "c"))
    )
    check_output_paths(_namespace(json=str(tmp_path / "new" / "r.json"), plots=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old results\n"


def test_results_that_cannot_be_written_after_the_run_exit_non_zero_after_the_table(tmp_path, capsys):
    from coap_bench.outputs import run_and_report

    (tmp_path / "file").write_text("")  # the folder the JSON should go to became a file during the run
    run = {"config": {}, "results": [{"name": "adamw", "lr": 1e-3, "final_loss": 1.0, "heldout_loss": 1.0}]}
    args = argparse.Namespace(json=str(tmp_path / "file" / "r.json"), plots=None)
    assert run_and_report(lambda: run, args, lambda run: "the table", None) == 1
    out, err = capsys.readouterr()
    assert out == "the table\n"
    (line,) = _errors(err)
    assert line.startswith(f"coap-bench: error: --json {tmp_path / 'file' / 'r.json'}: results not written ("), line


# ------------------------------------------------------------------------------- non-finite settings


def _float_flags() -> list[tuple[str, str]]:
    """(command, flag) of every option of every command that takes a real number."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (command, action.option_strings[0])
        for command, sub in commands.choices.items()
        for action in sub._actions
        if any(name in getattr(action.type, "__qualname__", "") for name in ("float_at_least", "update_scale"))
    ]


def test_every_real_number_option_refuses_inf_and_nan(capsys):
    flags = _float_flags()
    assert {("llama", "--lr"), ("ddpm", "--scale"), ("digits", "--rank-ratio"), ("llama", "--weight-decay")} <= set(
        flags
    )
    for command, flag in flags:
        for text in ("inf", "nan", "-inf", "1e999"):
            with pytest.raises(SystemExit) as exit_info:
                build_parser().parse_args([command, f"{flag}={text}"])
            assert exit_info.value.code == 2
            assert f"argument {flag}: expected a finite number, got {text!r}" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "flag", "value"), [("llama", "--lr", "inf"), ("ddpm", "--scale", "nan")])
def test_a_non_finite_setting_is_a_usage_error(tmp_path, command, flag, value):
    done = _cli(tmp_path / "cache", command, flag, value)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"coap-bench {command}: error: argument {flag}: expected a finite number, got {value!r}"
    )


# ---------------------------------------------------------------------------------- runs that fail


@pytest.mark.parametrize("command", ["digits", pytest.param("llama", marks=pytest.mark.slow)])
def test_a_run_that_ends_non_finite_exits_non_zero_with_its_results_written(tmp_path, corpus, cache, command):
    path = tmp_path / "r.json"
    args = (
        ["digits", "--steps", "2", "--batch-size", "16", "--optimizers", "adamw", "--no-progress"]
        if command == "digits"
        else _llama(corpus, "--in-process")
    )
    done = _cli(cache, *args, "--lr", "1e30", "--json", str(path))
    assert done.returncode == 1, done.stderr[-3000:]
    (result,) = json.loads(path.read_text())["results"]
    assert result["final_loss"] != result["final_loss"]  # nan
    assert "diverged: adamw: ended with a non-finite loss (final loss nan" in done.stdout
    losses = ", ".join(
        f"{name} nan"
        for key, name in (("final_loss", "final loss"), ("heldout_loss", "held-out loss"))
        if result[key] != result[key]
    )
    expected = f"coap-bench: error: adamw ended with a non-finite loss ({losses}) at lr 1e+30; a lower --lr may help"
    assert _errors(done.stderr) == [expected]


_BROKEN_ADAMW = """
import sys
from coap_bench import optimizers as registry

def build(*args, **kwargs):
    raise RuntimeError("cannot build here")

registry.OPTIMIZERS["adamw"] = registry.OptimizerSpec("adamw", "dense", "broken", build)
from coap_bench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_in_which_every_optimizer_failed_exits_non_zero(tmp_path, corpus, cache):
    path = tmp_path / "r.json"
    done = _cli(cache, *_llama(corpus, "--in-process", "--json", str(path)), python=("-c", _BROKEN_ADAMW))
    assert done.returncode == 1, done.stderr[-3000:]
    (result,) = json.loads(path.read_text())["results"]
    assert result["failed"] and result["error"] == "RuntimeError: cannot build here"
    assert "failed: adamw: RuntimeError: cannot build here" in done.stdout
    assert _errors(done.stderr) == ["coap-bench: error: every optimizer failed (adamw): see the table for why"]


# ------------------------------------------------------------------------------------- checkpoints


def _refused_checkpoint(path: Path) -> None:
    import torch

    torch.save({"format": 2, "model": {"w": torch.zeros(2)}, "note": NotAllowed()}, path)


def _damage(kind: str, path: Path) -> None:
    if kind == "truncated":
        _refused_checkpoint(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "refused":
        _refused_checkpoint(path)
    else:
        path.write_bytes(b"" if kind == "empty" else b"not a checkpoint at all")


# "refused" through the command is slow tier: the loader's test below refuses it in-process.
@pytest.mark.parametrize("kind", ["truncated", pytest.param("refused", marks=pytest.mark.slow)])
def test_a_damaged_checkpoint_stops_the_command_with_one_line_naming_it(tmp_path, corpus, cache, kind):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _damage(kind, folder / "adamw.pt")
    # Refused objects are found when the run's own process loads the file: the error crosses to the parent.
    done = _cli(cache, *_llama(corpus, "--checkpoint-dir", str(folder)))
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = _errors(done.stderr)
    assert line.startswith(f"coap-bench: error: checkpoint {folder / 'adamw.pt'} cannot be loaded: ")
    assert line.endswith("; delete it to start that run over, or use another --checkpoint-dir")
    output = done.stdout + done.stderr
    assert "weights_only" not in output and "Traceback" not in output
    assert "| adamw" not in done.stdout  # stopped, not a failed row


@pytest.mark.parametrize("kind", ["truncated", "refused", "empty", "junk", "not a dict"])
def test_the_checkpoint_loader_names_a_damaged_file_and_never_advises_unsafe_loading(tmp_path, kind):
    import torch

    from coap_bench.optimizers import OPTIMIZERS

    path = tmp_path / "adamw.pt"
    if kind == "not a dict":
        torch.save([torch.zeros(1)], path)
    else:
        _damage(kind, path)
    with pytest.raises(CheckpointError) as error:
        check_checkpoint_archive(path)
        load_checkpoint(path, OPTIMIZERS["adamw"], {}, 2, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} cannot be loaded: ") and "\n" not in message
    assert "weights_only" not in message and "delete it to start that run over" in message


def test_stale_temporary_files_of_killed_saves_are_removed_on_start(tmp_path, corpus, cache):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ours = [folder / ".adamw.pt.k3x_9a0q.tmp", folder / ".adamw.pt.abcdefgh.tmp"]
    others = [
        folder / name
        for name in (
            ".notes.tmp",
            ".adamw.pt.tmp",
            ".adamw.pt.ABCDEFGH.tmp",
            ".adamw.pt.abcdefghi.tmp",
            ".other.pt.abcdefgh.tmp",
            "adamw.pt.x.tmp",
        )
    ]
    for path in ours + others:
        path.write_bytes(b"half a checkpoint")
    done = _cli(cache, *_llama(corpus, "--in-process", "--checkpoint-dir", str(folder)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not any(path.exists() for path in ours)
    assert all(path.read_bytes() == b"half a checkpoint" for path in others)  # not ours: never touched
    assert (folder / "adamw.pt").stat().st_size > 0


def test_cache_temporaries_are_removed_only_once_stale(tmp_path):
    target = tmp_path / "tokenizer.json"
    stale, live = tmp_path / ".tokenizer.json.aaaaaaaa.tmp", tmp_path / ".tokenizer.json.bbbbbbbb.tmp"
    for path in (stale, live):
        path.write_text("{")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert remove_stale_temporaries(target, older_than_s=600) == [stale]
    assert live.exists() and not stale.exists()


# --------------------------------------------------------------------------------- tokenizer cache


def test_a_damaged_tokenizer_cache_is_rebuilt(tmp_path, corpus, cache):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (tokenizer,) = copy.rglob("tokenizer.json")
    intact = tokenizer.read_text()
    tokenizer.write_text(intact[: len(intact) // 2])
    path = tmp_path / "r.json"
    done = _cli(copy, *_llama(corpus, "--in-process", "--json", str(path)))
    assert done.returncode == 0, done.stderr[-3000:]
    notes = [line for line in done.stderr.splitlines() if "tokenizer cache" in line]
    assert len(notes) == 1 and notes[0].startswith(f"tokenizer cache {tokenizer} is unreadable (")
    assert notes[0].endswith("): rebuilding it")
    assert json.loads(tokenizer.read_text()) == json.loads(intact)  # the same tokenizer, trained again
    assert json.loads(path.read_text())["data"]["tokenizer"] == str(tokenizer)
    assert not list(tokenizer.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------ held-out split


def test_a_too_small_heldout_split_names_what_the_user_can_change(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    names = [f"doc{i}.txt" for i in range(40) if not is_heldout(f"file:doc{i}.txt")][:3]
    for name in names:
        (folder / name).write_text("Some words that make a document. " * 20)
    done = _cli(tmp_path / "cache", "llama", "--preset", "micro", "--data-dir", str(folder), "--no-progress")
    assert done.returncode == 2
    (line,) = _errors(done.stderr)
    assert "gives 3 training and 0 held-out documents" in line and "--data-dir" in line, line
    assert "heldout_percent" not in line


# ------------------------------------------------------------------------------- worker processes


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has stopped: only its exit status is left


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_command_takes_its_run_process_with_it(tmp_path, corpus, cache):
    folder = tmp_path / "checkpoints"
    command = [
        sys.executable,
        "-m",
        "coap_bench.cli",
        *_llama(corpus, "--steps", "100000", "--checkpoint-dir", str(folder), "--checkpoint-every", "1"),
    ]
    parent = subprocess.Popen(command, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        # A checkpoint on disk: the run's process has started and trains.
        _wait_for(lambda: (folder / "adamw.pt").exists(), TIMEOUT, "the first checkpoint")
        children = _wait_for(lambda: _children(parent.pid), 30, "the run's process")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not any(map(_alive, children)), 30, "the orphaned run to end")
    finally:
        for pid in [parent.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=30)
