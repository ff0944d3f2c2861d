"""Train kvcache's shipped default model: a small Llama (GQA) on Python's stdlib.

Corpus: the running interpreter's standard library sources (*.py, without
site-packages and without the test suites), present on every machine and
PSF-licensed.  Files are read in sorted order; ~5% are held out for
validation by a stable hash of their relative path and never trained on.

Steps (each resumable; a rerun continues from the last checkpoint):
  1. byte-level BPE tokenizer trained on the training split (``tokenizers``);
  2. the corpus encoded to uint16 token streams;
  3. AdamW + warmup/cosine training of a kvcache ``Transformer`` (Llama arch),
     checkpointed every --ckpt-every steps, progress printed;
  4. export as a standard Hugging Face folder (config.json, model.safetensors,
     tokenizer.json, generation_config.json) ready for ``kvcache.load_model``
     and for ``transformers.LlamaForCausalLM.from_pretrained``.

    python tools/train_default_model.py --out runs/default_model --steps 3000
    python tools/train_default_model.py --out runs/default_model --export src/kvcache/data/default_model
    python tools/evaluate_default_model.py --record --log runs/default_model/log.jsonl \
        --plot docs/default-model-training.png

The evaluation step adds the measured validation numbers to the exported
folder's training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from kvcache.model.config import ModelConfig  # noqa: E402
from kvcache.model.export import save_hf_checkpoint  # noqa: E402
from kvcache.model.stdlib_corpus import corpus_files, read_text  # noqa: E402
from kvcache.model.transformer import Transformer  # noqa: E402

EOS = "<|endoftext|>"
def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    tok.save(str(out))
    return tok


def encode_files(tok, files: list[Path]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([read_text(p) for p in files], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def model_config(args, vocab_size: int, eos_id: int) -> ModelConfig:
    return ModelConfig(arch="llama", model_type="llama", vocab_size=vocab_size, hidden_size=args.hidden,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
                       max_positions=args.context, norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id)


def init_weights(model: Transformer, num_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("out.weight", "down.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)


def batches(data: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - context - 1, size=batch)
        x = np.stack([data[s:s + context + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


@torch.no_grad()
def evaluate(model: Transformer, data: np.ndarray, context: int, max_tokens: int) -> float:
    """Mean next-token loss over consecutive windows of the validation stream."""
    model.eval()
    total, count = 0.0, 0
    n = min(len(data) - 1, max_tokens)
    for s in range(0, n - context, context):
        x = torch.from_numpy(data[s:s + context].astype(np.int64))[None]
        y = torch.from_numpy(data[s + 1:s + context + 1].astype(np.int64))[None]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/default_model")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (AVX-512 BF16)")
    ap.add_argument("--export", default=None, help="write the HF folder here from the latest checkpoint and stop")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps (sizing runs)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_files, val_files, root = corpus_files()
    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        t0 = time.time()
        train_tokenizer(train_files, args.vocab, tok_path)
        print(f"tokenizer: {args.vocab} tokens trained on {len(train_files)} files in {time.time() - t0:.0f}s",
              flush=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos_id = tok.token_to_id(EOS)
    if not (out / "train.npy").exists():
        np.save(out / "train.npy", encode_files(tok, train_files))
        np.save(out / "val.npy", encode_files(tok, val_files))
    train, val = np.load(out / "train.npy"), np.load(out / "val.npy")
    train_bytes = sum(len(read_text(p).encode()) for p in train_files)
    val_bytes = sum(len(read_text(p).encode()) for p in val_files)
    print(f"corpus {root}: train {len(train_files)} files {train_bytes/1e6:.1f} MB {len(train)} tokens; "
          f"val {len(val_files)} files {val_bytes/1e6:.2f} MB {len(val)} tokens", flush=True)

    config = model_config(args, tok.get_vocab_size(), eos_id)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    init_weights(model, config.num_layers)
    ckpt_path = out / "ckpt.pt"
    log_path = out / "log.jsonl"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), fused=True)
    step = 0
    rng = np.random.default_rng(args.seed)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, rng.bit_generator.state = ck["step"], ck["rng"]
        print(f"resumed at step {step}", flush=True)

    if args.export:
        run_args = ck.get("args", vars(args)) if ckpt_path.exists() else vars(args)
        meta = {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "train_bytes": train_bytes,
                "val_bytes": val_bytes, "steps": step,
                "tokens_seen": step * run_args["batch"] * run_args["context"], "args": run_args}
        save_hf_checkpoint(model, args.export, tokenizer_file=tok_path, extra_files={"training.json": meta})
        print(f"exported step {step} to {args.export}")
        return

    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {nparams/1e6:.2f} M parameters, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} KV heads, context {config.max_positions}", flush=True)
    model.train()
    data = batches(train, args.batch, args.context, rng)
    t_last, tokens_since = time.time(), 0
    end = step + args.time_steps if args.time_steps else args.steps
    while step < end:
        x, y = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_since += x.numel()
        record = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step - 1, args)}
        if step % 10 == 0:
            now = time.time()
            record["tok_s"] = round(tokens_since / (now - t_last), 1)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} lr {record['lr']:.2e} "
                  f"{record['tok_s']:.0f} tok/s", flush=True)
            t_last, tokens_since = now, 0
        if step % args.eval_every == 0 or step == args.steps:
            record["val_loss"] = round(evaluate(model, val, args.context, args.eval_tokens), 4)
            print(f"step {step} val loss {record['val_loss']:.3f}", flush=True)
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if step % args.ckpt_every == 0 or step == end:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "rng": rng.bit_generator.state, "config": config.__dict__,
                        "args": vars(args)}, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)


if __name__ == "__main__":
    main()
