#!/usr/bin/env python3
"""Does vocabulary expansion hurt a model that knows English? One row per ``--embedding-init``.

1. Train a small Llama (transformers) on the English sample corpus with the base tokenizer, so
   that it has actually learned English (a random model would show nothing).
2. For each init method: ``megatron-ext convert hf-to-megatron --tokenizer-model EXPANDED``, then
   ``megatron-to-hf`` (the real pipeline), and measure at step 0:
   English validation loss per token (the goal: at most 1% above the base model's with
   ``avg_subwords``/``mean``) and Arabic bits per character with the expanded tokenizer.
3. Continue training each (and the unexpanded base, as the reference) for ``--finetune-steps`` on
   a 1:3 English:Arabic mix, the same batches for all, and measure again: the papers' claim is
   about where the rows lead, not where they start.

Runs on a GPU in a few minutes (``--device cuda``); on CPU use small settings, e.g.
``--steps 300 --finetune-steps 100 --batch 8 --seq-len 128 --hidden 128 --layers 2``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """``text`` fields of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return texts[:limit]


def token_stream(texts: list[str], sp, eos: int) -> torch.Tensor:
    """All documents' ids, each followed by ``eos``."""
    return torch.tensor([i for ids in sp.encode(texts) for i in ids + [eos]])


