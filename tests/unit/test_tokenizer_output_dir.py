"""``atomic_directory``: an output directory appears complete or not at all."""

from __future__ import annotations

import os

import pytest

from megatron_ext.outputs import OutputExistsError, atomic_directory


def test_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_needs_force_and_force_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError), atomic_directory(out):
        pass
    assert (out / "old.txt").exists()
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporary_of_dead_process_is_removed(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"out.tmp.{dead_pid}"
    stale.mkdir()
    (stale / "partial").write_text("x")
    with atomic_directory(tmp_path / "out"):
        pass
    assert not stale.exists()
    assert os.path.isdir(tmp_path / "out")


DEAD_PID = 2**22 + 12346  # above the default pid_max: no such process


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between its two renames, a --force run left the complete old output under
    `.old.PID` and nothing under the final name."""
    out = tmp_path / "out"
    aside = tmp_path / f"out.old.{DEAD_PID}"
    aside.mkdir()
    (aside / "model.bin").write_text("old")
    with pytest.raises(OutputExistsError), atomic_directory(out):
        pass  # without --force the old output stays, under its own name again
    assert (out / "model.bin").read_text() == "old" and not aside.exists()


def test_an_output_a_killed_run_was_deleting_is_removed(tmp_path):
    """Killed while deleting the replaced output: the new one is in place, the old one was
    left (a 70B checkpoint's disk) and never removed by later runs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "new.txt").write_text("new")
    aside = tmp_path / f"out.old.{DEAD_PID}"
    (aside / "deep").mkdir(parents=True)
    with atomic_directory(out, force=True) as tmp:
        (tmp / "newer.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["newer.txt"]


def test_force_replaces_a_file(tmp_path):
    out = tmp_path / "tokenizer.model"
    out.write_text("a file")
    with atomic_directory(out, force=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
