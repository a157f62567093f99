"""The training loop on CPU (gloo): loss falls, parallel layouts agree, stages freeze what they
should, resume is exact, faults are handled, and the blend delivers its token shares."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import yaml

from megatron_ext.distributed import free_port
from megatron_ext.training.metrics import read_metrics
from tests.distributed import run_ranks
from tests.helpers import REPO, read_texts

# A Llama-shaped network small enough for many short runs on two cores.
MICRO_ARCH = {
    "preset": "tiny",
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 172,
}


def write_config(directory: Path, tokenizer: Path, data: dict[str, str], **settings) -> Path:
    """A training YAML for the micro model on the English+Arabic test data."""
    config = {
        "arch": MICRO_ARCH,
        "tokenizer_model": str(tokenizer),
        "data_path": [0.25, data["en"], 0.75, data["ar"]],
        "seq_length": 64,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": 6,
        "lr": 3.0e-3,
        "min_lr": 3.0e-4,
        "lr_warmup_iters": 1,
        "eval_iters": 1,
        "log_interval": 1,
        "data_cache_path": str(directory / "index_cache"),
    }
    config.update(settings)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Both run through the distributed optimizer (the default) and its checkpoints; bf16 through
# megatron-core's mixed-precision path (fp32 main weights), on a CPU as on a GPU.
PRECISIONS = [pytest.param([], id="fp32"), pytest.param(["--bf16"], id="bf16")]


def _train(rank, world_size, config_path, overrides):
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import train

    return train(load_config(config_path, overrides)).losses


def _train_reported(rank, world_size, config_path, overrides):
    """``_train``'s losses, what the run printed, and the warnings megatron-core logged."""
    import logging

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron.core").addHandler(handler)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        losses = _train(rank, world_size, config_path, overrides)
    return losses, out.getvalue(), warnings


