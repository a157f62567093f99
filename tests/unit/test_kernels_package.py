"""The import name ``kernels`` is shared with Hugging Face's ``kernels`` distribution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

CHECKOUT = Path(__file__).resolve().parents[2]


def test_the_model_refuses_another_kernels_package(tmp_path):
    """One found first on ``sys.path`` fails with the reason, not a missing submodule; the
    command says it in one line."""
    other = tmp_path / "other" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("from importlib import import_module  # another project\n")
    reason = f"{other / '__init__.py'}: this `kernels` package is not megatron-ext's"
    env = {**os.environ, "PYTHONPATH": str(other.parent)}
    done = subprocess.run(
        [sys.executable, "-c", "import megatron_ext.model.gpt"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout, whose own `kernels/` would come first
    )
    assert done.returncode != 0
    assert reason in done.stderr and "pip uninstall kernels" in done.stderr
    config = CHECKOUT / "examples" / "configs" / "tiny.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(config),
         "--train-iters", "1", "--save", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"megatron-ext train: error: {reason}")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_transformers_does_not_take_ours_for_hugging_faces():
    """transformers imports Hugging Face's ``kernels`` API whenever it believes it installed."""
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    assert Path(kernels.__file__).resolve().parent == CHECKOUT / "kernels"
    assert not import_utils.is_kernels_available(), (
        "Hugging Face's `kernels` distribution is installed beside megatron-ext's `kernels` "
        "package (transformers 5.25 and later require it): pip uninstall kernels; "
        "pip install 'transformers<5.25'"
    )
