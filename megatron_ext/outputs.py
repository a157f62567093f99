"""Atomic output files: written under temporary names, renamed into place only when complete.

Every tool writes through :class:`AtomicOutputs`, so a killed job never leaves a file under a final
name, an existing output is never clobbered without ``force``, and a re-run cleans up the temporary
files that a killed run left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

_TMP_MARKER = ".tmp."
# A replaced output between the two renames that swap a new directory in.
_OLD_MARKER = ".old."


class OutputExistsError(FileExistsError):
    """An output file exists and ``force`` was not given."""


class OutputHoldsInputError(ValueError):
    """An output directory that is, or holds, one of the run's inputs."""


def check_output_dir(
    output_dir: str | os.PathLike,
    force: bool,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
) -> None:
    """Before any work: refuse an output directory that exists or that holds an input.

    An existing one is refused unless ``force``; one that is, or contains, an input always.
    Replacing such a directory (``--force``) would delete the input: a checkpoint or a training
    run gone for a mistyped path.

    Args:
        output_dir: The directory a tool will create or replace.
        force: Whether an existing ``output_dir`` may be replaced.
        inputs: ``(flag, path)`` of each input (a None path: not given).

    Raises:
        OutputHoldsInputError: Naming the flag and the path.
        OutputExistsError: ``output_dir`` exists and ``force`` is false.
    """
    refuse_output_over_input(output_dir, f"--output-dir {output_dir}", inputs)
    if Path(output_dir).exists() and not force:
        raise OutputExistsError(f"output already exists (pass --force to overwrite): {output_dir}")


def refuse_output_over_input(
    output: str | os.PathLike,
    named: str,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
) -> None:
    """Refuse an output (file or directory) that is, or contains, one of the inputs.

    Replacing it (``--force``) would delete the input: a corpus, a checkpoint or a training run
    gone for a mistyped path.

    Args:
        output: The path a tool will create or replace.
        named: How the message names it (e.g. ``--output-dir DIR``).
        inputs: ``(flag, path)`` of each input (a None path: not given).

    Raises:
        OutputHoldsInputError: Naming the output, the flag and the input.
    """
    resolved = Path(output).resolve()
    for flag, path in inputs:
        if path is None:
            continue
        source = Path(path).resolve()
        if source == resolved or resolved in source.parents:
            relation = "is" if source == resolved else "holds"
            raise OutputHoldsInputError(
                f"{named} {relation} the input {flag} {path}: choose another output (replacing "
                "it would delete the input)"
            )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user's counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicOutputs:
    """A set of output files that appear together, under their final names, only when complete.

    Use as a context manager: ``temp(path)`` gives the name to write to, ``commit()`` renames the
    temporary files into place (in the order the paths were given, so put the file that marks a
    complete set last). Leaving the block without ``commit()`` (an exception, a signal) deletes the
    temporary files.

    Args:
        paths: Final output paths.
        force: Overwrite outputs that already exist.

    Raises:
        OutputExistsError: On entry, if an output exists and ``force`` is false.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], force: bool = False) -> None:
        self.paths = [Path(p) for p in paths]
        self.force = force
        self._committed = False

    def __enter__(self) -> AtomicOutputs:
        existing = [str(p) for p in self.paths if p.exists()]
        if existing and not self.force:
            raise OutputExistsError(
                "output already exists (pass --force to overwrite): " + ", ".join(existing)
            )
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.discard()

    def temp(self, path: str | os.PathLike) -> Path:
        """The temporary name under which ``path`` is written until ``commit()``."""
        path = Path(path)
        if path not in self.paths:
            raise KeyError(f"{path} is not one of this set's outputs")
        return path.with_name(f"{path.name}{_TMP_MARKER}{os.getpid()}")

    def commit(self) -> None:
        """Rename every temporary file to its final name (fsync'd first)."""
        for path in self.paths:
            tmp = self.temp(path)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path in self.paths:
            os.replace(self.temp(path), path)
        self._committed = True

    def discard(self) -> None:
        """Delete the temporary files written so far."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                self.temp(path).unlink()


def _left_by_the_dead(path: Path, marker: str) -> Iterator[Path]:
    """``path``'s siblings ``{name}{marker}{pid}`` of processes that no longer run."""
    for candidate in path.parent.glob(f"{path.name}{marker}*"):
        pid_text = candidate.name[len(path.name) + len(marker) :]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            yield candidate


def _remove(path: Path) -> None:
    """Delete a directory tree or a file (``--force`` may replace either)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files of ``path`` left by processes that no longer run.

    Returns:
        The paths removed.
    """
    removed = list(_left_by_the_dead(Path(path), _TMP_MARKER))
    for candidate in removed:
        candidate.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A directory that appears under its final name only when the block completes.

    Yields a temporary sibling (``{name}.tmp.{pid}``) to fill; on success it is renamed to
    ``path`` (an existing ``path``, directory or file, is replaced only with ``force``), on an
    exception it is deleted.

    What a killed run left is dealt with first: its temporary directory is removed, and an output
    it had moved aside to replace (``{name}.old.{pid}``) is put back if nothing took its place
    (killed between the two renames), deleted otherwise (killed while deleting it).

    Raises:
        OutputExistsError: On entry, if ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    for old in _left_by_the_dead(path, _OLD_MARKER):
        if path.exists():
            _remove(old)
        else:
            os.replace(old, path)
    if path.exists() and not force:
        raise OutputExistsError(f"output already exists (pass --force to overwrite): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _left_by_the_dead(path, _TMP_MARKER):
        _remove(stale)
    tmp = path.with_name(f"{path.name}{_TMP_MARKER}{os.getpid()}")
    if tmp.exists():
        _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f"{path.name}{_OLD_MARKER}{os.getpid()}")
        if path.exists():
            # Two renames, so a failure between them still leaves the complete old output.
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            _remove(old)
    finally:
        # Quietly: an error here would hide the one that ended the block.
        shutil.rmtree(tmp, ignore_errors=True)
