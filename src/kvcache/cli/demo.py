"""``kvcache demo``: the claims of the KV-cache literature, measured live.

Generates the same tokens with and without the cache, checks they are
identical, and prints time per token, the speedup and the cache's memory.
``pick_model`` and ``plan`` do everything that can fail on user input
(loading the model, the arguments, fitting the prompt) before ``show`` prints
a line, so ``run`` can report a bad request as one error line.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from ..caches.registry import make_cache
from ..checks import check_int
from ..generation.detokenizer import Detokenizer
from ..generation.generate import stream
from ..model import hub
from ..model.loader import DEFAULT_MODEL_DIR, load_model
from ..model.shapes import random_model
from .options import KV_HELP, MODEL_HELP, RANDOM_SHAPES, UsageError, check_spec, load_for_user

HELP = "generate with and without the cache; compare outputs, speed, memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--random", choices=RANDOM_SHAPES, default=None,
                        help="use a random-weight model of this shape instead")
    parser.add_argument("--prompt", default=None,
                        help="default: a question for a chat model, 'def fibonacci(n):' for the code model")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:  # checked before the load, named as the option
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_spec(args)
    start = time.perf_counter()
    model, note = load_for_user(pick_model, args.model, args.random)
    try:
        request = plan(model, note, time.perf_counter() - start, args.prompt, args.max_new_tokens, args.kv_cache)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    return show(request)


def describe(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if c.mla is not None:
        return (f"{c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads over one "
                f"latent of {c.mla.latent_dim} (MLA), {params:.1f} M parameters")
    attn = "MHA" if c.num_kv_heads == c.num_heads else ("MQA" if c.num_kv_heads == 1 else "GQA")
    return (f"{c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / "
            f"{c.num_kv_heads} KV heads ({attn}), {params:.1f} M parameters")


REAL_MODEL = hub.REAL_MODEL
DEFAULT_CHAT_PROMPT = "Explain in a few sentences why a KV cache makes text generation faster."


def pick_model(path: str | None, random_shape: str | None):
    """The model to demo and a line saying what it is (and, with no --model, how to get the other one)."""
    if random_shape:
        return random_model(random_shape), (f"RANDOM WEIGHTS ({random_shape} shape, seed 0): output is noise, "
                                            "timings are real")
    if path is None and hub.is_pulled(REAL_MODEL):
        return load_model(REAL_MODEL), (f"{REAL_MODEL} (real pretrained model, pulled); the shipped code model: "
                                        f"--model {DEFAULT_MODEL_DIR}")
    if path is None and not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        return random_model("gpt2-small"), ("RANDOM WEIGHTS (GPT-2-small shape, seed 0): no trained model is shipped "
                                            "in this install")
    model = load_model(path)
    note = path if path is not None else (f"the shipped code model (trained on the Python standard library); "
                                          f"for a real model: kvcache pull {REAL_MODEL}")
    return model, note


def run_generation(model, ids, n, use_cache, echo, stop_at_eos=False, kv_cache=None):
    """(tokens, seconds, the cache used or None)."""
    out, decoder = [], Detokenizer(model.tokenizer)
    cache = make_cache(kv_cache, model, capacity=len(ids) + n) if use_cache else None
    bar = None
    if not echo:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="  uncached", unit="tok", leave=False, file=sys.stderr)
    start = time.perf_counter()
    stops = None if stop_at_eos else []
    for token in stream(model, ids, n, use_cache=use_cache, stop_token_ids=stops, cache=cache):
        out.append(token)
        if not echo:
            bar.update(1)
        elif token not in model.tokenizer.eos_token_ids:  # a chat reply's end-of-turn token is not text
            print(decoder.push(token), end="", flush=True)
    elapsed = time.perf_counter() - start
    if echo:
        print(decoder.flush())
    else:
        bar.close()
    return out, elapsed, cache


@dataclass
class Demo:
    """A validated demo request: the model, what to call it, and the prompt and length to generate."""

    model: object
    note: str
    load_seconds: float
    prompt: str
    ids: list[int]
    n: int
    chat: bool = False  # the prompt went through the chat template; the reply stops at end of turn
    kv_cache: str | None = None  # a cache spec (caches/base.py); None: full precision


def plan(model, note: str, load_seconds: float, prompt: str | None = None,
         max_new_tokens: int = 128, kv_cache: str | None = None) -> Demo:
    """Check the request against the loaded model; ValueError/TypeError on bad input, before any output."""
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)  # timing 0 tokens divides by 0
    if kv_cache is not None:
        make_cache(kv_cache, model, capacity=1)  # a bad spec or one that cannot serve this model fails here
    if prompt is None:  # a chat model gets a question, the code model a function header
        prompt = DEFAULT_CHAT_PROMPT if model.tokenizer.chat_template else "def fibonacci(n):"
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be text, got {type(prompt).__name__}")
    chat = bool(model.tokenizer.chat_template)
    ids = (model.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat
           else model.tokenizer.encode(prompt)) or [0]
    room = model.config.max_positions - len(ids)
    if room < 1:
        raise ValueError(f"the prompt is {len(ids)} tokens: the model's {model.config.max_positions} positions "
                         "leave no room to generate")
    return Demo(model, note, load_seconds, prompt, ids, min(max_new_tokens, room), chat, kv_cache)


def main(path: str | None = None, prompt: str | None = None, max_new_tokens: int = 128,
         random_shape: str | None = None, kv_cache: str | None = None) -> int:
    check_int(max_new_tokens, "max_new_tokens", minimum=1)  # before the load
    t0 = time.perf_counter()
    model, note = pick_model(path, random_shape)
    return show(plan(model, note, time.perf_counter() - t0, prompt, max_new_tokens, kv_cache))


def show(demo: Demo) -> int:
    """Print the comparison; exit status 0 if cached and uncached outputs are identical."""
    model, prompt, ids, n = demo.model, demo.prompt, demo.ids, demo.n
    print("kvcache demo: KV caching, measured live\n")
    print(f"model : {demo.note}")
    print(f"        {describe(model)}; ready in {demo.load_seconds:.1f} s")
    how = "as a chat message, up to" if demo.chat else ""
    print(f"prompt: {prompt!r} ({len(ids)} tokens{', chat template' if demo.chat else ''}); {how} {n} new tokens, "
          "greedy\n".replace("  ", " "))
    print(f"[with KV cache{', ' + demo.kv_cache if demo.kv_cache else ''}] prefill once, then one token per step:")
    print(prompt + ("\n" if demo.chat else ""), end="")
    cached, t_cached, cache = run_generation(model, ids, n, True, echo=True, stop_at_eos=demo.chat,
                                             kv_cache=demo.kv_cache)
    print(f"  {len(cached)} tokens in {t_cached:.2f} s = {1e3 * t_cached / len(cached):.1f} ms/token "
          f"({len(cached) / t_cached:.1f} tok/s)\n")
    print("[without cache] every step recomputes the whole prefix:")
    plain, t_plain, _ = run_generation(model, ids, n, False, echo=False, stop_at_eos=demo.chat)
    print(f"  {len(plain)} tokens in {t_plain:.2f} s = {1e3 * t_plain / len(plain):.1f} ms/token "
          f"({len(plain) / t_plain:.1f} tok/s)\n")
    same = cached == plain
    agree = sum(a == b for a, b in zip(cached, plain))
    lossy = not cache.lossless
    verdict = "yes" if same else ("no, expected of a lossy cache" if lossy else "NO")
    print(f"identical outputs : {verdict} ({agree}/{len(cached)} tokens agree)")
    print(f"speedup           : {t_plain / t_cached:.1f}x with the cache")
    c = model.config
    elem = model.dtype.itemsize
    per_token = c.kv_values_per_token() * elem
    total_tokens = len(ids) + len(cached)
    formula = (f"{c.num_layers} layers x latent {c.mla.latent_dim} (MLA)" if c.mla is not None else
               f"2 (K,V) x {c.num_layers} layers x {c.num_kv_heads} KV heads x {c.head_dim} dims")
    print(f"KV cache memory   : {formula} x "
          f"{elem} B = {per_token:,} B per token; {total_tokens} tokens = {per_token * total_tokens / 1024:.1f} KiB")
    if lossy:
        print(f"  stored as {demo.kv_cache}: {cache.used_bytes / 1024:.1f} KiB held "
              f"({per_token * len(cache) / max(cache.used_bytes, 1):.2f}x smaller)")
    work_cached = len(ids) + len(cached) - 1
    work_plain = sum(len(ids) + i for i in range(len(plain)))
    print(f"token positions computed: {work_cached:,} with the cache vs {work_plain:,} without "
          f"(linear vs quadratic in length)")
    return 0 if same or lossy else 1
