"""`make demo`, the product's front door, end to end on CPU (about 3-4 minutes, then a re-run)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from megatron_ext.assets import AssetError, fetch_tokenizer
from megatron_ext.training.metrics import read_metrics
from tests.integration.test_training import REPO

DEMO = REPO / "examples" / "quickstart" / "demo.py"
SECTIONS = (
    "## Preprocessing",
    "## Tokenizer expansion",
    "## Model expansion",
    "## Continued pretraining",
    "## At cluster scale",
)


def run_demo(out, corpora) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--output-dir", str(out)],
        env={**os.environ, "MEGATRON_EXT_CORPORA": str(corpora)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory, corpora):
    try:
        fetch_tokenizer("mistral")
    except AssetError as err:
        pytest.skip(f"the demo's tokenizer cannot be fetched here: {err}")
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, corpora)
    return out


def test_every_stage_is_in_the_report_with_its_plots(demo):
    report = (demo / "report.md").read_text(encoding="utf-8")
    assert [s for s in SECTIONS if s not in report] == []
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 3
    for image in images:
        assert (demo / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    metrics = read_metrics(demo / "runs" / "tiny-ar" / "metrics.jsonl")
    languages = {m["lang"] for m in metrics if m.get("split") == "valid"}
    assert languages == {"ar", "en", "udhr_ar", "udhr_en"}


def test_the_exported_model_reads_arabic_with_the_expanded_tokenizer(demo, corpora):
    """transformers loads the export; its tokenizer files give sentencepiece's ids, and its loss
    on Arabic training text is nearer the run's last Arabic validation loss than its first: the
    weights exported are the trained ones."""
    sentencepiece = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import torch

    exported = demo / "models" / "tiny-ar-hf"
    reference = sentencepiece.SentencePieceProcessor(
        model_file=str(demo / "tokenizer" / "tokenizer.model")
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32)
    assert model.config.vocab_size == reference.get_piece_size() > 32000
    with open(corpora / "ar" / "train.jsonl", encoding="utf-8") as lines:
        text = json.loads(next(lines))["text"][:400]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == [reference.bos_id(), *reference.encode(text)]
    assert max(ids[0].tolist()) >= 32000  # the new Arabic pieces are in use
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    valid = [m["loss"] for m in read_metrics(demo / "runs" / "tiny-ar" / "metrics.jsonl")
             if m.get("split") == "valid" and m["lang"] == "ar"]  # fmt: skip
    assert valid[0] > math.log(reference.get_piece_size()) - 0.5  # it started from random rows
    assert math.isfinite(loss) and loss < (valid[0] + valid[-1]) / 2


def test_a_rerun_keeps_what_is_done(demo, corpora):
    checkpoint = demo / "runs" / "tiny-ar" / "latest_checkpointed_iteration.txt"
    before = checkpoint.stat().st_mtime_ns
    done = run_demo(demo, corpora)
    assert "kept: " in done.stdout and checkpoint.stat().st_mtime_ns == before
    report = (demo / "report.md").read_text(encoding="utf-8")
    assert "kept from an earlier run: tokenizer, training" in report