def train_steps(
    model, streams: list[torch.Tensor], shares: list[float], args, steps: int, lr: float, label: str
) -> None:
    """``steps`` AdamW steps on windows drawn from ``streams`` in ``shares``.

    Seeded, so every model trained on the same streams sees the same batches.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(steps):
        which = torch.multinomial(torch.tensor(shares), args.batch, True, generator=generator)
        windows = []
        for i in which.tolist():
            start = torch.randint(0, len(streams[i]) - args.seq_len - 1, (), generator=generator)
            windows.append(streams[i][start : start + args.seq_len])
        batch = torch.stack(windows).to(args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            seconds = time.perf_counter() - started
            print(f"{label} step {step}: loss {loss.item():.3f} ({seconds:.0f} s)")


def train_english(args, base_sp, out: Path) -> Path:
    """A small Llama trained on English; saved with its tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, vocab_size=len(base_sp),
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(args.device)
    english = read_texts(args.corpora / "en" / "train.jsonl")
    stream = token_stream(english, base_sp, base_sp.eos_id())
    train_steps(model, [stream], [1.0], args, args.steps, args.lr, "train English")
    directory = out / "english_model"
    model.to(torch.float32).save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(Path(args.base_tokenizer).read_bytes())
    return directory


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor, seq_len: int, device: str) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of predicted tokens, in windows."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len + 1].to(device)
        if len(window) < 2:
            break
        logits = model(window[None, :-1]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return total, count


def main() -> None:
    """Run the experiment and write ``embedding_init.json`` and ``.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-tokenizer", required=True, help="Llama-2's (or Mistral's) model")
    parser.add_argument(
        "--expanded-tokenizer", required=True, help="expand-tokenizer's output for the base"
    )
    parser.add_argument("--corpora", required=True, type=Path, help="shared/corpora")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1500, help="English pretraining steps")
    parser.add_argument(
        "--finetune-steps", type=int, default=500, help="steps on the mix after conversion"
    )
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="model width (heads of 64)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="English pretraining peak lr")
    parser.add_argument("--eval-docs", type=int, default=69, help="en/valid documents measured")
    args = parser.parse_args()
    import transformers

    from megatron_ext import distributed
    from megatron_ext.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_ext.embeddings.init import INIT_METHODS

    args.output_dir.mkdir(parents=True, exist_ok=True)
    base_sp = spm.SentencePieceProcessor(model_file=args.base_tokenizer)
    new_sp = spm.SentencePieceProcessor(model_file=args.expanded_tokenizer)
    english_dir = train_english(args, base_sp, args.output_dir)

    english = read_texts(args.corpora / "en" / "valid.jsonl", args.eval_docs)
    arabic = read_texts(args.corpora / "ar" / "valid.jsonl", 200)
    en_ids = token_stream(english, base_sp, base_sp.eos_id())
    assert torch.equal(en_ids, token_stream(english, new_sp, new_sp.eos_id())), (
        "the expanded tokenizer must tokenize English exactly as the base"
    )
    ar_base = token_stream(arabic, base_sp, base_sp.eos_id())
    ar_new = token_stream(arabic, new_sp, new_sp.eos_id())
    ar_chars = sum(len(t) + 1 for t in arabic)

    def evaluate(directory: Path, ar_ids: torch.Tensor) -> dict:
        model = transformers.LlamaForCausalLM.from_pretrained(directory).to(args.device).eval()
        en_total, en_count = mean_nll(model, en_ids, args.seq_len, args.device)
        ar_total, _ = mean_nll(model, ar_ids, args.seq_len, args.device)
        bpc = ar_total / math.log(2) / ar_chars
        return {"english_loss": en_total / en_count, "arabic_bpc": bpc}

    def finetune(directory: Path, sp) -> dict:
        """Train on the 1:3 mix (``sp``'s ids) and measure again."""
        model = transformers.LlamaForCausalLM.from_pretrained(directory).to(args.device)
        streams = [token_stream(read_texts(args.corpora / lang / "train.jsonl"), sp, sp.eos_id())
                   for lang in ("en", "ar")]  # fmt: skip
        train_steps(model, streams, [0.25, 0.75], args, args.finetune_steps, args.finetune_lr,
                    f"fine-tune {directory.name}")  # fmt: skip
        tuned = directory.with_name(directory.name + "_tuned")
        model.to(torch.float32).save_pretrained(tuned)
        return evaluate(tuned, ar_base if sp is base_sp else ar_new)

    distributed.init(rank=0, world_size=1)
    rows = {"base (no expansion)": evaluate(english_dir, ar_base)}
    directories = {"base (no expansion)": english_dir}
    for method in INIT_METHODS:
        ckpt, hf_dir = args.output_dir / f"mcore_{method}", args.output_dir / f"hf_{method}"
        hf_to_megatron(english_dir, ckpt, tokenizer_model=args.expanded_tokenizer,
                       embedding_init=method, dtype="fp32", force=True)  # fmt: skip
        megatron_to_hf(ckpt, hf_dir, force=True)
        rows[method] = evaluate(hf_dir, ar_new)
        directories[method] = hf_dir
    if args.finetune_steps:
        for name, directory in directories.items():
            tuned = finetune(directory, base_sp if directory == english_dir else new_sp)
            rows[name].update({f"{k}_tuned": v for k, v in tuned.items()})
    base_loss = rows["base (no expansion)"]["english_loss"]
    after = f"after {args.finetune_steps} steps"
    lines = [
        f"Base vocabulary {len(base_sp):,}, expanded {len(new_sp):,}; English loss on "
        f"{len(en_ids):,} tokens of en/valid, Arabic bits per character on {ar_chars:,} "
        f"characters of ar/valid; at step 0 after conversion, and {after} on a 1:3 "
        "English:Arabic mix.",
        "",
        f"| init | English loss | vs base | Arabic bits/char | English loss {after} | "
        f"Arabic bits/char {after} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        row["english_vs_base"] = row["english_loss"] / base_loss - 1
        tuned = (f"{row['english_loss_tuned']:.4f} | {row['arabic_bpc_tuned']:.3f}"
                 if "english_loss_tuned" in row else "- | -")  # fmt: skip
        lines.append(
            f"| {name} | {row['english_loss']:.4f} | {row['english_vs_base']:+.2%} | "
            f"{row['arabic_bpc']:.3f} | {tuned} |"
        )
    (args.output_dir / "embedding_init.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output_dir / "embedding_init.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