def _cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        # Runs compared bitwise: with Transformer Engine on a GPU, its deterministic kernels only.
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_ext.cli", "train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _error_line(stderr: str) -> str:
    """The command's one error line (on a GPU, NCCL may warn after it as the process exits)."""
    lines = [line for line in stderr.splitlines() if line.startswith("megatron-ext train: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "precision",
    [
        *PRECISIONS,
        # The distributed optimizer's reduce-scatter started during backward, stage by stage.
        pytest.param(["--bf16", "--overlap-grad-reduce"], id="bf16-overlap"),
    ],
)
def test_tiny_config_trains_and_reports_per_language(
    tmp_path, small_tokenizer, training_data, precision
):
    """examples/configs/tiny.yaml (embedding warm-up, then all) learns; validation per language."""
    save = tmp_path / "run"
    proc = _cli(
        *precision,
        "--config", str(REPO / "examples/configs/tiny.yaml"),
        "--tokenizer-model", str(small_tokenizer),
        "--data-path", "0.25", training_data["en"], "0.75", training_data["ar"],
        "--data-cache-path", str(tmp_path / "cache"),
        "--train-iters", "30", "--save", str(save), "--save-interval", "0",
        "--eval-interval", "15",
        # A quarter of its tokens per step: bf16 matrix products on a CPU without bf16 units
        # run 5-25x slower than fp32 ones, and this test ran 4.5 minutes per bf16 case.
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
    )  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "train: done at iteration 30" in out
    entries = read_metrics(save / "metrics.jsonl")
    train = [e for e in entries if "split" not in e]
    # Throughput over the iterations (each step's own time, as the entries have it), apart
    # from the set-up, checkpoints and validation.
    times = re.search(r"trained 7,680 tokens, (\d+) s in iterations .*, (\d+) s end to end", out)
    in_steps = sum(4 * 64 / e["tokens_per_s"] for e in train)
    assert times and abs(int(times[1]) - in_steps) <= 1 and int(times[2]) > in_steps, out[-500:]
    assert [e["step"] for e in train] == list(range(1, 31))
    assert {e["stage"] for e in train[:10]} == {"embeddings"}
    assert {e["stage"] for e in train[10:]} == {"full"}
    losses = [e["loss"] for e in train]
    # The mean of five falls by 0.87-0.88 on a CPU (by 1.01 at the config's own batch; 0.98 on
    # an H200 there, whose attention and GEMM kernels round differently). The margin is about
    # learning, not one device's digits.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.6, losses
    valid = [e for e in entries if e.get("split") == "valid"]
    assert {(e["step"], e["lang"]) for e in valid} == {
        (15, "en"),
        (15, "ar"),
        (30, "en"),
        (30, "ar"),
    }
    for lang in ("en", "ar"):
        first, last = (e for e in valid if e["lang"] == lang)
        assert last["loss"] < first["loss"]
        assert 0 < last["bpc"] < 8
    # What a resume compares its tokenizer with.
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder

    meta = json.loads((save / "iter_0000030" / "megatron_ext.json").read_text())
    assert meta["tokenizer_pieces_sha256"] == SentencePieceEncoder(small_tokenizer).pieces_sha256()


def _weights(rank, world_size, config_path, checkpoint):
    """A checkpoint's weights, loaded at TP=1 (any layout can be read back so)."""
    from megatron_ext.checkpoint.convert import load_into
    from megatron_ext.training.config import load_config
    from megatron_ext.training.model import build_model, resolve_arch

    config = load_config(config_path, [])
    model = build_model(config, resolve_arch(config, 2000, None))
    load_into(model, checkpoint)
    return {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}


@pytest.fixture(scope="module")
def layout_reference(tmp_path_factory, small_tokenizer, training_data):
    """A shared starting checkpoint, and the TP=1 losses and final weights from it.

    Initial weights drawn at PP>1 differ from TP=1's (each stage draws its own), so all layouts
    start from one checkpoint, as runs from a converted model do. One iteration at lr 0 leaves
    the weights bitwise as initialised.
    """
    directory = tmp_path_factory.mktemp("layouts")
    config = write_config(directory, small_tokenizer, training_data)
    init = directory / "init"
    zero_lr = ["--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0", "--train-iters", "1"]
    run_ranks(_train, 1, config, [*zero_lr, "--save", str(init)])
    start = ["--pretrained-checkpoint", str(init / "iter_0000001")]
    losses = run_ranks(_train, 1, config, [*start, "--save", str(directory / "tp1")])[0]
    weights = run_ranks(_weights, 1, config, directory / "tp1" / "iter_0000006")[0]
    return config, start, losses, weights


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        (2, ["--pipeline-model-parallel-size", "2"]),
        (2, []),  # data parallel, the optimizer state sharded over the two
        (2, ["--use-distributed-optimizer", "false"]),  # each replica with all of it
        # Two micro-batches per rank, the output layer's gradient in a bucket of its own.
        (2, ["--overlap-grad-reduce", "--ddp-bucket-size", "20000", "--micro-batch-size", "1"]),
        # The updated weights gathered bucket by bucket in the next forward pass; validation and
        # the checkpoint read them before any.
        (2, ["--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "20000"]),
        (1, ["--kernels", "megatron"]),
        # The first of the two layers recomputed whole, the other not; then attention and the
        # MLP of both.
        (1, ["--recompute-granularity", "full", "--recompute-method", "block"]),
        (1, ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"]),
        # All three at once: each DP replica's two micro-batches through a TP=2 x PP=2 pipeline.
        (
            8,
            [
                *["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                *["--sequence-parallel", "--micro-batch-size", "1"],
            ],
        ),
    ],
    ids=[
        "tp2",
        "tp2-sp",
        "pp2",
        "dp2",
        "dp2-replicated-optimizer",
        "dp2-overlap",
        "dp2-overlap-param-gather",
        "megatron-kernels",
        "recompute-full",
        "recompute-selective",
        "3d",
    ],
)
def test_parallel_layouts_match_tp1(tmp_path, layout_reference, world_size, overrides):
    config, start, reference, reference_weights = layout_reference
    save = ["--save", str(tmp_path)]
    losses = run_ranks(_train, world_size, config, [*start, *save, *overrides])[-1]
    assert len(losses) == len(reference) == 6
    assert losses == pytest.approx(reference, rel=2e-4), (losses, reference)
    assert reference[-1] < reference[0]
    # A wrong gradient barely moves six losses (a sequence-parallel norm whose gradient is not
    # summed over TP changes them by 2e-5) but moves the weights by 3e-3 to 1e-1 of their
    # largest value; the correct layouts stay within 1.4e-4.
    weights = run_ranks(_weights, 1, config, tmp_path / "iter_0000006")[0]
    assert weights.keys() == reference_weights.keys()
    for name, expected in reference_weights.items():
        error = (weights[name] - expected).abs().max() / expected.abs().max()
        assert error < 1e-3, (name, error.item())


@pytest.mark.parametrize("saving", [[], ["--async-save"]], ids=["sync", "async"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_kill_9_then_resume_reproduces_the_losses_bitwise(
    tmp_path, small_tokenizer, training_data, precision, saving
):
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=30, save_interval=4)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = _cli(*precision, "--config", str(config), "--save", str(whole))
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    args = (
        *precision,
        *saving,
        "--config",
        str(config),
        "--save",
        str(killed),
        "--load",
        str(killed),
    )
    # Its own process group: the kill takes the background checkpoint writers too, as Slurm's
    # does when it ends a job.
    proc = _cli(*args, start_new_session=True)
    pointer = killed / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not (pointer.exists() and int(pointer.read_text() or 0) >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A first run whose --load names a directory without checkpoints says so.
    assert f"--load {killed}: no checkpoint there yet" in proc.stdout.read()
    resumed_from = int(pointer.read_text())
    assert resumed_from < 30
    # As if the kill had landed mid-save: a half-written checkpoint past the latest one.
    half = killed / f"iter_{resumed_from + 1:07d}.tmp"
    half.mkdir(exist_ok=True)
    (half / "__0_0.distcp").write_bytes(b"partial")
    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from {killed / f'iter_{resumed_from:07d}'}" in out

    def losses(path):
        return [
            (e["step"], e["loss"]) for e in read_metrics(path / "metrics.jsonl") if "split" not in e
        ]

    assert losses(killed) == losses(whole)  # bitwise: JSON keeps every float's exact value
    assert not list(killed.glob("iter_*.tmp"))  # removed by the next save

    # Rolled back (as after a loss spike): the last checkpoint is written again, replacing the
    # one already there, which is renamed aside rather than deleted before its successor lands.
    last = killed / "iter_0000030"
    before = (last / "train_state.json").stat().st_mtime_ns
    pointer.write_text("28\n")
    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from {killed / 'iter_0000028'}" in out
    assert (last / "train_state.json").stat().st_mtime_ns != before
    assert pointer.read_text() == "30\n"
    assert losses(killed) == losses(whole)
    assert sorted(p.name for p in killed.glob("iter_*")) == ["iter_0000028", "iter_0000030"]


# Loaded by the training process (sitecustomize): its first deletion of a checkpoint removes all
# but the training state, then the process is killed, as a pre-empted job can be mid-deletion.
KILL_WHILE_DELETING = """
import os, shutil, signal
from pathlib import Path

_rmtree = shutil.rmtree


def rmtree(path, *args, **kwargs):
    marker = Path(os.environ["KILLED_MARKER"])
    if Path(path).name.startswith("iter_") and not marker.exists():
        marker.touch()
        for file in Path(path).rglob("*"):
            if file.is_file() and file.name != "train_state.json":
                file.unlink()
        os.killpg(0, signal.SIGKILL)  # with the checkpoint writers, as Slurm ends a job
    return _rmtree(path, *args, **kwargs)


shutil.rmtree = rmtree
"""


def test_a_job_killed_while_deleting_a_checkpoint_leaves_none_half_deleted(
    tmp_path, small_tokenizer, training_data
):
    """Deleting a 900 GiB checkpoint takes minutes; a kill then left what looked like one."""
    from megatron_ext.training.checkpointing import complete_checkpoints, latest_checkpoint

    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=3,
                          save_interval=1, keep_last_checkpoints=1)  # fmt: skip
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_WHILE_DELETING)
    env = {
        "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
        "KILLED_MARKER": str(tmp_path / "killed"),
    }
    run = tmp_path / "run"
    args = ("--config", str(config), "--save", str(run), "--load", str(run))
    proc = _cli(*args, env=env, start_new_session=True)  # its own process group, to be killed
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]  # pruning iteration 1 after saving 2
    assert latest_checkpoint(run) == run / "iter_0000002"
    assert complete_checkpoints(run) == [run / "iter_0000002"]
    assert [p.name for p in run.glob("iter_*.deleting")] == ["iter_0000001.deleting"]
    proc = _cli(*args, env=env)  # resumed, no second kill
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from {run / 'iter_0000002'}" in out
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000003"]


def _files_at_most(limit: int):
    """For a child process: no file grows past ``limit`` bytes (EFBIG, as a full disk fails)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("saving", [[], ["--async-save"]], ids=["sync", "async"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_it(
    tmp_path, small_tokenizer, training_data, saving
):
    config = write_config(tmp_path, small_tokenizer, training_data, save_interval=2)
    save = tmp_path / "run"
    args = ("--config", str(config), "--save", str(save), "--load", str(save), *saving)
    # Two iterations and a checkpoint; this also builds the dataset index cache.
    proc = _cli(*args, "--train-iters", "2")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    pointer = save / "latest_checkpointed_iteration.txt"
    assert pointer.read_text().strip() == "2"
    # The next checkpoint's files (MBs for this model) cannot be written; the log can.
    proc = _cli(*args, preexec_fn=_files_at_most(2**20))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    message = _error_line(err)
    checkpoint = save / "iter_0000004.tmp"
    assert message.startswith(f"megatron-ext train: error: {checkpoint}: the checkpoint ")
    assert "could not be written (CheckpointException: " in message
    assert "GiB free on that file system" in message
    assert "The latest complete checkpoint, iter_0000002, is intact: --load resumes it." in message
    assert pointer.read_text().strip() == "2"  # never pointed at the half-written one


def test_a_damaged_checkpoint_is_named_with_the_one_to_resume_instead(
    tmp_path, small_tokenizer, training_data
):
    config = write_config(tmp_path, small_tokenizer, training_data, save_interval=2)
    save = tmp_path / "run"
    args = ("--config", str(config), "--save", str(save), "--load", str(save))
    proc = _cli(*args, "--train-iters", "4")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    for shard in (save / "iter_0000004").glob("*.distcp"):  # e.g. a copy cut short
        shard.write_bytes(shard.read_bytes()[:1000])
    proc = _cli(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    pointer = save / "latest_checkpointed_iteration.txt"
    message = _error_line(err)  # one line; what torch says of the file may vary
    assert message.startswith(
        f"megatron-ext train: error: {save / 'iter_0000004'}: cannot load (CheckpointException: "
    )
    assert message.endswith(f"); to resume from iter_0000002 instead, write 2 into {pointer}")
    pointer.write_text("2\n")  # as the message says
    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from {save / 'iter_0000002'} (iteration 2)" in out


def test_a_run_killed_in_its_final_validation_validates_again(
    tmp_path, small_tokenizer, training_data
):
    """The final validation follows the last checkpoint: a re-run from it (the job killed during
    the validation, or run again) validates again instead of reporting "done" without it."""
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=2)
    save, tensorboard = tmp_path / "run", tmp_path / "tb"
    args = ("--config", str(config), "--save", str(save), "--load", str(save))
    args = (*args, "--tensorboard-dir", str(tensorboard))
    proc = _cli(*args)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    metrics = save / "metrics.jsonl"
    entries = read_metrics(metrics)
    validation = [e for e in entries if e.get("split") == "valid"]
    assert [(e["step"], e["lang"]) for e in validation] == [(2, "en"), (2, "ar")]
    # As a kill -9 leaves it: the first language's line written, the second cut short.
    kept = entries[: entries.index(validation[0]) + 1]
    metrics.write_text("".join(json.dumps(e) + "\n" for e in kept) + '{"step": 2, "spl')
    checkpoint = save / "iter_0000002" / "train_state.json"
    saved = checkpoint.stat().st_mtime_ns
    for _ in range(2):  # and once more, as a re-queued job would: no entry twice
        proc = _cli(*args)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "iter_0000002 ends the run: validating it again" in out
        assert "train: done at iteration 2" in out
        assert read_metrics(metrics) == entries  # the same values: the same weights and data
    assert checkpoint.stat().st_mtime_ns == saved  # nothing trained, nothing saved again
    events = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = events.EventAccumulator(str(tensorboard))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("valid/ar/loss")] == [
        (2, validation[1]["loss"])
    ]
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2]
    # Validated from another --save: no copy of the checkpoint is written there.
    other = tmp_path / "other"
    proc = _cli("--config", str(config), "--load", str(save), "--save", str(other))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "validating it again" in out
    assert not list(other.glob("iter_*"))


def test_a_dataset_rewritten_under_its_prefix_gets_new_indices(tmp_path, small_tokenizer, corpora):
    """megatron-core's index cache is named by prefix and settings; a rewritten dataset (here
    3,000 documents, then 300) used to meet the old indices: IndexError deep in a data worker."""
    from megatron_ext.data.preprocess import PreprocessConfig, run_preprocess

    lines = (corpora / "ar" / "train.jsonl").read_text(encoding="utf-8").splitlines(True)
    corpus, prefix = tmp_path / "ar.jsonl", tmp_path / "data" / "ar"
    dataset = str(prefix) + "_text_document"
    config = write_config(
        tmp_path, small_tokenizer, {"en": "", "ar": ""}, data_path=[dataset], train_iters=2,
        eval_iters=1,
    )  # fmt: skip
    for documents in (3000, 300):
        corpus.write_text("".join(lines[:documents]), encoding="utf-8")
        run_preprocess(
            PreprocessConfig(
                inputs=[str(corpus)], output_prefix=str(prefix),
                tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(small_tokenizer),
                append_eod=True, workers=1, force=True,
            ),
            progress=False,
        )  # fmt: skip
        proc = _cli("--config", str(config))
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    # Each version of the files has its indices in its own directory.
    assert len([p for p in (tmp_path / "index_cache").iterdir() if p.is_dir()]) == 2


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two torchrun ranks need two GPUs here",
)
def test_a_torchrun_run_prints_no_library_warnings(tmp_path, small_tokenizer, training_data):
    """Each rank of a DP=2 run printed megatron-core's and torch's warnings about their own
    calls (a .grad of a view, deprecated collectives), among the run's own warning: lines."""
    config = write_config(
        tmp_path, small_tokenizer, training_data, train_iters=1, lr_warmup_iters=0
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run = [*torchrun, "--master-port", str(free_port()), "-m", "megatron_ext.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*run, "--config", str(config)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: done at iteration 1" in done.stdout
    assert "Warning" not in done.stderr, done.stderr[-3000:]


def test_data_parallel_ranks_share_the_checkpoint_writes(tmp_path, small_tokenizer, training_data):
    config = write_config(
        tmp_path, small_tokenizer, training_data, train_iters=1, lr_warmup_iters=0
    )
    run_ranks(_train, 2, config, ["--save", str(tmp_path / "run")])
    written = [0, 0]
    for part in (tmp_path / "run" / "iter_0000001").glob("__*_*.distcp"):
        written[int(part.name.split("_")[2])] += part.stat().st_size
    # Weights are replicated over data-parallel ranks: megatron-core alone has rank 0 write
    # them all (rank 1 wrote 0.02 % of the bytes in a trial); here each writes a share.
    assert min(written) > 0.4 * sum(written), written
    # --dry-run's estimate of a checkpoint's size (fp32: weights, and the distributed optimizer's
    # main weights and Adam's two moments). The files add a few KB per tensor (3 % of this
    # 0.35 M-parameter model; nothing at scale).
    from megatron_ext.training.config import load_config
    from megatron_ext.training.model import resolve_arch
    from megatron_ext.training.plan import plan_run

    run_config = load_config(config, [])
    model = resolve_arch(run_config, 2000, None)
    plan = plan_run(run_config, model.arch, model.padded_vocab_size, world_size=2)
    assert sum(written) == pytest.approx(plan.checkpoint_gib * 1024**3, rel=0.05)


def _stage_one_changes(rank, world_size, config_path, overrides):
    """Weights before (iteration 1, lr 0) and after the embedding-only stage, compared.

    Returns:
        For each weight of this rank that changed, the rows that did (global token ids for the
        vocab-parallel embedding and output layer).
    """
    import torch
    from megatron.core import parallel_state

    from megatron_ext.training import checkpointing
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import train
    from megatron_ext.training.model import build_model, resolve_arch

    config = load_config(config_path, overrides)
    train(config)
    plan = resolve_arch(config, 2000, None)
    states = []
    for iteration in (1, config.train_iters):
        module = build_model(config, plan)
        checkpointing.load_checkpoint(
            checkpointing.checkpoint_dir(config.save, iteration), module, None
        )
        states.append(
            {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        )
    before, after = states
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    first_id = tp_rank * plan.padded_vocab_size // config.tensor_model_parallel_size
    changed = {}
    for name, tensor in before.items():
        if not tensor.is_floating_point():
            continue
        rows = (after[name] != tensor).reshape(tensor.shape[0], -1).any(dim=1)
        if rows.any():
            offset = first_id if name in VOCAB_PARALLEL else 0
            changed[name] = (rows.nonzero().flatten() + offset).tolist()
    return changed


VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (1, []),
        (1, ["--kernels", "megatron"]),
        # Reductions start during backward: the frozen rows must be zeroed after they end.
        (2, ["--overlap-grad-reduce", "--micro-batch-size", "1"]),
        # The next stage's model is built from weights gathered first.
        (2, ["--overlap-grad-reduce", "--overlap-param-gather"]),
        # The padded 2,048 rows split in two: the new rows (from 1,500) start inside shard 1.
        (2, ["--tensor-model-parallel-size", "2"]),
    ],
    ids=["fused", "megatron", "dp2-overlap", "dp2-overlap-param-gather", "tp2"],
)
def test_embedding_stage_changes_only_new_rows(
    tmp_path, small_tokenizer, training_data, world_size, overrides
):
    config = write_config(
        tmp_path,
        small_tokenizer,
        training_data,
        train_iters=8,
        save=str(tmp_path / "run"),
        save_interval=1,
        keep_last_checkpoints=0,
        base_vocab_size=1500,
        stages=[
            # lr 0 leaves the weights bitwise as initialised: the "before" checkpoint.
            {"name": "before", "train_iters": 1, "lr": 0.0, "min_lr": 0.0, "lr_warmup_iters": 0},
            {"name": "new-rows", "trainable": "embeddings", "new_rows_only": True,
             "weight_decay": 0.0, "lr": 1.0e-2},
        ],
    )  # fmt: skip
    changed = {}
    for ranks_changes in run_ranks(_stage_one_changes, world_size, config, overrides):
        for name, rows in ranks_changes.items():
            changed.setdefault(name, set()).update(rows)
    assert set(changed) == set(VOCAB_PARALLEL)
    for rows in changed.values():
        assert rows and min(rows) >= 1500 and max(rows) < 2000
    assert len(changed["output_layer.weight"]) == 500  # every new output row gets a gradient


def _schedule(k: int, n: int, peak: float, low: float, warmup: int, style: str, anneal=0):
    """The learning rate of iteration k (1-based) of an n-iteration stage, from the formulas."""
    if k <= warmup:
        return peak * k / warmup
    if style == "cosine":
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (n - warmup)))
    stable = n - anneal  # WSD: the peak until the anneal, then down to `low` at iteration n
    ratio = max(k - stable, 0) / anneal
    if style == "WSD-linear":
        return low + (peak - low) * (1 - ratio)
    return low + (peak - low) * (2 * 0.5**ratio - 1)  # WSD-exponential


