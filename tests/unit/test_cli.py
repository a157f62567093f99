"""The ``megatron-ext`` command itself: dispatch, and its manners in a shell pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_ext.cli import COMMANDS, main
from tests.helpers import REPO


def test_usage_lists_every_command_and_unknown_ones_are_refused(capsys):
    assert main([]) == 2
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in COMMANDS)
    assert main(["trian"]) == 2
    assert "megatron-ext: unknown command 'trian'" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """``megatron-ext --help | head`` ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_ext.cli", "--help"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before the command writes: every write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err  # 128 + SIGPIPE, as a shell reports a tool so ended
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_broken_pipe_other_than_the_readers_is_reported(monkeypatch):
    """Only standard output's reader leaving is quiet; a worker's or a socket's pipe is a
    failure (stdout is a file here, so its reader cannot have left)."""

    def breaks(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("megatron_ext.cli._dispatch", breaks)
    with pytest.raises(BrokenPipeError):
        main(["train"])
