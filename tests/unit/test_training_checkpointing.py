"""Which checkpoint a resumed run picks: never a half-written one."""

from __future__ import annotations

import json

import pytest

from megatron_ext.training.checkpointing import (
    LATEST,
    TRAIN_STATE,
    CheckpointLoadError,
    checkpoint_dir,
    latest_checkpoint,
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


def test_pointer_to_incomplete_checkpoint_fails_loudly(tmp_path):
    checkpoint_dir(tmp_path, 6).mkdir(parents=True)  # no train_state.json
    (tmp_path / LATEST).write_text("6\n")
    with pytest.raises(CheckpointLoadError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text("six\n")
    with pytest.raises(CheckpointLoadError, match="expected an iteration number"):
        latest_checkpoint(tmp_path)