def test_resume_refuses_what_the_checkpoint_cannot_continue(
    tmp_path, small_tokenizer, training_data
):
    """Other stage lengths would continue in the wrong stage, or end the run early as done;
    another precision fails deep in megatron-core, where the hint used to suggest an earlier
    checkpoint (which fails the same way)."""
    stages = [{"name": "embeddings", "train_iters": 3, "trainable": "embeddings"}, {"name": "all"}]
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=5,
                          save_interval=1, keep_last_checkpoints=0, stages=stages)  # fmt: skip
    run = tmp_path / "run"
    run_ranks(_train, 1, config, ["--save", str(run)])
    resume = ["--save", str(run), "--load", str(run)]
    (run / "latest_checkpointed_iteration.txt").write_text("4\n")
    (tmp_path / "other").mkdir()
    without_stages = write_config(tmp_path / "other", small_tokenizer, training_data,
                                  train_iters=5)  # fmt: skip
    with pytest.raises(AssertionError, match=(
        r"iter_0000004 was saved at iteration 4, 1 iterations into stage 2 of its run; this "
        r"run's stages \('train' 5 iterations\) do not place iteration 4 there"
    )):  # fmt: skip
        run_ranks(_train, 1, without_stages, resume)
    with pytest.raises(AssertionError, match=(
        r"iter_0000004: its optimizer state was saved without --bf16 and this run is bf16: .*"
        r"--no-load-optim"
    )):  # fmt: skip
        run_ranks(_train, 1, config, [*resume, "--bf16"])
    (run / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(AssertionError, match="iteration 5, past this run's --train-iters 4"):
        run_ranks(_train, 1, config, [*resume, "--train-iters", "4", "--lr-warmup-iters", "0"])
    # The same stages, one iteration more: the last stage continues.
    (run / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert len(run_ranks(_train, 1, config, [*resume, "--train-iters", "6"])[0]) == 2


def test_each_stage_follows_its_learning_rate_schedule(tmp_path, small_tokenizer, training_data):
    """Warm-up then cosine, then two WSD stages (linear and exponential anneals), per metrics."""
    config = write_config(
        tmp_path, small_tokenizer, training_data, train_iters=16, lr_decay_style="WSD",
        lr_wsd_decay_iters=3, lr=4.0e-3, min_lr=4.0e-4, lr_warmup_iters=1,
        stages=[
            {"name": "cosine", "train_iters": 5, "lr_decay_style": "cosine", "lr": 1.0e-2,
             "min_lr": 1.0e-3, "lr_warmup_iters": 2},
            {"name": "wsd-linear", "train_iters": 6, "lr_wsd_decay_style": "linear"},
            {"name": "wsd-exponential"},
        ],
    )  # fmt: skip
    run_ranks(_train, 1, config, ["--save", str(tmp_path / "run")])
    steps = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if "split" not in e]
    expected = (
        [_schedule(k, 5, 1.0e-2, 1.0e-3, 2, "cosine") for k in range(1, 6)]
        + [_schedule(k, 6, 4.0e-3, 4.0e-4, 1, "WSD-linear", 3) for k in range(1, 7)]
        + [_schedule(k, 5, 4.0e-3, 4.0e-4, 1, "WSD-exponential", 3) for k in range(1, 6)]
    )
    assert [e["stage"] for e in steps] == ["cosine"] * 5 + ["wsd-linear"] * 6 + [
        "wsd-exponential"
    ] * 5
    assert [e["lr"] for e in steps] == pytest.approx(expected, rel=1e-6)
    # Each stage ends on its min_lr; the WSD stages hold their peak until the anneal.
    assert [expected[i] for i in (4, 10, 15)] == pytest.approx([1.0e-3, 4.0e-4, 4.0e-4])
    assert expected[5:8] == [4.0e-3] * 3


def test_nonfinite_loss_stops_or_skips(tmp_path, small_tokenizer, training_data):
    # An absurd learning rate overflows the weights after one update: NaN from iteration 2.
    config = write_config(tmp_path, small_tokenizer, training_data, lr=1.0e30, min_lr=1.0e30,
                          clip_grad=0.0)  # fmt: skip
    # Iteration 1's checkpoint is still being written in the background when iteration 2
    # fails: it must be published, not left half-written.
    stopped = tmp_path / "stop"
    proc = _cli("--config", str(config), "--on-nonfinite", "stop", "--save", str(stopped),
                "--save-interval", "1", "--async-save")  # fmt: skip
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert re.search(r"iteration 2: grad norm is (nan|inf)", err), err[-3000:]
    assert "stopping (--on-nonfinite stop)" in err
    assert (stopped / "latest_checkpointed_iteration.txt").read_text() == "1\n"
    assert not list(stopped.glob("*.tmp"))

    save = tmp_path / "skip"
    proc = _cli("--config", str(config), "--max-skipped-iters", "2", "--save", str(save))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "3 iterations in a row skipped (--max-skipped-iters 2)" in err
    skipped = [e["skipped"] for e in read_metrics(save / "metrics.jsonl")]
    assert skipped == [False, True, True, True]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, small_tokenizer, training_data):
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=100000)
    save = tmp_path / "run"
    proc = _cli("--config", str(config), "--save", str(save))
    metrics = save / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = read_metrics(metrics)[-1]["step"]
    assert f"interrupted (SIGTERM) at iteration {last}" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)
    assert json.loads((save / "interrupted.json").read_text())["iteration"] == last


