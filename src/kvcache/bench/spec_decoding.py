"""Speculative decoding on the real model: where prompt lookup pays and where it does not.

Tasks, all greedy, chat-templated for SmolLM2-135M-Instruct (``--quick``: the shipped code model, plain
text, a smoke run only):

* ``edit``: "here is a function from the standard library; return it with one change" -- the answer
  mostly copies the input, the case prompt lookup is made for;
* ``explain``: "explain what this function does" -- grounded on code, but the answer is prose;
* ``chat``: free questions with nothing to copy.

Single stream: plain ``generate`` and ``generate(..., speculative=...)`` alternate on each prompt, and their
tokens are checked equal.  Engine: the edit prompts at 1 / 4 / 16 concurrent requests, with and without
per-request speculation.  Draft model: SmolLM2's own first layers as the draft (early exit, no training).
"""

from __future__ import annotations

import inspect
import json
import textwrap

from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from ..generation.generate import generate
from ..generation.speculative import DraftModel, PromptLookup, first_layers
from .common import table, timed

LOOKUP = "prompt-lookup:ngram=3,min_ngram=2,k=8"


def _functions(count: int) -> list[str]:
    """Mid-sized functions of the standard library (real code every machine has)."""
    import argparse
    import calendar
    import difflib
    import shlex
    import textwrap as tw

    picks = [tw.dedent, tw.indent, shlex.join, calendar.monthrange, difflib.get_close_matches, json.dump,
             argparse.ArgumentParser.add_argument_group, calendar.isleap, shlex.quote, tw.shorten,
             difflib.unified_diff, json.loads, calendar.weekday, tw.fill, shlex.split, difflib.IS_LINE_JUNK]
    sources = [textwrap.dedent(inspect.getsource(f)) for f in picks]
    sources = [s for s in sources if len(s) < 1800]
    return (sources * (1 + count // max(1, len(sources))))[:count]


def prompts(tokenizer, task: str, count: int) -> list[list[int]]:
    if task == "chat":
        questions = ["Write a short story about a lighthouse keeper.", "What are three good habits for sleep?",
                     "Explain why the sky is blue.", "Give me ideas for a birthday party.",
                     "Describe the water cycle.", "What should I pack for a hiking trip?"]
        texts = (questions * (1 + count // len(questions)))[:count]
    else:
        ask = ("Return this function unchanged except that its docstring is removed. Reply with the code only."
               if task == "edit" else "Explain in a few sentences what this function does.")
        texts = [f"{ask}\n\n```python\n{source}```" for source in _functions(count)]
    if not tokenizer.chat_template:  # the shipped code model (quick runs): plain text, its 512 positions
        return [tokenizer.encode(t)[-400:] for t in texts]
    return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


def _model(quick: bool):
    from ..model import hub
    from ..model.loader import load_model
    if not quick and hub.available_offline(hub.REAL_MODEL):
        return load_model(hub.ensure(hub.REAL_MODEL)), hub.REAL_MODEL
    return load_model(None), "the shipped model"


def bench_single(model, name: str, new_tokens: int, count: int, tasks=("edit", "explain", "chat"),
                 spec: str = LOOKUP, label: str = "prompt lookup", proposer_factory=None) -> list[dict]:
    rows = []
    stop = list(model.tokenizer.eos_token_ids)
    for task in tasks:
        plain_s = spec_s = 0.0
        plain_n = spec_n = drafted = accepted = passes = 0
        for ids in prompts(model.tokenizer, task, count):
            t_plain, plain = timed(generate, model, ids, new_tokens, stop_token_ids=stop)
            proposer = proposer_factory() if proposer_factory else PromptLookup(**_options(spec))
            t_spec, fast = timed(generate, model, ids, new_tokens, stop_token_ids=stop, speculative=proposer)
            assert fast == plain, f"speculative output differs from plain greedy on a {task} prompt"
            plain_s, spec_s = plain_s + t_plain, spec_s + t_spec
            plain_n, spec_n = plain_n + len(plain), spec_n + len(fast)
            drafted, accepted = drafted + proposer.stats.drafted, accepted + proposer.stats.accepted
            passes += proposer.stats.passes
        rows.append({"model": name, "proposer": label, "task": task, "prompts": count,
                     "plain_tok_s": plain_n / plain_s, "spec_tok_s": spec_n / spec_s,
                     "speedup": (spec_n / spec_s) / (plain_n / plain_s),
                     "acceptance": accepted / drafted if drafted else 0.0,
                     "tokens_per_pass": (spec_n - count) / passes if passes else 1.0})
        print(format_single_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def _options(spec: str) -> dict:
    from ..generation.speculative import check_spec

    return check_spec(spec)[2]


def bench_engine(model, name: str, new_tokens: int, concurrency=(1, 4, 16), task: str = "edit",
                 spec: str = LOOKUP) -> list[dict]:
    rows = []
    for n in concurrency:
        batch = prompts(model.tokenizer, task, n)
        results = {}
        for mode in (None, spec, None, spec):  # alternating, twice; the faster run of each counts
            llm = LLM(model, kv_memory="2GiB", max_num_seqs=max(16, n))
            params = SamplingParams(max_new_tokens=new_tokens, speculative=mode)
            seconds, outs = timed(llm.generate, batch, params)
            tokens = sum(len(o.token_ids) for o in outs)
            best = results.get(mode)
            if best is None or tokens / seconds > best[0]:
                results[mode] = (tokens / seconds, [o.token_ids for o in outs], llm.stats())
        assert results[None][1] == results[spec][1], "the engine's speculative output differs from plain"
        stats = results[spec][2]
        rows.append({"model": name, "task": task, "concurrent": n, "plain_tok_s": results[None][0],
                     "spec_tok_s": results[spec][0], "speedup": results[spec][0] / results[None][0],
                     "acceptance": stats["spec_acceptance_rate"]})
        print(format_engine_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def no_match_cost(model, context: int = 4000, rounds: int = 200) -> dict:
    """What prompt lookup costs when it never finds a match: one proposal over ``context`` distinct tokens,
    against one plain decode step at 1,000 tokens of context (fewer on a short model)."""
    import random

    tokens = random.Random(0).sample(range(1, model.config.vocab_size), min(context, model.config.vocab_size - 1))
    lookup = PromptLookup()
    seconds, _ = timed(lambda: [lookup.propose(tokens, 8, None, None) for _ in range(rounds)])
    assert lookup.propose(tokens, 8, None, None)[0] == []
    prompt = tokens[:min(1000, model.config.max_positions - 40)]
    generate(model, prompt, 2, stop_token_ids=[])
    full, _ = timed(generate, model, prompt, 33, stop_token_ids=[])
    first, _ = timed(generate, model, prompt, 1, stop_token_ids=[])
    step = (full - first) / 32
    row = {"context": len(tokens), "propose_us": seconds / rounds * 1e6, "decode_step_ms": step * 1e3,
           "share": seconds / rounds / step}
    print(f"prompt lookup with no match over {row['context']:,} tokens: {row['propose_us']:.0f} us per proposal, "
          f"{100 * row['share']:.2f}% of a {row['decode_step_ms']:.1f} ms decode step", flush=True)
    return row


def run(quick: bool) -> dict:
    model, name = _model(quick)
    tokens, count = (16, 1) if quick else (160, 4)
    single = bench_single(model, name, tokens, count)
    print("\n" + format_single_table(single) + "\n", flush=True)
    engine = bench_engine(model, name, tokens, concurrency=(1, 2) if quick else (1, 4, 16))
    print("\n" + format_engine_table(engine) + "\n", flush=True)
    layers = max(1, model.config.num_layers // 4)
    draft = first_layers(model, layers)
    drafted = bench_single(model, name, tokens, count, tasks=("edit", "chat"), label=f"draft: first {layers} layers",
                           proposer_factory=lambda: DraftModel(draft, k=4))
    print("\n" + format_single_table(drafted), flush=True)
    return {"single": single, "engine": engine, "draft": drafted, "no_match": no_match_cost(model)}


def format_single_table(rows: list[dict]) -> str:
    return table(["model", "proposer", "task", "plain tok/s", "speculative tok/s", "speedup", "acceptance",
                  "tokens per pass"],
                 [[r["model"], r["proposer"], r["task"], f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}",
                   f"{r['speedup']:.2f}x", f"{100 * r['acceptance']:.0f}%", f"{r['tokens_per_pass']:.2f}"]
                  for r in rows])


def format_engine_table(rows: list[dict]) -> str:
    return table(["model", "task", "concurrent requests", "plain tok/s", "speculative tok/s", "speedup",
                  "acceptance"],
                 [[r["model"], r["task"], r["concurrent"], f"{r['plain_tok_s']:.1f}", f"{r['spec_tok_s']:.1f}",
                   f"{r['speedup']:.2f}x", f"{100 * r['acceptance']:.0f}%"] for r in rows])
