"""Measure the shipped model and print docs/default-model.md's numbers.

    python tools/evaluate_default_model.py --record --log runs/default_model/log.jsonl \
        --plot docs/default-model-training.png

Validation loss per token over the whole held-out split (consecutive windows of
the model's context), perplexity, bits per byte, the unigram-entropy
baseline, decode speed, and sample completions at temperature 0 and 0.8.
``--record`` writes the validation numbers into the model folder's training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import kvcache  # noqa: E402
from kvcache.model.loader import DEFAULT_MODEL_DIR  # noqa: E402
from kvcache.model.stdlib_corpus import corpus_files, read_text, unigram_entropy  # noqa: E402

EOS = "<|endoftext|>"


def validation_ids(model) -> tuple[list[int], int]:
    _, val, _ = corpus_files()
    eos = model.tokenizer.backend.token_to_id(EOS)
    ids: list[int] = []
    nbytes = 0
    for p in val:
        text = read_text(p)
        nbytes += len(text.encode())
        ids += model.tokenizer.encode(text) + [eos]
    return ids, nbytes


@torch.inference_mode()
def mean_loss(model, ids: list[int], max_tokens: int | None = None) -> tuple[float, int]:
    """(mean next-token loss in nats, tokens scored) over consecutive context-sized windows."""
    ctx = model.config.max_positions
    ids = ids[: max_tokens + 1] if max_tokens else ids
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        window = ids[s: s + ctx + 1]
        if len(window) < 2:
            break
        x, y = torch.tensor([window[:-1]]), torch.tensor(window[1:])
        total += F.cross_entropy(model(x)[0], y, reduction="sum").item()
        count += len(y)
    return total / count, count


def plot_curve(log: Path, out: Path, tokens_per_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = {**records.get(r["step"], {}), **r}  # a resumed run rewrites steps: keep the last
    steps = sorted(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [records[s]["loss"] for s in steps], lw=0.8, alpha=0.6, label="train loss (batch)")
    val = [(s, records[s]["val_loss"]) for s in steps if "val_loss" in records[s]]
    ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss")
    ax.set(xlabel=f"step ({tokens_per_step:,} tokens each)", ylabel="loss (nats/token)",
           title="kvcache default model training")
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--log", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--record", action="store_true", help="write the validation numbers into training.json")
    args = ap.parse_args()
    model = kvcache.load_model(args.model)
    folder = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    meta_path = folder / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    ids, nbytes = validation_ids(model)
    loss, count = mean_loss(model, ids)
    unigram = unigram_entropy(ids)
    print(f"validation: {count:,} tokens, {nbytes:,} bytes ({nbytes / count:.2f} bytes/token)")
    print(f"loss {loss:.3f} nats/token, perplexity {math.exp(loss):.2f}, "
          f"bits per byte {loss * count / math.log(2) / nbytes:.3f}")
    print(f"unigram baseline: entropy {unigram:.3f} nats/token, perplexity {math.exp(unigram):.1f}, "
          f"bits per byte {unigram * count / math.log(2) / nbytes:.3f}")
    if args.record:
        meta["validation"] = {
            "tokens": count, "bytes": nbytes, "loss_nats_per_token": round(loss, 4),
            "perplexity": round(math.exp(loss), 2), "bits_per_byte": round(loss * count / math.log(2) / nbytes, 4),
            "unigram_entropy_nats_per_token": round(unigram, 4), "unigram_perplexity": round(math.exp(unigram), 1)}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"recorded in {meta_path}")
    prompt = model.tokenizer.encode("def fibonacci(n):")
    kvcache.generate(model, prompt, 8)
    start = time.perf_counter()
    n = len(kvcache.generate(model, prompt, 256, stop_token_ids=[]))
    print(f"decode speed: {n / (time.perf_counter() - start):.0f} tok/s (batch 1, fp32, KV cache)")
    for text in ("def fibonacci(n):", "import os\n\ndef main():\n", "class Stack:\n    def __init__(self):"):
        ids_ = model.tokenizer.encode(text)
        for temp in (0.0, 0.8):
            out = kvcache.generate(model, ids_, 96, temperature=temp, seed=0)
            print(f"\n--- prompt {text!r}, temperature {temp} ---\n{text}{model.tokenizer.decode(out)}")
    if args.log and args.plot:
        run = meta.get("args", {})
        plot_curve(Path(args.log), Path(args.plot), run.get("batch", 8) * run.get("context", 512))
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
