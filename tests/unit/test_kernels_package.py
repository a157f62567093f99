"""The import name ``kernels`` is shared with Hugging Face's ``kernels`` distribution."""

import subprocess
import sys
from pathlib import Path

import pytest

import kernels


def test_the_model_refuses_another_kernels_package(tmp_path):
    """One found first on ``sys.path`` fails with the reason, not a missing submodule."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("from importlib import import_module  # another project\n")
    done = subprocess.run(
        [sys.executable, "-c", "import megatron_ext.model.gpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert f"{other / '__init__.py'}: this `kernels` package is not megatron-ext's" in done.stderr
    assert "pip uninstall kernels" in done.stderr


def test_transformers_does_not_take_ours_for_hugging_faces():
    """transformers imports Hugging Face's ``kernels`` API whenever it believes it installed."""
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    repo = Path(__file__).resolve().parents[2]
    assert Path(kernels.__file__).resolve().parent == repo / "kernels"
    assert not import_utils.is_kernels_available(), (
        "Hugging Face's `kernels` distribution is installed beside megatron-ext's `kernels` "
        "package (transformers 5.25 and later require it): pip uninstall kernels; "
        "pip install 'transformers<5.25'"
    )
