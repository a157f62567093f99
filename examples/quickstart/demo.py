#!/usr/bin/env python3
"""The whole megatron-ext pipeline on CPU, end to end, ending in a report with plots (`make demo`).

Each capability adds its stage here. Stages so far:

1. sample data: the corpora (shared/corpora, or built from package registries) and the
   Apache-2.0 Mistral-7B v0.1 tokenizer (Llama-2's own is used only for compatibility tests);
2. preprocess: an English:Arabic 1:3 blend into Megatron indexed datasets, with the
   ``--data-path`` that realises the shares;
3. expand tokenizer: Arabic pieces merged into the demo tokenizer, with a fertility and parity
   report against the base;
4. expand the model: a CPU-sized Llama converted to megatron-core with the expanded vocabulary
   (new rows initialised from their sub-words) and exported back to Hugging Face;
5. continued pretraining: the blend re-tokenized with the expanded tokenizer, then
   ``megatron-ext train`` on two gloo processes (TP=2 with sequence parallelism, checkpoints
   written in the background) from the expanded checkpoint: a warm-up of
   the new embedding rows alone, then the whole model, with per-language validation (also on
   held-out parallel text, the UDHR), a checkpoint and its export to Hugging Face;
6. at cluster scale: ``megatron-ext train --dry-run`` of the Slurm examples' Llama-2 7B and 70B
   configs with the expanded tokenizer (layout, memory per GPU, checkpoint size, stages).

Outputs go to ``--output-dir`` (default ``demo_output/``); ``report.md`` there is the summary.
Re-running reuses outputs that are up to date and says so; an interrupted training run resumes
from its latest checkpoint; ``--force`` starts afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stage(title: str) -> None:
    """Print a stage banner."""
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str], capture: bool = False) -> str | None:
    """Run a ``megatron-ext`` command as a user types it (with this interpreter); fail loudly.

    Returns:
        With ``capture``, what the command printed (also shown); else None.
    """
    print("$ " + shlex.join(cmd), flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "megatron_ext.cli", *cmd[1:]],
        check=True,
        capture_output=capture,
        text=True,
    )
    if capture:
        print(done.stdout, end="")
    return done.stdout


def sample_data() -> tuple[Path, Path]:
    """Corpora folder and tokenizer path, fetched (and verified) when missing."""
    from megatron_ext.assets import TOKENIZERS, fetch_corpora, fetch_tokenizer

    stage("1. sample data")
    corpora = fetch_corpora()
    tokenizer = fetch_tokenizer("mistral")
    print(f"corpora:   {corpora}")
    print(f"tokenizer: {tokenizer} ({TOKENIZERS['mistral'].licence})")
    return corpora, tokenizer


def preprocess(out: Path, corpora: Path, tokenizer: Path, name: str = "corpus") -> dict:
    """Blend English and Arabic 1:3 by tokens into indexed datasets."""
    os.environ["MEGATRON_EXT_CORPORA"] = str(corpora)
    prefix = out / "data" / name
    run(
        [
            "megatron-ext", "preprocess",
            "--manifest", str(HERE / "blend.yaml"),
            "--output-prefix", str(prefix),
            "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(tokenizer),
            "--append-eod",
            "--workers", str(min(os.cpu_count() or 1, 4)),
        ]
    )  # fmt: skip
    blend = json.loads(Path(f"{prefix}_blend.json").read_text())
    for entry in blend["languages"]:
        stats_file = Path(entry["dataset"] + ".stats.json")
        entry["stats"] = json.loads(stats_file.read_text())
    return blend


def plot_preprocess(blend: dict, path: Path) -> None:
    """Bar charts: tokens per language (corpus vs blended share) and characters per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in blend["languages"]]
    tokens = [e["tokens"] / 1e6 for e in blend["languages"]]
    shares = [e["requested_share"] for e in blend["languages"]]
    chars_per_token = [e["stats"]["characters"] / e["stats"]["tokens"] for e in blend["languages"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, tokens, color="#4C72B0")
    axes[0].set_title("corpus tokens (millions)")
    corpus_share = [t / sum(tokens) for t in tokens]
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], corpus_share, width=0.4, label="corpus")
    axes[1].bar([i + 0.2 for i in x], shares, width=0.4, label="training blend")
    axes[1].set_xticks(list(x), names)
    axes[1].set_title("share of tokens")
    axes[1].legend()
    axes[2].bar(names, chars_per_token, color="#55A868")
    axes[2].set_title("characters per token (base tokenizer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# New pieces for the demo: about a minute on 2 cores, report included (25,000 in real runs).
EXPAND_BUDGET = 8000


def expand_tokenizer(out: Path, corpora: Path, tokenizer: Path) -> dict:
    """Expand the tokenizer on the Arabic corpus and report base vs expanded."""
    from megatron_ext.hashing import sha256_file

    stage(f"3. expand tokenizer: +{EXPAND_BUDGET:,} Arabic pieces, then fertility and parity")
    expanded = out / "tokenizer"
    meta_file = expanded / "expansion.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    reused = bool(
        meta
        and meta["settings"]["num_new_tokens"] == EXPAND_BUDGET
        and meta["inputs"]["base_model"]["sha256"] == sha256_file(tokenizer)
    )
    if reused:
        print(f"kept: {expanded} (expanded from the same base by an earlier demo run)")
    else:
        run(
            [
                "megatron-ext", "expand-tokenizer",
                "--base-model", str(tokenizer),
                "--corpus", str(corpora / "ar" / "train.jsonl"),
                "--num-new-tokens", str(EXPAND_BUDGET),
                "--output-dir", str(expanded),
                "--force",
            ]
        )  # fmt: skip
    report_dir = out / "tokenizer_report"
    run(
        [
            "megatron-ext", "tokenizer-report",
            "--tokenizer", f"base={tokenizer}",
            "--tokenizer", f"expanded={expanded / 'tokenizer.model'}",
            "--corpus", f"ar-valid={corpora / 'ar' / 'valid.jsonl'}",
            "--corpus", f"en-valid={corpora / 'en' / 'valid.jsonl'}",
            "--parallel", str(corpora / "parallel" / "udhr.jsonl"),
            "--output-dir", str(report_dir),
            "--force",
        ]
    )  # fmt: skip
    return {**json.loads((report_dir / "report.json").read_text()), "reused": reused}


