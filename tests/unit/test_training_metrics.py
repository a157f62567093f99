"""metrics.jsonl and TensorBoard: what a run writes, and a resumed run's clean continuation."""

from __future__ import annotations

import math

import pytest

from megatron_ext.training.metrics import MetricsLog, read_metrics


def test_entries_go_to_jsonl_and_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    log = MetricsLog(tmp_path / "metrics.jsonl", str(tmp_path / "tb"))
    for step in (1, 2):
        log.write({"step": step, "stage": "full", "loss": 3.0 / step, "lr": 1e-3, "skipped": False})
    log.write({"step": 2, "split": "valid", "lang": "ar", "loss": 2.5, "bpc": 1.25})
    log.close()
    assert [e["step"] for e in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [s.value for s in events.Scalars("train/loss")] == [3.0, 1.5]
    assert [s.value for s in events.Scalars("valid/ar/bpc")] == [1.25]


def test_resume_drops_entries_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # cut short by kill -9
    before = path.read_text()
    # A resume that fails before its first entry (say, loading the checkpoint) drops nothing.
    MetricsLog(path, resume_step=3).close()
    assert path.read_text() == before
    log = MetricsLog(path, resume_step=3)
    log.write({"step": 4, "loss": 0.5})
    log.close()
    assert [e["step"] for e in read_metrics(path)] == [1, 2, 3, 4]


def test_resume_keeps_the_checkpoint_steps_entries_in_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    for resume_step, losses in ((None, [1.0, 2.0, 3.0, 4.0, 5.0]), (3, [1.0, 2.0, 3.0, 0.5])):
        log = MetricsLog(tmp_path / "metrics.jsonl", str(tmp_path / "tb"), resume_step)
        for step in range(1, 6) if resume_step is None else [4]:
            log.write({"step": step, "loss": float(step) if resume_step is None else 0.5})
        log.close()
        events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        assert [s.value for s in events.Scalars("train/loss")] == losses


def test_a_finished_run_resumed_drops_its_final_validation_only(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    path, tensorboard = tmp_path / "metrics.jsonl", str(tmp_path / "tb")
    log = MetricsLog(path, tensorboard)
    for step in (1, 2):
        log.write({"step": step, "loss": float(step)})
        log.write({"step": step, "split": "valid", "lang": "ar", "loss": 1.0, "bpc": 1.0})
    log.close()
    for _ in range(2):  # validated again, then once more
        log = MetricsLog(path, tensorboard, resume_step=2, revalidate=True)
        log.write({"step": 2, "split": "valid", "lang": "ar", "loss": 0.5, "bpc": 0.5})
        log.close()
    assert [(e["step"], e.get("split"), e["loss"]) for e in read_metrics(path)] == [
        (1, None, 1.0), (1, "valid", 1.0), (2, None, 2.0), (2, "valid", 0.5),
    ]  # fmt: skip
    events = event_accumulator.EventAccumulator(tensorboard)
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("valid/ar/loss")] == [(1, 1.0), (2, 0.5)]
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0)]


def test_a_run_started_afresh_hides_an_earlier_runs_tensorboard_points(tmp_path):
    """metrics.jsonl starts anew; TensorBoard's view of the directory does too (--force, or a
    re-queued job that failed before its first checkpoint)."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    for losses in ([1.0, 2.0, 3.0], [0.5, 0.25]):
        log = MetricsLog(tmp_path / "metrics.jsonl", str(tmp_path / "tb"))
        for step, loss in enumerate(losses, start=1):
            log.write({"step": step, "loss": loss})
        # Each line is on disk as it is written: a job killed with -9 keeps its history.
        assert [e["loss"] for e in read_metrics(tmp_path / "metrics.jsonl")] == losses
        log.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    # A run branched from that one's step 1 (another --save, one TensorBoard directory) keeps
    # the history it grew from.
    log = MetricsLog(tmp_path / "branch.jsonl", str(tmp_path / "tb"), start_step=1)
    log.write({"step": 2, "loss": 0.125})
    log.close()
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.125)]


def test_skipped_steps_and_nonfinite_values_reach_tensorboard(tmp_path):
    """A skipped step's "nan" loss (JSON's stand-in) and its skip show, not a gap in the curve."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    log = MetricsLog(tmp_path / "metrics.jsonl", str(tmp_path / "tb"))
    for step, loss in ((1, 2.0), (2, "nan"), (3, "inf")):
        # A stage (or language) may be named like a stand-in: it is a label all the same.
        entry = {"step": step, "stage": "nan", "loss": loss, "skipped": loss != 2.0}
        log.write({**entry, "skipped_iters": step - 1})
    log.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "train/stage" not in events.Tags()["scalars"]
    losses = [s.value for s in events.Scalars("train/loss")]
    assert losses[0] == 2.0 and math.isnan(losses[1]) and losses[2] == math.inf
    assert [s.value for s in events.Scalars("train/skipped")] == [0.0, 1.0, 1.0]
    assert [s.value for s in events.Scalars("train/skipped_iters")] == [0.0, 1.0, 2.0]