def test_a_new_run_does_not_clobber_another_runs_checkpoints(
    tmp_path, small_tokenizer, training_data
):
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=2)
    save = ["--save", str(tmp_path / "run")]
    run_ranks(_train, 1, config, save)
    with pytest.raises(AssertionError, match=r"already holds another run's checkpoints"):
        run_ranks(_train, 1, config, save)  # neither resumed (--load) nor forced
    assert [e["step"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 2, 2]
    run_ranks(_train, 1, config, [*save, "--force"])
    # A new run, a new file: the first run's entries are gone, not followed by the second's.
    assert [e["step"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 2, 2]
    # A run that left only its metrics (stopped on a NaN before any checkpoint) keeps them too.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n')
    with pytest.raises(AssertionError, match=r"already holds an earlier run's metrics\.jsonl"):
        run_ranks(_train, 1, config, ["--save", str(failed)])
    assert (failed / "metrics.jsonl").read_text() == '{"step": 1, "loss": NaN}\n'
    # The same job again (--load too, as the Slurm template runs it): its attempt is redone.
    run_ranks(_train, 1, config, ["--save", str(failed), "--load", str(failed)])
    assert [e["step"] for e in read_metrics(failed / "metrics.jsonl")] == [1, 2, 2, 2]


def test_a_forced_run_keeps_its_own_checkpoints_among_another_runs_later_ones(
    tmp_path, small_tokenizer, training_data
):
    """--keep-last-checkpoints counted the other run's later checkpoints as this run's newest:
    each of this run's checkpoints was deleted as soon as it was saved, the pointer's too."""
    from megatron_ext.training.checkpointing import complete_checkpoints, latest_checkpoint

    # A constant learning rate: the schedule does not depend on the run's length.
    config = write_config(tmp_path, small_tokenizer, training_data, save_interval=1,
                          lr_decay_style="constant", lr_warmup_iters=0)  # fmt: skip
    run = tmp_path / "run"
    run_ranks(_train, 1, config, ["--save", str(run), "--train-iters", "4"])  # another run
    keep_one = ["--save", str(run), "--keep-last-checkpoints", "1"]
    first = run_ranks(_train, 1, config, [*keep_one, "--force", "--train-iters", "2"])[0]
    assert latest_checkpoint(run) == run / "iter_0000002"
    # This run's own pruned to the last; the other's later ones stay until written again.
    names = [c.name for c in complete_checkpoints(run)]
    assert names == ["iter_0000002", "iter_0000003", "iter_0000004"]
    resume = [*keep_one, "--load", str(run), "--train-iters", "3"]
    rest = run_ranks(_train, 1, config, resume)[0]
    whole = run_ranks(_train, 1, config, ["--train-iters", "3"])[0]
    assert first + rest == whole
    assert [c.name for c in complete_checkpoints(run)] == ["iter_0000003", "iter_0000004"]


def test_a_split_part_without_sequences_is_refused_not_left_hanging(
    tmp_path, small_tokenizer, training_data
):
    """megatron-core counts epochs of an empty split part's 0 tokens forever; the run says so."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.indexed import IndexedDatasetWriter
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import ConfigError
    from megatron_ext.training.data import HELD_OUT_SPLIT, DatasetTokenizer, check_datasets

    # A validation share that rounds to no sequence of the English dataset (the CLI hung).
    config = write_config(tmp_path, small_tokenizer, training_data, split="99999,1,0")
    with pytest.raises(AssertionError, match=r"ConfigError: .*corpus_en.* validation part of"):
        run_ranks(_train, 1, config, [])
    tokenizer = DatasetTokenizer(SentencePieceEncoder(small_tokenizer), str(small_tokenizer))
    english = [training_data["en"]]
    sequences = len(IndexedDataset(english[0]))  # megatron-core's count, which it splits
    # Shares megatron-core rounds to one sequence of the part, and to none.
    for part, (enough, too_little) in {
        "train": (f"{0.6 / sequences},1,0", f"{0.4 / sequences},1,0"),
        "validation": (f"1,{0.6 / sequences}", f"1,{0.4 / sequences}"),
        "test": (f"1,0,{0.6 / sequences}", f"1,0,{0.4 / sequences}"),
    }.items():
        assert check_datasets(english, tokenizer, enough) == []
        with pytest.raises(ConfigError, match=f"{sequences:,} sequences and its {part} part"):
            check_datasets(english, tokenizer, too_little)
    empty = IndexedDatasetWriter(tmp_path / "empty.bin", np.uint16)
    empty.finalize(tmp_path / "empty.idx")
    with pytest.raises(ConfigError, match=r"--valid-data-path: .*empty holds no sequences"):
        check_datasets([str(tmp_path / "empty")], tokenizer, HELD_OUT_SPLIT, "--valid-data-path")
    # A training part shorter than one sample: no epoch of it holds one.
    tiny = IndexedDatasetWriter(tmp_path / "tiny.bin", np.uint16)
    tiny.add_documents(np.arange(3, 43, dtype=np.uint16), np.array([20, 20]), np.array([1, 1]))
    tiny.finalize(tmp_path / "tiny.idx")
    config = write_config(
        tmp_path, small_tokenizer, training_data, split="1,1,0",
        data_path=[1, str(tmp_path / "tiny"), 3, training_data["ar"]],
    )  # fmt: skip
    message = r"ConfigError: --data-path: the training part of .*tiny holds 20 tokens, less than "
    with pytest.raises(AssertionError, match=message + r"one sample \(--seq-length 64 \+ 1\)"):
        run_ranks(_train, 1, config, [])


def _validation_documents(rank, world_size, config_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import load_config
    from megatron_ext.training.data import DatasetTokenizer, build_datasets

    config = load_config(config_path)
    tokenizer = DatasetTokenizer(
        SentencePieceEncoder(config.tokenizer_model), config.tokenizer_model
    )
    datasets = build_datasets(config, tokenizer)
    return {
        name: (sorted(set(dataset.indices.tolist())), len(IndexedDataset(dataset.dataset_path)))
        for name, dataset in datasets.valid.items()
    }


def _validation_warnings(rank, world_size, config_path, overrides):
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import load_config
    from megatron_ext.training.data import (
        DatasetTokenizer,
        build_datasets,
        repeated_validation_warnings,
    )

    config = load_config(config_path, overrides)
    tokenizer = DatasetTokenizer(
        SentencePieceEncoder(config.tokenizer_model), config.tokenizer_model
    )
    return repeated_validation_warnings(build_datasets(config, tokenizer).valid, config)


def test_held_out_datasets_are_validated_whole_and_reported(
    tmp_path, corpora, small_tokenizer, training_data, held_out_data
):
    """A run on Arabic alone watches English retention on held-out files (--valid-data-path)."""
    held_out = [held_out_data["en"], held_out_data["ar"]]
    config = write_config(
        tmp_path, small_tokenizer, training_data, data_path=[training_data["ar"]],
        split="100,0,0", valid_data_path=held_out, eval_at_start=True, train_iters=2,
    )  # fmt: skip
    documents = run_ranks(_validation_documents, 1, config)[0]
    assert list(documents) == ["en", "ar"]
    for indices, size in documents.values():  # every document, by megatron-core's reader
        assert indices == list(range(size))
    # A validation that reads a set twice over or more is named, with its size in tokens.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sizes = {}
    for lang in documents:
        index = IndexedDataset(held_out_data[lang])  # alive while its memory map is read
        sizes[lang] = int(index.sequence_lengths.sum())
    assert run_ranks(_validation_warnings, 1, config, [])[0] == []  # 256 tokens each
    many = 2 * sizes["en"] // (4 * 64) + 1  # the English file twice over, not the Arabic
    warnings = run_ranks(_validation_warnings, 1, config, ["--eval-iters", str(many)])[0]
    assert len(warnings) == 1 and 2 * sizes["ar"] > many * 4 * 64
    assert f"'en' ({held_out_data['en']}) holds {sizes['en']:,} tokens" in warnings[0]
    run_ranks(_train, 1, config, ["--save", str(tmp_path / "run")])
    valid = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if "split" in e]
    assert [(e["step"], e["lang"]) for e in valid] == [(0, "en"), (0, "ar"), (2, "en"), (2, "ar")]
    assert all(e["tokens"] == 4 * 64 and math.isfinite(e["bpc"]) for e in valid)
    # Bits per character = loss in nats x tokens / (ln 2 x characters): the characters per token
    # it implies are those of the text as sentencepiece splits it (within a 256-token sample's
    # spread; a lost ln 2 is 44% off, bytes for characters 80% in Arabic).
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))
    for entry in valid:
        texts = read_texts(corpora / entry["lang"] / "valid.jsonl")
        tokens = sum(len(ids) + 1 for ids in sp.encode(texts))  # + the end-of-document token
        implied = entry["loss"] / (entry["bpc"] * math.log(2))
        assert abs(implied / (sum(map(len, texts)) / tokens) - 1) < 0.25, entry


@pytest.mark.parametrize(
    "optimizer_format",
    [pytest.param([], id="dp-reshardable"),
     pytest.param(["--dist-ckpt-optim-fully-reshardable"], id="fully-reshardable")],
)  # fmt: skip
@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_with_the_optimizer_sharded_over_data_parallel_ranks_is_bitwise(
    tmp_path, small_tokenizer, training_data, precision, optimizer_format
):
    """The kill -9 test runs at DP=1, where each rank's optimizer shard is the whole state."""
    config = write_config(tmp_path, small_tokenizer, training_data, save_interval=3)
    run = tmp_path / "run"
    dp2 = [*precision, *optimizer_format, "--save", str(run), "--load", str(run)]
    whole = run_ranks(_train_reported, 2, config, dp2, tensor_model_parallel_size=1)
    # fully_reshardable gathers on the first rank alone on a CPU; the others' missing share
    # used to make megatron-core warn at every save that the ranks' states differ.
    assert not [w for (_, _, warnings) in whole for w in warnings if "differs" in w]
    whole = [losses for losses, _, _ in whole]
    assert whole[0] == whole[1]  # every rank reports the data-parallel mean
    (run / "latest_checkpointed_iteration.txt").write_text("3\n")
    resumed = run_ranks(_train, 2, config, dp2, tensor_model_parallel_size=1)
    assert resumed[0] == whole[0][3:]


def test_resume_at_another_layout_as_the_optimizer_format_allows(
    tmp_path, small_tokenizer, training_data
):
    """Three iterations at TP=2 or DP=2, the rest at TP=1 (or the other), against a TP=1 run."""
    # A constant learning rate: the schedule does not depend on the run's length.
    config = write_config(tmp_path, small_tokenizer, training_data, lr_decay_style="constant",
                          lr_warmup_iters=0)  # fmt: skip
    whole = run_ranks(_train, 1, config, ["--save", str(tmp_path / "whole")])[0]

    def first_three(name: str, *flags: str) -> list[str]:
        run_dir = str(tmp_path / name)
        first = run_ranks(_train, 2, config, [*flags, "--save", run_dir, "--train-iters", "3"])
        assert first[-1] == pytest.approx(whole[:3], rel=2e-4)
        return ["--save", run_dir, "--load", run_dir]

    def rest(resume: list[str]) -> list[float]:
        return run_ranks(_train, 1, config, resume)[0]

    # The distributed optimizer's shards as they are: another data-parallel size only.
    assert rest(first_three("dp2")) == pytest.approx(whole[3:], rel=2e-4)
    resume = first_three("tp2", "--tensor-model-parallel-size", "2")
    refusal = (
        r"its distributed-optimizer state was saved dp_reshardable at TP=2 PP=1, which loads at "
        r"another data-parallel size only \(this run: TP=1 PP=1\): .* --no-load-optim"
    )
    with pytest.raises(AssertionError, match=refusal):
        rest(resume)
    # The weights, position and schedule continue; Adam starts afresh, so the losses differ.
    fresh_adam, printed, _ = run_ranks(_train_reported, 1, config, [*resume, "--no-load-optim"])[0]
    assert "warning: --no-load-optim: iter_0000003's optimizer state is not loaded" in printed
    assert len(fresh_adam) == len(whole) - 3
    assert fresh_adam[0] == pytest.approx(whole[3], rel=2e-4)  # the loaded weights' loss
    assert fresh_adam[1:] != pytest.approx(whole[4:], rel=2e-4)
    # Saved fully_reshardable (gathered over the data-parallel ranks): any TP and DP size.
    fully = "--dist-ckpt-optim-fully-reshardable"
    resume = first_three("tp2-fully-reshardable", "--tensor-model-parallel-size", "2", fully)
    assert rest(resume) == pytest.approx(whole[3:], rel=2e-4)
    resume = first_three("dp2-fully-reshardable", fully)
    tp2 = run_ranks(_train, 2, config, [*resume, "--tensor-model-parallel-size", "2"])
    assert tp2[-1] == pytest.approx(whole[3:], rel=2e-4)
    # And any PP size. (PP=2 initialises the second stage's layers otherwise: its own run is
    # the reference.)
    run_dir = tmp_path / "pp2-fully-reshardable"
    flags = [
        "--pipeline-model-parallel-size",
        "2",
        fully,
        "--save",
        str(run_dir),
        "--save-interval",
        "3",
    ]
    pp2 = run_ranks(_train, 2, config, flags, pipeline_model_parallel_size=2)
    (run_dir / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert rest(["--save", str(run_dir), "--load", str(run_dir)]) == pytest.approx(
        pp2[-1][3:], rel=2e-4
    )
    # The regular optimizer's state, a tensor per parameter: any layout, but not into the
    # distributed optimizer.
    replicated = ["--use-distributed-optimizer", "false"]
    resume = first_three("tp2-replicated", "--tensor-model-parallel-size", "2", *replicated)
    with pytest.raises(AssertionError, match="its optimizer state is replicated, this run's optim"):
        rest(resume)
    assert rest([*resume, *replicated]) == pytest.approx(whole[3:], rel=2e-4)


def _blend_counts(rank, world_size, config_path, samples):
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import load_config
    from megatron_ext.training.data import DatasetTokenizer, build_datasets

    config = load_config(config_path)
    tokenizer = DatasetTokenizer(
        SentencePieceEncoder(config.tokenizer_model), config.tokenizer_model
    )
    datasets = build_datasets(config, tokenizer)
    counts = [0, 0]
    tokens = [0, 0]
    for i in range(samples):
        dataset_id = int(datasets.train.dataset_index[i])
        counts[dataset_id] += 1
        tokens[dataset_id] += int(datasets.train[i]["tokens"].numel())
    return counts, tokens, sorted(datasets.valid)


def test_blend_delivers_the_requested_token_shares(tmp_path, small_tokenizer, training_data):
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=500)
    counts, tokens, valid = run_ranks(_blend_counts, 1, config, 2000)[0]
    assert valid == ["ar", "en"]
    share = tokens[0] / sum(tokens)
    assert share == pytest.approx(0.25, abs=0.005), (counts, tokens)


def _blend_samples(rank, world_size, config_path, train_samples, read):
    """The tokens of blend samples ``read`` with the blend built for ``train_samples``, and the
    share of the tokens per dataset."""
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import load_config
    from megatron_ext.training.data import (
        DatasetTokenizer,
        build_datasets,
        dataset_reads,
        training_data_summary,
    )

    config = load_config(config_path)
    tokenizer = DatasetTokenizer(
        SentencePieceEncoder(config.tokenizer_model), config.tokenizer_model
    )
    train = build_datasets(config, tokenizer, train_samples).train
    samples = [train[i]["tokens"].tolist() for i in read]
    counts = np.bincount(np.asarray(train.dataset_index[:train_samples]), minlength=2)
    reads = dataset_reads(train, train_samples)
    summary = training_data_summary(reads, train_samples, config.dataset_names())
    open_files = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    return samples, (counts / counts.sum()).tolist(), summary, open_files


def _epoch_documents(rank, world_size, config_path, train_samples):
    """The documents of the first dataset in the order each epoch packs them, and its training
    part's documents."""
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import load_config
    from megatron_ext.training.data import DatasetTokenizer, build_datasets

    config = load_config(config_path)
    tokenizer = DatasetTokenizer(
        SentencePieceEncoder(config.tokenizer_model), config.tokenizer_model
    )
    first = build_datasets(config, tokenizer, train_samples).train.datasets[0]
    orders = [first.epoch(e).document_index.tolist() for e in range(first.epochs)]
    return orders, first.epoch(0).indices.tolist()


def _sequence_lengths(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)
    return np.array(index.sequence_lengths)  # a copy: the memory map closes with ``index``


def test_the_blend_order_does_not_depend_on_the_run_length(
    tmp_path, small_tokenizer, training_data
):
    """A run resumed with more iterations (or a larger batch) reads on in the order it started.
    megatron-core's GPTDataset shuffles all the epochs it needs together: a build for more
    samples reshuffled the whole of a dataset whose epoch count changed, so the resumed run
    re-read samples it had trained on."""
    config = write_config(tmp_path, small_tokenizer, training_data)
    # Samples per epoch of the English training part (98 % of it), a quarter of the blend.
    english = _sequence_lengths(training_data["en"])
    epoch = int(english[: round(0.98 * len(english))].sum()) // 64
    short, longer = 2 * epoch, 12 * epoch  # English: half an epoch, then three
    resumed_at = range(short // 2, short, 97)  # samples a resumed run reads next
    before, _, summary, _ = run_ranks(_blend_samples, 1, config, short, resumed_at)[0]
    assert summary.startswith(f"training data, {short:,} samples: en 25.0% (0.50 epochs), ar 75")
    # Read on to the end too: past the first epoch of both datasets.
    read = [*resumed_at, *range(0, longer, 101)]
    after, _, summary, open_files = run_ranks(_blend_samples, 1, config, longer, read)[0]
    assert "en 25.0% (3.00 epochs)" in summary
    assert after[: len(resumed_at)] == before
    # Not a dataset's files per epoch (200 epochs reached the usual limit of 1,024).
    read = [*resumed_at, *range(0, 2 * longer, 101)]
    *_, summary, open_at_twice = run_ranks(_blend_samples, 1, config, 2 * longer, read)[0]
    assert "en 25.0% (6.00 epochs)" in summary
    assert open_at_twice == open_files
    # Each epoch packs every document of the training part once, each in its own order (an
    # epoch read in the first one's packing repeats its samples, only reordered).
    orders, documents = run_ranks(_epoch_documents, 1, config, longer)[0]
    assert len(orders) >= 3  # the greedy draw may take one sample more than 3 epochs hold
    assert all(sorted(order) == sorted(documents) for order in orders)
    assert len({tuple(order) for order in orders}) == len(orders)
    # Megatron-LM's form without weights blends by size (it failed past one epoch of a dataset).
    sizes = [int(_sequence_lengths(training_data[lang]).sum()) for lang in ("en", "ar")]
    bare = write_config(
        tmp_path,
        small_tokenizer,
        training_data,
        data_path=[training_data["en"], training_data["ar"]],
    )
    _, shares, _, _ = run_ranks(_blend_samples, 1, bare, longer, range(longer - 4, longer))[0]
    assert shares[0] == pytest.approx(sizes[0] / sum(sizes), abs=0.005)


def test_resuming_a_checkpoint_of_the_earlier_data_order_warns(
    tmp_path, small_tokenizer, training_data
):
    """Checkpoints saved before the epoch-by-epoch order read repeated datasets in another order."""
    from megatron_ext.data.indexed import IndexedDatasetWriter

    small = IndexedDatasetWriter(tmp_path / "small.bin", np.uint16)  # 3 samples per epoch
    small.add_documents(np.arange(3, 203, dtype=np.uint16), np.full(5, 40), np.ones(5))
    small.finalize(tmp_path / "small.idx")
    config = write_config(
        tmp_path, small_tokenizer, training_data, split="1,0,0", train_iters=2,
        data_path=[3, str(tmp_path / "small"), 1, training_data["ar"]],
        valid_data_path=[training_data["en"]],
    )  # fmt: skip
    save = tmp_path / "run"
    args = ("--config", str(config), "--save", str(save), "--load", str(save))
    proc = _cli(*args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "training data, 8 samples: small 75.0% (2.00 epochs), corpus_ar 25.0%" in out
    state = save / "iter_0000002" / "train_state.json"
    saved = json.loads(state.read_text())
    del saved["data_order"]  # as an earlier version wrote it
    state.write_text(json.dumps(saved))
    warning = "was saved by an earlier megatron-ext, which ordered the samples"
    for iterations, warned in (("4", "iter_0000002"), ("6", None)):  # the second from iter_4
        proc = _cli(*args, "--train-iters", iterations)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert (f"warning: {warned} {warning}" in out) if warned else (warning not in out), out


def _packed_vs_alone(rank, world_size, config_path):
    import torch
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_ext.training.config import load_config
    from megatron_ext.training.model import build_model, resolve_arch, training_device

    config = load_config(config_path)
    model = build_model(config, resolve_arch(config, 2000, None)).eval()
    generator = torch.Generator().manual_seed(0)
    eod = 2
    first = torch.randint(3, 2000, (20,), generator=generator)
    second = torch.randint(3, 2000, (44,), generator=generator).to(training_device())
    packed = torch.cat([first.to(second.device), torch.tensor([eod], device=second.device), second])
    tokens, labels = packed[:-1], packed[1:]

    def losses(reset: bool):
        # megatron-core's own GPTDataset mask builder, as training uses it.
        mask, _, positions = _get_ltor_masks_and_position_ids(
            tokens, eod, reset, reset, False, True
        )
        return model(tokens[None], positions[None], mask[None], labels=labels[None])[0, 21:]

    with torch.no_grad():
        positions = torch.arange(43, device=second.device)[None]
        alone = model(second[None, :-1], positions, None, labels=second[None, 1:])[0]
        return losses(True).cpu(), losses(False).cpu(), alone.cpu()


@pytest.mark.parametrize(
    ("fusion", "named"),
    [
        ("--apply-rope-fusion", "RoPE (kernels/rope.py)"),
        ("--gradient-accumulation-fusion", "gradient accumulation (ours)"),
    ],
    ids=["rope", "weight-gradient"],
)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_our_fusions_train_as_megatron_unfused(
    tmp_path, small_tokenizer, training_data, precision, fusion, named
):
    """megatron-core's fusions that model/fusions.py provides without TE or apex, against the
    unfused runs: fp32 agrees to rounding; in bf16 ours rounds less (RoPE: no bf16 cos and sin;
    weight gradients: no bf16 per-micro-batch gradient before the fp32 sum), so the losses differ
    slightly, which also shows that ours ran. Both on the local spec, each fusion set explicitly:
    on a GPU both are on by default, and with TE installed its spec brings its own."""
    from megatron_ext.model.fusions import transformer_engine_rope

    if fusion == "--apply-rope-fusion" and transformer_engine_rope():
        pytest.skip("megatron-core takes Transformer Engine's fused RoPE wherever TE is installed")
    config = write_config(
        tmp_path, small_tokenizer, training_data, train_iters=6, transformer_impl="local"
    )
    unfused = run_ranks(_train, 1, config, [*precision, fusion, "false"])[0]
    fused, printed, _ = run_ranks(_train_reported, 1, config, [*precision, fusion, "true"])[0]
    assert named in printed.split("fusions: ", 1)[1].splitlines()[0].split(", ")
    tolerance = 1e-5 if not precision else 2e-2
    assert fused == pytest.approx(unfused, rel=tolerance), (fused, unfused)
    assert fused != unfused or not precision


def test_document_aware_packing_isolates_documents(tmp_path, small_tokenizer, training_data):
    """With --reset-attention-mask a packed document is scored exactly as if it were alone
    (on the local spec: Transformer Engine's refuses the per-document masks)."""
    config = write_config(tmp_path, small_tokenizer, training_data, transformer_impl="local")
    isolated, attending, alone = run_ranks(_packed_vs_alone, 1, config)[0]
    assert isolated.shape == alone.shape == (43,)
    assert (isolated - alone).abs().max() < 1e-4
    assert (attending - alone).abs().max() > 1e-2  # without the reset it sees the first document
    # And the loop trains with megatron-core's per-document masks and positions.
    packed = ["--reset-position-ids", "--reset-attention-mask", "--train-iters", "3"]
    assert all(math.isfinite(x) for x in run_ranks(_train, 1, config, packed)[0])


def _sequence_parallel_loss(rank, world_size, config_path):
    import torch

    from megatron_ext.training.config import load_config
    from megatron_ext.training.model import build_model, resolve_arch

    models = {}
    for kernels in ("megatron", "fused"):
        config = load_config(
            config_path,
            ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--kernels", kernels],
        )
        models[kernels] = build_model(config, resolve_arch(config, 2000, None))
    models["fused"].load_state_dict(models["megatron"].state_dict())
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 2, 64, generator=generator)  # [s, b, h], the same on both ranks
    labels = torch.randint(0, 2000, (2, 64), generator=generator)
    loss_mask = (torch.rand(2, 64, generator=generator) > 0.2).float()
    results = {}
    for kernels, model in models.items():
        local = hidden.chunk(2, dim=0)[rank].clone().requires_grad_()
        loss = model._postprocess(local, None, None, labels, None, None, None, loss_mask=loss_mask)
        loss.backward()
        results[kernels] = (loss.detach(), local.grad, model.output_layer.weight.grad)
    return results


def test_fused_loss_under_sequence_parallelism_matches_megatron(
    tmp_path, small_tokenizer, training_data
):
    config = write_config(tmp_path, small_tokenizer, training_data)
    for ranks in run_ranks(_sequence_parallel_loss, 2, config):
        for ours, theirs in zip(ranks["fused"], ranks["megatron"], strict=True):
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_resume_with_a_larger_global_batch_continues_the_data(
    tmp_path, small_tokenizer, training_data
):
    """The data position is samples read, so a batch-size ramp neither repeats nor skips data."""
    config = write_config(tmp_path, small_tokenizer, training_data, lr_warmup_iters=0)
    save = str(tmp_path / "run")
    run_ranks(_train, 1, config, ["--save", save, "--train-iters", "3"])
    run_ranks(_train, 1, config, ["--save", save, "--load", save, "--global-batch-size", "8"])
    state = json.loads((tmp_path / "run" / "iter_0000006" / "train_state.json").read_text())
    assert state["iteration"] == 6
    assert state["consumed_samples"] == 3 * 4 + 3 * 8


def test_time_budget_saves_and_exits_for_requeue(tmp_path, small_tokenizer, training_data):
    """--exit-duration-in-mins (set by the Slurm template from the time limit) stops cleanly."""
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=1000)
    save = tmp_path / "run"
    stop = ("--exit-duration-in-mins", "0.0001", "--eval-interval", "1")
    proc = _cli("--config", str(config), "--save", str(save), *stop)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "interrupted (--exit-duration-in-mins) at iteration 1" in out
    assert json.loads((save / "interrupted.json").read_text()) == {
        "reason": "--exit-duration-in-mins",
        "iteration": 1,
    }
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # The stop came at a validation step and skipped it to save first: the resumed run runs it.
    assert not [e for e in read_metrics(save / "metrics.jsonl") if "split" in e]
    again = ["--save", str(save), "--load", str(save), "--train-iters", "2"]
    run_ranks(_train, 1, config, [*again, "--eval-interval", "1"])
    entries = read_metrics(save / "metrics.jsonl")
    validated = [(e["step"], e["lang"]) for e in entries if "split" in e]
    assert validated == [(1, "en"), (1, "ar"), (2, "en"), (2, "ar")]


def _train_after_a_slow_set_up(rank, world_size, config_path, overrides, set_up_seconds):
    from megatron_ext.training.config import load_config
    from megatron_ext.training.loop import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    time.sleep(set_up_seconds)  # as loading a large checkpoint or building indices can take
    result = trainer.run()
    return result.iteration, result.interrupted


def test_time_budget_counts_the_set_up(tmp_path, small_tokenizer, training_data):
    """The job's time limit counts the set-up: so does the budget derived from it."""
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=1000)
    budget = ["--exit-duration-in-mins", "0.04"]  # 2.4 s: a run of many iterations after set-up
    stopped = run_ranks(_train_after_a_slow_set_up, 1, config, budget, 3.0)[0]
    assert stopped == (1, "--exit-duration-in-mins")
    # When that one iteration is the last, the run ends finished: a re-queue would find nothing
    # to do, and the final validation would never run.
    save = tmp_path / "one"
    last = [*budget, "--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(save)]
    assert run_ranks(_train_after_a_slow_set_up, 1, config, last, 3.0)[0] == (1, None)
    assert not (save / "interrupted.json").exists()
    assert [e["lang"] for e in read_metrics(save / "metrics.jsonl") if "split" in e] == ["en", "ar"]


def _train_signalled_during_set_up(rank, world_size, config_path, overrides):
    import signal

    from megatron_ext.training import loop
    from megatron_ext.training.config import load_config

    build_datasets = loop.build_datasets

    def build_when_preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm pre-empting a job building its indices
        return build_datasets(*args, **kwargs)

    loop.build_datasets = build_when_preempted
    result = loop.train(load_config(config_path, overrides))
    return result.iteration, result.interrupted


def test_sigterm_during_the_set_up_stops_cleanly(tmp_path, small_tokenizer, training_data):
    """The default handler ended the process (143): no interrupted.json, no re-queue."""
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=1000)
    save = tmp_path / "run"
    stopped = run_ranks(_train_signalled_during_set_up, 1, config, ["--save", str(save)])[0]
    assert stopped == (0, "SIGTERM")
    assert json.loads((save / "interrupted.json").read_text()) == {
        "reason": "SIGTERM",
        "iteration": 0,
    }


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_sigterm_while_the_command_imports_stops_cleanly(tmp_path, small_tokenizer, training_data):
    """Importing torch and megatron-core takes seconds before the trainer's handler exists."""
    config = write_config(tmp_path, small_tokenizer, training_data, train_iters=1000)
    save = tmp_path / "run"
    proc = _cli("--config", str(config), "--save", str(save))
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid):  # the first handler, installed after the config reads
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # still importing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "interrupted (SIGTERM) at iteration 0" in out
    assert out.rstrip().endswith("checkpoint (none written)")
    assert json.loads((save / "interrupted.json").read_text())["iteration"] == 0