def tokenizer_section(report: dict) -> str:
    """Markdown section of the report for stage 3."""
    rows = [
        "| text | base tokens/word | expanded tokens/word | base parity | expanded parity |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, by_tok in report["corpora"].items():
        rows.append(
            f"| {name} | {by_tok['base']['fertility']:.2f} | {by_tok['expanded']['fertility']:.2f}"
            " | | |"
        )
    for lang in ("arb", "pes", "urd", "eng"):
        m = report["parallel"][lang]
        rows.append(
            f"| UDHR {lang} | {m['base']['fertility']:.2f} | {m['expanded']['fertility']:.2f} | "
            f"{m['base']['parity']:.2f} | {m['expanded']['parity']:.2f} |"
        )
    return (
        "\n## Tokenizer expansion\n\n"
        f"{EXPAND_BUDGET:,} pieces learned from the Arabic corpus and appended to the tokenizer "
        f"({report['tokenizers']['base']['size']:,} -> "
        f"{report['tokenizers']['expanded']['size']:,} pieces; every base id unchanged, so English "
        "tokenizes exactly as before). Files: `tokenizer/` (SentencePiece and Hugging Face); "
        "full tables: `tokenizer_report/report.md`. Parity: tokens for the UDHR in that language "
        "over tokens for the English UDHR.\n\n"
        + "\n".join(rows)
        + "\n\n![tokenizer expansion](tokenizer_report/report.png)\n"
    )


def preprocess_section(blend: dict, expanded_blend: dict, out: Path) -> str:
    """Markdown section of the report for stage 2 (and its plot), with stage 5's re-tokenizing."""
    plot_preprocess(blend, out / "preprocess.png")
    budget = blend["train_tokens"]
    rows = [
        "| language | documents | characters | tokens (base) | tokens (expanded) | fewer | "
        f"blend share | epochs in {budget / 1e6:g}M tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e, x in zip(blend["languages"], expanded_blend["languages"], strict=True):
        s = e["stats"]
        rows.append(
            f"| {e['name']} | {s['documents']:,} | {s['characters']:,} | {s['tokens']:,} | "
            f"{x['stats']['tokens']:,} | {s['tokens'] / x['stats']['tokens']:.2f}x | "
            f"{e['requested_share']:.2f} | {x.get('epochs', 0):.2f} |"
        )
    return (
        "## Preprocessing\n\n"
        "English (World English Bible) and classical Arabic (hadith) blended 1:3 by tokens, "
        "once with the base tokenizer and again (stage 5, what training reads) with the "
        "expanded one. Arabic costs the base tokenizer far more tokens per character than "
        "English; the expanded tokenizer needs several times fewer, and English's count does "
        "not change (its pieces are the base's). Epochs: how often each corpus would be read "
        f"in a run of {budget:,} tokens (`train_tokens` in `blend.yaml`; the demo trains "
        "far fewer).\n\n" + "\n".join(rows) + "\n\n"
        f"Megatron `--data-path` (expanded tokenizer):\n\n```\n{expanded_blend['data_path']}"
        "\n```\n\n![preprocessing](preprocess.png)\n"
    )


def expand_model(out: Path, tokenizer: Path, expanded_tokenizer: Path) -> dict:
    """Convert a CPU-sized Llama to megatron-core growing its vocabulary, and export it back."""
    import torch
    import transformers

    from megatron_ext.arch import PRESETS

    stage("4. expand the model: HF Llama -> megatron-core (new rows) -> HF")
    models = out / "models"
    base_dir = models / "tiny-hf"
    if not (base_dir / "config.json").exists():
        # Random weights: this stage shows the mechanics; docs/benchmarks.md measures quality.
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**PRESETS["tiny"].to_hf_config())
        transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
        (base_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    run(
        [
            "megatron-ext", "convert", "hf-to-megatron",
            "--hf-dir", str(base_dir),
            "--output-dir", str(models / "tiny-mcore"),
            "--tokenizer-model", str(expanded_tokenizer),
            "--embedding-init", "avg_subwords",
            "--tensor-model-parallel-size", "2",
            "--dtype", "fp32",
            "--force",
        ]
    )  # fmt: skip
    run(
        [
            "megatron-ext", "convert", "megatron-to-hf",
            "--megatron-dir", str(models / "tiny-mcore"),
            "--output-dir", str(models / "tiny-hf-expanded"),
            "--tokenizer-model", str(expanded_tokenizer),
            "--force",
        ]
    )  # fmt: skip
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    grown = transformers.LlamaForCausalLM.from_pretrained(models / "tiny-hf-expanded").eval()
    ids = torch.arange(1000, 1064).unsqueeze(0)
    with torch.no_grad():
        before, after = base(ids).logits, grown(ids).logits
    old = base.config.vocab_size
    meta = json.loads((models / "tiny-mcore" / "megatron_ext.json").read_text())
    return {
        "base_vocab": old,
        "vocab": grown.config.vocab_size,
        "padded": meta["padded_vocab_size"],
        "parameters": sum(p.numel() for p in grown.parameters()),
        "max_logit_change": (after[..., :old] - before).abs().max().item(),
    }


def model_section(result: dict) -> str:
    """Markdown section of the report for stage 4."""
    return (
        "\n## Model expansion\n\n"
        "A CPU-sized Llama (`tiny` preset, random weights) converted to a megatron-core "
        "distributed checkpoint with the expanded tokenizer (`avg_subwords` rows, padded for "
        "TP=2) and exported back to Hugging Face, where `config.json`'s `vocab_size` is the "
        "tokenizer's.\n\n"
        "| vocabulary | megatron rows (padded) | parameters | max change of old-token logits |\n"
        "| --- | ---: | ---: | ---: |\n"
        f"| {result['base_vocab']:,} -> {result['vocab']:,} | {result['padded']:,} | "
        f"{result['parameters']:,} | {result['max_logit_change']:.1e} |\n\n"
        "Old rows are copied exactly, so every logit of an old token is unchanged; what "
        "the new rows cost a model that knows English is measured in docs/benchmarks.md.\n"
    )


TRAIN_ITERS = 40  # 10 warm-up iterations of the new rows, then 30 of the whole model
# Held-out validation: the same UDHR articles in both languages (in no training corpus).
HELD_OUT = {"udhr_ar": "arb", "udhr_en": "eng"}


def held_out_data(out: Path, corpora: Path, tokenizer: Path) -> list[str]:
    """The parallel UDHR articles of each language as an indexed dataset: their prefixes."""
    directory = out / "data" / "held_out"
    directory.mkdir(parents=True, exist_ok=True)
    articles = [
        json.loads(line)
        for line in (corpora / "parallel" / "udhr_articles.jsonl").read_text("utf-8").splitlines()
    ]
    prefixes = []
    for name, code in HELD_OUT.items():
        texts = directory / f"{name}.jsonl"
        prefixes.append(str(directory / f"{name}_text_document"))
        lines = "".join(
            json.dumps({"text": a["text"]}, ensure_ascii=False) + "\n"
            for a in articles
            if a["lang"] == code
        )
        if Path(prefixes[-1] + ".idx").exists() and texts.read_text("utf-8") == lines:
            continue  # made by an earlier demo run from the same text
        texts.write_text(lines, encoding="utf-8")
        run(
            [
                "megatron-ext", "preprocess",
                "--input", str(texts),
                "--output-prefix", str(directory / name),
                "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", str(tokenizer),
                "--append-eod",
                "--workers", "1",
                "--force",
            ]
        )  # fmt: skip
    return prefixes


def continued_pretraining(out: Path, corpora: Path) -> dict:
    """Train the expanded tiny model on the re-tokenized blend (TP=2 over two gloo processes)."""
    from megatron_ext.distributed import free_port

    stage("5. continued pretraining: new rows first, then everything (TP=2, gloo)")
    expanded = out / "tokenizer" / "tokenizer.model"
    blend = preprocess(out, corpora, expanded, name="expanded")
    data_path = blend["data_path"].split()
    held_out = held_out_data(out, corpora, expanded)
    save = out / "runs" / "tiny-ar"
    latest = save / "latest_checkpointed_iteration.txt"
    done = latest.exists() and int(latest.read_text()) >= TRAIN_ITERS
    reused = done and _validated_on(save, HELD_OUT)
    if reused:
        print(f"kept: {save} (trained to iteration {TRAIN_ITERS} by an earlier demo run)")
    else:
        if done:
            shutil.rmtree(save)  # an older demo's run, without the held-out validation
        elif latest.exists():
            print(f"resuming the interrupted run in {save} from its latest checkpoint")
        cmd = [
            "torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "megatron_ext.cli", "train",
            "--config", str(HERE / "train.yaml"),
            "--pretrained-checkpoint", str(out / "models" / "tiny-mcore"),
            "--tokenizer-model", str(expanded),
            "--data-path", *data_path,
            "--valid-data-path", *held_out,
            "--valid-data-names", *HELD_OUT,
            "--train-iters", str(TRAIN_ITERS),
            "--save", str(save), "--load", str(save),
        ]  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        torchrun = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        # As on a cluster (examples/slurm/train.sbatch); one thread per process on a CPU.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        run_process_group(torchrun, env)
    checkpoint = save / f"iter_{TRAIN_ITERS:07d}"
    run(
        [
            "megatron-ext", "convert", "megatron-to-hf",
            "--megatron-dir", str(checkpoint),
            "--output-dir", str(out / "models" / "tiny-ar-hf"),
            "--tokenizer-model", str(expanded),
            "--force",
        ]
    )  # fmt: skip
    from megatron_ext.training.metrics import read_metrics

    return {
        "metrics": read_metrics(save / "metrics.jsonl"),
        "checkpoint": str(checkpoint),
        "blend": blend,
        "reused": reused,
    }


def run_process_group(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd`` in a process group of its own, and take the whole group down with the demo.

    torchrun's ranks are its children: a demo stopped by Ctrl-C, SIGTERM or an error must not
    leave them training into the output directory. SIGTERM lets them checkpoint first (as Slurm
    pre-emption does), so the next demo run resumes where they stopped.
    """
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # the group may have ended already
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def _validated_on(save: Path, names: Iterable[str]) -> bool:
    """Whether the run in ``save`` validated on each of ``names`` (older demos did not)."""
    from megatron_ext.training.metrics import read_metrics

    metrics = save / "metrics.jsonl"
    seen = {m.get("lang") for m in read_metrics(metrics)} if metrics.exists() else set()
    return set(names) <= seen


def plot_training(metrics: list[dict], path: Path) -> None:
    """Training loss per step (stages shaded) and validation bits per character per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "split" not in m]
    valid = [m for m in metrics if m.get("split") == "valid"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], color="#4C72B0")
    for i, name in enumerate(dict.fromkeys(m["stage"] for m in train)):
        steps = [m["step"] for m in train if m["stage"] == name]
        axes[0].axvspan(min(steps) - 0.5, max(steps) + 0.5, color=f"C{i + 1}", alpha=0.1)
        axes[0].text(min(steps), max(m["loss"] for m in train), name, va="top", fontsize=8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats per token")
    axes[0].set_title("training loss")
    for lang in dict.fromkeys(m["lang"] for m in valid):
        points = [m for m in valid if m["lang"] == lang]
        held_out = lang in HELD_OUT
        axes[1].plot(
            [m["step"] for m in points], [m["bpc"] for m in points], marker="o",
            linestyle="--" if held_out else "-", label=f"{lang} (held out)" if held_out else lang,
        )  # fmt: skip
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("bits per character (lower is better)")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_section(result: dict, out: Path, vocab: int) -> str:
    """Markdown section of the report for stage 5 (``vocab``: the expanded tokenizer's size)."""
    metrics = result["metrics"]
    plot_training(metrics, out / "training.png")
    train = [m for m in metrics if "split" not in m]
    valid = [m for m in metrics if m.get("split") == "valid"]
    rows = ["| language | step | loss | bits per character |", "| --- | ---: | ---: | ---: |"]
    for m in valid:
        rows.append(f"| {m['lang']} | {m['step']} | {m['loss']:.3f} | {m['bpc']:.3f} |")
    speed = sorted(m["tokens_per_s"] for m in train)[len(train) // 2]
    stages = list(dict.fromkeys(m["stage"] for m in train))
    second = next(m["step"] for m in train if m["stage"] == stages[-1])
    before = next(m["loss"] for m in train if m["step"] == second - 1)
    peak = max(m["loss"] for m in train if second <= m["step"] < second + 3)
    tokens = train[-1]["consumed_tokens"]
    held_ar = [m["loss"] for m in valid if m["lang"] == "udhr_ar"]
    if held_ar[-1] > held_ar[0]:
        held_out = (
            f"gets worse on the UDHR's modern standard Arabic (`udhr_ar` {held_ar[0]:.2f} -> "
            f"{held_ar[-1]:.2f} nats per token; a uniform guess over {vocab:,} pieces scores "
            f"{math.log(vocab):.2f})"
        )
    else:
        held_out = "improves far less on the UDHR's modern standard Arabic"
    return (
        "\n## Continued pretraining\n\n"
        f"`megatron-ext train` ({HERE.name}/train.yaml) on two gloo processes at TP=2 with "
        "sequence parallelism, from the expanded checkpoint (the random-weight `tiny` model of "
        "the previous stage: this stage shows the machinery, not what a real base model "
        "learns), on the blend re-tokenized with the expanded tokenizer: "
        f"{len(train)} steps ({tokens:,} tokens), first only the new embedding and output "
        "rows (the base rows stay bitwise unchanged; `tests/integration/test_training.py::"
        "test_embedding_stage_changes_only_new_rows` checks it), then the whole model; the "
        "fused embedding and linear cross-entropy kernels; checkpoints written in the "
        "background (`async_save`); a median step ran at "
        f"{speed:,.0f} tokens/s on this CPU. Loss {train[0]['loss']:.2f} -> "
        f"{train[-1]['loss']:.2f}; the jump to {peak:.2f} (from {before:.2f}) at step "
        f"{second} is stage `{stages[-1]}` starting: every weight is trained from then on, "
        "at a learning rate warming up again. "
        f"Checkpoint `{Path(result['checkpoint']).relative_to(out)}`, exported to "
        "`models/tiny-ar-hf`; every step is in `runs/tiny-ar/metrics.jsonl`.\n\n"
        "Validation: `ar` and `en` are the validation parts of the training corpora (`--split`); "
        "`udhr_ar` and `udhr_en` are held out (`--valid-data-path`): the same 31 articles of "
        "the Universal Declaration of Human Rights in each language, in no training corpus. "
        "They show what a split of the training corpora cannot: a model that started from "
        f"random weights and has read some {tokens * 3 // 4:,} tokens of classical Arabic "
        f"(hadith) learns that corpus's words and {held_out}. With a real base model and a "
        "real token budget, these held-out sets are where transfer and English retention are "
        "measured.\n\n" + "\n".join(rows) + "\n\n![training](training.png)\n"
    )


# The Slurm examples' configs and the GPUs their sbatch scripts ask for.
CLUSTER_RUNS = {"llama2-7b": 8, "llama2-70b": 64}


def cluster_plans(out: Path) -> dict[str, str]:
    """``train --dry-run`` of the Slurm examples' configs with this demo's expanded tokenizer."""
    stage("6. at cluster scale: what the Slurm examples' runs need per GPU (--dry-run)")
    plans = {}
    # The configs' first stage trains the new rows: those past the base tokenizer's pieces.
    expansion = json.loads((out / "tokenizer" / "expansion.json").read_text())
    for name, gpus in CLUSTER_RUNS.items():
        # No converted checkpoint of these here: --arch gives the shape it would have.
        cmd = [
            "megatron-ext", "train", "--dry-run",
            "--config", str(HERE.parent / "configs" / f"{name}-ar.yaml"),
            "--world-size", str(gpus), "--arch", name, "--pretrained-checkpoint", "",
            "--tokenizer-model", str(out / "tokenizer" / "tokenizer.model"),
            "--base-vocab-size", str(expansion["base_size"]),
        ]  # fmt: skip
        plans[name] = run(cmd, capture=True)
    return plans


def cluster_section(plans: dict[str, str], vocab: int) -> str:
    """Markdown section of the report for stage 6."""
    blocks = "".join(
        f"\n`examples/configs/{name}-ar.yaml` on {CLUSTER_RUNS[name]} GPUs:\n\n```\n{plan}```\n"
        for name, plan in plans.items()
    )
    return (
        "\n## At cluster scale\n\n"
        f"The same run on Llama-2 7B and 70B with this demo's {vocab:,}-piece tokenizer, as "
        "`examples/slurm/` launches them: `megatron-ext train --dry-run` prints the parallel "
        "layout, the memory per GPU (activations counted as megatron-core's layers keep them), "
        "the checkpoint size and the stages, without a GPU or the data.\n" + blocks
    )


def write_report(out: Path, seconds: float, kept: list[str], sections: list[str]) -> Path:
    """The demo's markdown report."""
    report = out / "report.md"
    reuse = f" (kept from an earlier run: {', '.join(kept)})" if kept else ""
    report.write_text(
        "# megatron-ext demo report\n\n"
        f"Ran on CPU in {seconds:.0f} s{reuse}. Tokenizer: Mistral-7B v0.1 (Apache-2.0, "
        "32,000 pieces, the same SentencePiece BPE design as Llama-2's).\n\n" + "\n".join(sections),
        encoding="utf-8",
    )
    return report


# What the demo writes in --output-dir (all of it goes with --force).
OUTPUTS = ("data", "tokenizer", "tokenizer_report", "models", "runs", "report.md",
           "preprocess.png", "training.png")  # fmt: skip


def _stop_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # so that the stage running is stopped, its children too


def main(argv: list[str] | None = None) -> int:
    """Run every stage; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        type=lambda path: Path(path).resolve(),
        help="where everything goes; a re-run keeps what is up to date (default: demo_output)",
    )
    parser.add_argument(
        "--force", action="store_true", help="delete the demo's earlier outputs there first"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from megatron_ext.commands.options import quiet_known_warnings

    quiet_known_warnings()  # the demo imports megatron-core too (stage 5's free_port)
    started = time.perf_counter()
    if args.force:
        for name in OUTPUTS:
            path = args.output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stages(args.output_dir, started)
    except (KeyboardInterrupt, SystemExit):
        print(
            "\ndemo stopped: run the same command again to go on (finished stages are kept, "
            "training resumes from its latest checkpoint)",
            file=sys.stderr,
        )
        raise


def _run_stages(out: Path, started: float) -> int:
    """Every stage in order, then the report; returns the exit code."""
    corpora, tokenizer = sample_data()
    stage("2. preprocess: corpora -> Megatron indexed datasets (en:ar = 1:3 by tokens)")
    blend = preprocess(out, corpora, tokenizer)
    expansion = expand_tokenizer(out, corpora, tokenizer)
    grown = expand_model(out, tokenizer, out / "tokenizer" / "tokenizer.model")
    trained = continued_pretraining(out, corpora)
    plans = cluster_plans(out)
    vocab = expansion["tokenizers"]["expanded"]["size"]
    sections = [
        preprocess_section(blend, trained["blend"], out),
        tokenizer_section(expansion),
        model_section(grown),
        training_section(trained, out, vocab),
        cluster_section(plans, vocab),
    ]
    kept = [name for name, reused in (("tokenizer", expansion["reused"]),
                                      ("training", trained["reused"])) if reused]  # fmt: skip
    seconds = time.perf_counter() - started
    report = write_report(out, seconds, kept, sections)
    stage("done")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
