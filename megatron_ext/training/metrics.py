"""Run metrics: one JSON line per event in ``<save>/metrics.jsonl``, mirrored to TensorBoard.

Training entries carry ``step``, ``stage``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``,
``mfu`` (None where the device peak is unknown), ``skipped``, ``skipped_iters`` (the run's count
so far), ``consumed_samples`` and ``consumed_tokens`` (the data read, the x-axis that stays true
when the global batch changes between resumes); validation entries carry ``"split": "valid"``,
``lang``, ``loss``, ``bpc`` (bits per character), ``tokens`` and the data consumed. Only one rank
writes. A resumed run first drops the entries after the checkpoint it resumes from, so the file
reads as one uninterrupted run; a run that starts afresh starts the file anew, and TensorBoard
follows both. A validation the checkpoint's run did not finish (its final one, or one a stop
skipped to save first) is run again on resume, and the validation entries at its step are dropped
too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# How metrics.jsonl writes a non-finite number (JSON has none).
NON_FINITE = ("nan", "inf", "-inf")
# Keys that say what an entry is, never a value to plot (a language may be named "nan").
LABELS = ("step", "stage", "split", "lang")


class MetricsLog:
    """Appends metric entries to a JSONL file and, optionally, TensorBoard.

    ``resume_step``: the iteration a resumed run continues from (the file keeps the entries up to
    it); None: a new file. ``start_step``: where a new file's run starts, 0 for a new run (then
    TensorBoard's view of the directory starts empty too), a checkpoint's iteration for a run
    branched from another's (whose TensorBoard points up to it stay).
    ``revalidate``: the resumed run validates again at ``resume_step``, so the validation entries
    of that step are dropped as well. Nothing is
    dropped before the first entry is written, so a run that fails while loading its checkpoint
    leaves the earlier entries as they were.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        tensorboard_dir: str | None = None,
        resume_step: int | None = None,
        revalidate: bool = False,
        start_step: int = 0,
    ) -> None:
        self.path = Path(path) if path else None
        self._resume_step = resume_step
        self._start_step = start_step
        self._revalidate = revalidate
        self._tensorboard_dir = tensorboard_dir
        self._file = None
        self._tensorboard = None
        self._opened = False
        if tensorboard_dir:
            try:
                import torch.utils.tensorboard  # noqa: F401 (here, to fail before training)
            except ImportError as err:
                raise RuntimeError(
                    "--tensorboard-dir needs the tensorboard package: "
                    "pip install 'megatron-ext[tensorboard]'"
                ) from err

    def _open(self) -> None:
        self._opened = True
        kept = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._resume_step is not None and self.path.exists():
                kept = _truncate_after(self.path, self._resume_step, self._revalidate)
            mode = "w" if self._resume_step is None else "a"
            self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 (closed in close)
        if self._tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides every event at and after purge_step: the first step logged anew
            # (all of an earlier run's in the directory when this one starts afresh).
            purge_step = self._start_step + 1 if self._start_step else 0
            if self._resume_step is not None:
                purge_step = self._resume_step + (0 if self._revalidate else 1)
            self._tensorboard = SummaryWriter(self._tensorboard_dir, purge_step=purge_step)
            if self._revalidate:  # the purge hid the step's training entry too: log it again
                for entry in kept:
                    if entry.get("step") == self._resume_step:
                        self._add_scalars(entry)

    def write(self, entry: dict[str, Any]) -> None:
        """Record one entry (a training step or a validation result)."""
        if not self._opened:
            self._open()
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()
        if self._tensorboard is not None:
            self._add_scalars(entry)

    def _add_scalars(self, entry: dict[str, Any]) -> None:
        prefix = f"valid/{entry['lang']}" if entry.get("split") == "valid" else "train"
        for key, value in entry.items():
            if key in LABELS:
                continue
            if value in NON_FINITE:  # JSON's stand-ins: TensorBoard plots them as such
                value = float(value)
            if isinstance(value, int | float):  # a bool as 0 or 1
                self._tensorboard.add_scalar(f"{prefix}/{key}", float(value), entry["step"])

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _truncate_after(path: Path, step: int, revalidate: bool) -> list[dict[str, Any]]:
    """Drop the entries a resumed run writes again; returns those kept.

    Those after ``step``, and with ``revalidate`` the validation entries of ``step`` as well.
    """
    kept, lines = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        last_kept = step - 1 if revalidate and entry.get("split") == "valid" else step
        if entry.get("step", 0) <= last_kept:
            kept.append(entry)
            lines.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return kept


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All entries of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