def test_freeze_base_rows_request_without_a_new_rows_stage_warns(
    tmp_path, small_tokenizer, training_data
):
    config = write_config(
        tmp_path, small_tokenizer, training_data, train_iters=1, lr_warmup_iters=0
    )
    run_ranks(_train, 1, config, ["--save", str(tmp_path / "start")])
    start = tmp_path / "start" / "iter_0000001"
    meta = json.loads((start / "megatron_ext.json").read_text())
    (start / "megatron_ext.json").write_text(json.dumps({**meta, "freeze_base_rows": True}))
    proc = _cli("--config", str(config), "--pretrained-checkpoint", str(start))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "was converted with --freeze-base-rows, but no stage trains only the new rows" in out


def test_data_from_another_tokenizer_fails_loudly(
    tmp_path, corpora, small_tokenizer, llama2_tokenizer, training_data
):
    """Ids beyond the vocabulary stop the run (the fused embedding would read them as zeros)."""
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.training.config import ConfigError
    from megatron_ext.training.data import DatasetTokenizer, check_datasets
    from tests.conftest import preprocess_languages

    # Llama-2's 32,000-piece ids fed to a run with the 2,000-piece test tokenizer.
    large = preprocess_languages(corpora, llama2_tokenizer, tmp_path)
    config = write_config(tmp_path, small_tokenizer, large)
    proc = _cli("--config", str(config))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    assert f"{large['en']}.stats.json: {large['en']} was tokenized with" in err
    assert "larger than --tokenizer-model" in err

    # Without preprocess's record (data made by Megatron-LM's tool) the batches are checked.
    for prefix in large.values():
        Path(prefix + ".stats.json").unlink()
    proc = _cli("--config", str(config))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    assert re.search(r"_text_document: token id [\d,]+ in sample \d+ is outside the vocab", err)

    # A smaller, unrelated tokenizer's data: ids in range that name other pieces.
    tokenizer = DatasetTokenizer(SentencePieceEncoder(llama2_tokenizer), str(llama2_tokenizer))
    with pytest.raises(ConfigError, match=r"whose ids name other pieces .*\(id [\d,]+ is "):
        check_datasets(list(training_data.values()), tokenizer, "98,2,0")
    assert check_datasets(list(large.values()), tokenizer, "98,2,0") == []  # no records left

    # A prefix without its files, named (megatron-core's assertion would end in a traceback).
    with pytest.raises(ConfigError, match=r"--data-path: .*missing\.bin and .*missing\.idx"):
        check_datasets([str(tmp_path / "missing")], tokenizer, "98,2,0")


