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
Re-running reuses outputs that are up to date.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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
    if not (
        meta
        and meta["settings"]["num_new_tokens"] == EXPAND_BUDGET
        and meta["inputs"]["base_model"]["sha256"] == sha256_file(tokenizer)
    ):
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
    return json.loads((report_dir / "report.json").read_text())


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


def preprocess_section(blend: dict, out: Path) -> str:
    """Markdown section of the report for stage 2 (and its plot)."""
    plot_preprocess(blend, out / "preprocess.png")
    rows = [
        "| language | documents | tokens | characters | chars/token | skipped | blend share | "
        "epochs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in blend["languages"]:
        s = e["stats"]
        rows.append(
            f"| {e['name']} | {s['documents']:,} | {s['tokens']:,} | {s['characters']:,} | "
            f"{s['characters'] / s['tokens']:.2f} | {s['skipped_total']:,} | "
            f"{e['requested_share']:.2f} | {e.get('epochs', 0):.2f} |"
        )
    return (
        "## Preprocessing\n\n"
        "English (World English Bible) and classical Arabic (hadith) blended 1:3 by tokens. "
        "Arabic costs the base tokenizer far more tokens per character than English: that is "
        "what tokenizer expansion fixes.\n\n" + "\n".join(rows) + "\n\n"
        f"Megatron `--data-path`:\n\n```\n{blend['data_path']}\n```\n\n"
        "![preprocessing](preprocess.png)\n"
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
    if not (done and _validated_on(save, HELD_OUT)):
        if save.exists():
            shutil.rmtree(save)  # an older demo run: train afresh
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
        subprocess.run(torchrun, check=True, env=env)
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

    return {"metrics": read_metrics(save / "metrics.jsonl"), "checkpoint": str(checkpoint)}


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
    axes[0].set_title("training loss (nats/token)")
    for lang in dict.fromkeys(m["lang"] for m in valid):
        points = [m for m in valid if m["lang"] == lang]
        axes[1].plot(
            [m["step"] for m in points], [m["bpc"] for m in points], marker="o", label=lang
        )
    axes[1].set_xlabel("step")
    axes[1].set_title("validation bits per character")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_section(result: dict, out: Path) -> str:
    """Markdown section of the report for stage 5."""
    metrics = result["metrics"]
    plot_training(metrics, out / "training.png")
    train = [m for m in metrics if "split" not in m]
    valid = [m for m in metrics if m.get("split") == "valid"]
    rows = ["| language | step | loss | bits per character |", "| --- | ---: | ---: | ---: |"]
    for m in valid:
        rows.append(f"| {m['lang']} | {m['step']} | {m['loss']:.3f} | {m['bpc']:.3f} |")
    speed = sorted(m["tokens_per_s"] for m in train)[len(train) // 2]
    return (
        "\n## Continued pretraining\n\n"
        f"`megatron-ext train` ({HERE.name}/train.yaml) on two gloo processes at TP=2 with "
        "sequence parallelism, from the expanded checkpoint, on the blend re-tokenized with the "
        "expanded tokenizer: "
        f"{len(train)} steps, first only the new embedding and output rows (the base rows stay "
        "bitwise unchanged), then the whole model; the fused embedding and linear cross-entropy "
        "kernels; checkpoints written in the background (`async_save`); "
        f"median {speed:,.0f} tokens/s on this CPU. Loss {train[0]['loss']:.2f} -> "
        f"{train[-1]['loss']:.2f}. Checkpoint `{Path(result['checkpoint']).relative_to(out)}`, "
        "exported to `models/tiny-ar-hf`; every step is in `runs/tiny-ar/metrics.jsonl`.\n\n"
        "Validation: `ar` and `en` are the validation parts of the training corpora (`--split`); "
        "`udhr_ar` and `udhr_en` are held out (`--valid-data-path`): the same 31 articles of "
        "the Universal Declaration of Human Rights in each language, in no training corpus, so "
        "their bits per character compare the two languages on one text. They also show what "
        "a split of the training corpora cannot: the training Arabic is classical (hadith), "
        "the UDHR's modern standard Arabic.\n\n"
        + "\n".join(rows)
        + "\n\n![training](training.png)\n"
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


def cluster_section(plans: dict[str, str]) -> str:
    """Markdown section of the report for stage 6."""
    blocks = "".join(
        f"\n`examples/configs/{name}-ar.yaml` on {CLUSTER_RUNS[name]} GPUs:\n\n```\n{plan}```\n"
        for name, plan in plans.items()
    )
    return (
        "\n## At cluster scale\n\n"
        "The same run on Llama-2 7B and 70B with this demo's 40,000-piece tokenizer, as "
        "`examples/slurm/` launches them: `megatron-ext train --dry-run` prints the parallel "
        "layout, the memory per GPU (activations counted as megatron-core's layers keep them), "
        "the checkpoint size and the stages, without a GPU or the data.\n" + blocks
    )


def write_report(out: Path, seconds: float, sections: list[str]) -> Path:
    """The demo's markdown report."""
    report = out / "report.md"
    report.write_text(
        "# megatron-ext demo report\n\n"
        f"Ran on CPU in {seconds:.0f} s. Tokenizer: Mistral-7B v0.1 (Apache-2.0, 32,000 pieces, "
        "the same SentencePiece BPE design as Llama-2's).\n\n" + "\n".join(sections),
        encoding="utf-8",
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Run every stage; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="demo_output", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    corpora, tokenizer = sample_data()
    stage("2. preprocess: corpora -> Megatron indexed datasets (en:ar = 1:3 by tokens)")
    blend = preprocess(args.output_dir, corpora, tokenizer)
    expansion = expand_tokenizer(args.output_dir, corpora, tokenizer)
    grown = expand_model(
        args.output_dir, tokenizer, args.output_dir / "tokenizer" / "tokenizer.model"
    )
    trained = continued_pretraining(args.output_dir, corpora)
    plans = cluster_plans(args.output_dir)
    sections = [
        preprocess_section(blend, args.output_dir),
        tokenizer_section(expansion),
        model_section(grown),
        training_section(trained, args.output_dir),
        cluster_section(plans),
    ]
    report = write_report(args.output_dir, time.perf_counter() - started, sections)
    stage("done")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
