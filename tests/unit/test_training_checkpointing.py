"""Which checkpoint a resumed run picks: never a half-written one, nor fresh weights by mistake."""

from __future__ import annotations

import json

import pytest

from megatron_ext.training.checkpointing import (
    LATEST,
    METADATA,
    TRAIN_STATE,
    CheckpointLoadError,
    _prune,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
    resume_checkpoint,
)


def _complete(save, iteration):
    path = checkpoint_dir(save, iteration)
    path.mkdir(parents=True)
    (path / TRAIN_STATE).write_text(json.dumps({"iteration": iteration}))
    return path


def test_half_written_checkpoint_is_not_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    done = _complete(tmp_path, 3)
    (tmp_path / LATEST).write_text("3\n")
    # A job killed while writing iteration 6: its staging directory exists, the pointer is old.
    staging = checkpoint_dir(tmp_path, 6).with_name("iter_0000006.tmp")
    staging.mkdir()
    (staging / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == done


def test_keep_last_counts_and_deletes_only_checkpoints_by_number(tmp_path):
    """A user's copy (iter_0000008_backup) is not a checkpoint of the run: pruning leaves it.
    Iterations compare as numbers, past 9,999,999 (eight digits) too."""
    for iteration in (8, 9_999_999, 10_000_000):
        _complete(tmp_path, iteration)
    backup = tmp_path / "iter_0000008_backup"
    backup.mkdir()
    (backup / TRAIN_STATE).write_text(json.dumps({"iteration": 8}))
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "iter_0000008", "iter_9999999", "iter_10000000",
    ]  # fmt: skip
    _prune(tmp_path, 1, checkpoint_dir(tmp_path, 10_000_000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000008_backup", "iter_10000000"]


def test_pointer_to_incomplete_checkpoint_fails_loudly(tmp_path):
    checkpoint_dir(tmp_path, 6).mkdir(parents=True)  # no train_state.json
    (tmp_path / LATEST).write_text("6\n")
    with pytest.raises(CheckpointLoadError, match="missing or incomplete$"):
        latest_checkpoint(tmp_path)
    # With an earlier complete one, the message says how to resume it (as for a damaged one).
    _complete(tmp_path, 3)
    checkpoint_dir(tmp_path, 6).rmdir()  # deleted by hand, say
    hint = f"missing or incomplete; to resume from iter_0000003 instead, write 3 into .*{LATEST}$"
    with pytest.raises(CheckpointLoadError, match=hint):
        latest_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text("six\n")
    with pytest.raises(CheckpointLoadError, match="expected an iteration number"):
        latest_checkpoint(tmp_path)


def test_resume_takes_the_run_directorys_latest(tmp_path):
    run = tmp_path / "run"
    _complete(run, 3)
    latest = _complete(run, 6)
    (run / LATEST).write_text("6\n")
    assert resume_checkpoint(run, tmp_path / "elsewhere") == latest
    assert resume_checkpoint(run, run) == latest


def test_first_run_of_a_job_resumes_nothing(tmp_path):
    # A re-queued job passes one directory to --save and --load; the first time it is empty.
    assert resume_checkpoint(tmp_path / "run", tmp_path / "run") is None
    (tmp_path / "run").mkdir()
    assert resume_checkpoint(tmp_path / "run", tmp_path / "run") is None


@pytest.mark.parametrize(
    "target, message",
    [
        ("one checkpoint", r"one checkpoint of the run in .*run; .*write 6 into .*run/" + LATEST),
        ("converted weights", r"weights without a training state.*--pretrained-checkpoint"),
        ("no pointer", r"holds checkpoints up to iter_0000006 but no " + LATEST),
        ("a typo", r"no checkpoint there \(no such directory\)"),
        ("an empty directory", r"no checkpoint there \(no " + LATEST),
    ],
)
def test_load_that_would_start_from_fresh_weights_is_refused(tmp_path, target, message):
    """Each of these used to start training from newly initialised weights, with one log line."""
    run = tmp_path / "run"
    _complete(run, 3)
    one = _complete(run, 6)
    load = {
        "one checkpoint": one,
        "converted weights": tmp_path / "converted",
        "no pointer": run,
        "a typo": tmp_path / "rnu",
        "an empty directory": tmp_path / "empty",
    }[target]
    if target == "converted weights":
        load.mkdir()
        (load / METADATA).write_text("{}")
        (load / "metadata.json").write_text("{}")
    if target == "an empty directory":
        load.mkdir()
    with pytest.raises(CheckpointLoadError, match=message):
        resume_checkpoint(load, tmp_path / "new-run")


def test_a_damaged_train_state_is_named(tmp_path):
    from megatron_ext.checkpoint.hf import CheckpointError
    from megatron_ext.training.checkpointing import read_train_state

    path = _complete(tmp_path, 4)
    (path / TRAIN_STATE).write_text('{"iteration": 4, "con')  # cut short
    with pytest.raises(CheckpointError, match=r"iter_0000004/train_state.json: damaged, not JSON"):
        read_train_state(path)