def test_data_from_the_base_of_an_expanded_tokenizer_is_accepted(
    tmp_path, small_tokenizer, training_data
):
    """Its ids name the same pieces; known by comparing them, or from the run's expansion.json."""
    from megatron_ext.hashing import sha256_file
    from megatron_ext.tokenizer.encoders import SentencePieceEncoder
    from megatron_ext.tokenizer.expand import load_base, merge_pieces
    from megatron_ext.training.data import DatasetTokenizer, check_datasets

    expanded = tmp_path / "expanded" / "tokenizer.model"
    expanded.parent.mkdir()
    grown = merge_pieces(load_base(small_tokenizer), [("▁qzx", 1), ("▁xqz", 1)], "gain")
    expanded.write_bytes(grown.model.serialize())
    tokenizer = DatasetTokenizer(SentencePieceEncoder(expanded), str(expanded))
    prefixes = list(training_data.values())
    assert check_datasets(prefixes, tokenizer, "98,2,0") == []  # compared piece by piece

    # The record names a file that is not there (preprocessed on another machine).
    moved = tmp_path / "moved"
    moved.mkdir()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            (moved / Path(prefix + suffix).name).symlink_to(prefix + suffix)
        record = json.loads(Path(prefix + ".stats.json").read_text())
        record["tokenizer"]["model"] = str(tmp_path / "elsewhere" / "tokenizer.model")
        (moved / Path(prefix + ".stats.json").name).write_text(json.dumps(record))
    at_hand = [str(moved / Path(p).name) for p in prefixes]
    warnings = check_datasets(at_hand, tokenizer, "98,2,0")
    assert len(warnings) == 2 and all("not there to compare" in w for w in warnings)
    # ... but the expanded tokenizer's expansion.json names its base.
    base = {"path": "elsewhere", "sha256": sha256_file(small_tokenizer)}
    (expanded.parent / "expansion.json").write_text(json.dumps({"inputs": {"base_model": base}}))
    assert check_datasets(at_hand, tokenizer, "98,2,0") == []
