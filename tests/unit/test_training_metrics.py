"""metrics.jsonl and TensorBoard: what a run writes, and a resumed run's clean continuation."""

from __future__ import annotations

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
