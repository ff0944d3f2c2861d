"""Every benchmark scenario runs at toy sizes and reports what it claims (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from kvcache.bench import append, attention_kernels, decode, hf_compare, serving
from kvcache.cli import main


def test_decode_per_weight_format_reports_bytes_and_bandwidth():
    rows = decode.bench_formats("tiny-llama", context=16, steps=2)
    assert [r["format"] for r in rows] == ["float32", "bfloat16", "F16", "Q8_0", "Q4_1", "Q4_0"]
    fp32, bf16, f16, q8, q41, q40 = (r["mb_read"] for r in rows)
    assert 1.9 < fp32 / bf16 < 2.1  # half the bytes per weight and per cached value
    assert fp32 > f16 > q8 > q41 > q40  # the GGUF formats read their own sizes (their KV stays float32)
    for r in rows:
        assert r["tok_s"] > 0 and r["gb_s"] == pytest.approx(r["mb_read"] / 1e3 * r["tok_s"])
        assert 0 < r["of_bandwidth"] and r["read_bandwidth_gb_s"] > 0
    text = decode.format_formats_table(rows)
    assert "of read bandwidth" in text and "| bfloat16 |" in text


def test_decode_compares_cached_and_uncached_outputs():
    rows = decode.bench_decode("tiny-llama", lengths=(4, 8), prompt_len=8)
    assert [r["new_tokens"] for r in rows] == [4, 8]
    assert all(r["identical"] and r["cached_s"] > 0 and r["uncached_s"] > 0 for r in rows)
    assert "| tiny-llama | 8 |" in decode.format_decode_table(rows)


def test_hf_comparison_produces_the_same_tokens_as_transformers():
    (row,) = hf_compare.bench_hf(shapes=("tiny-llama",), prompt_len=8, new_tokens=6, rounds=1)
    assert row["identical"]
    assert row["ratio"] == row["kvcache_tok_s"] / row["transformers_tok_s"]
    assert 0 < row["ceiling_tok_s"] and row["bytes_per_token"] > 4 * 5_000_000  # the weights alone are ~21 MB


def test_append_reports_a_lower_bound_when_restacking_is_stopped():
    (stopped,) = append.bench_append(sizes=(3000,), restacking_budget_s=1e-9)
    assert stopped["restacking_s"] is None and stopped["ratio"] is None and stopped["ratio_lower_bound"] > 0
    assert "stopped after" in stopped["restacking_note"] and "of 3,000 appends" in stopped["restacking_note"]
    assert "| > " in append.format_append_table([stopped])
    (full,) = append.bench_append(sizes=(500,))
    assert full["ratio"] == full["restacking_s"] / full["kvcache_s"] and full["ratio_lower_bound"] is None


def test_kernels_and_growth_policies_run():
    rows = attention_kernels.bench_decode_attention((64,), heads=4, kv_heads=2, dim=8)
    assert {r["kernel"] for r in rows} >= {"grouped matmul (kvcache)", "SDPA enable_gqa"}
    growth = attention_kernels.bench_cache_growth((16,))
    assert len({r["policy"] for r in growth}) == 3


def test_throughput_counts_every_output_token():
    rows = serving.bench_throughput("tiny-llama", concurrency=(1, 3), prompt_len=8, new_tokens=4, sequential_requests=1,
                                   kv_memory="32MiB")
    assert [r["concurrent"] for r in rows] == [1, 3]
    assert all(r["tok_s"] > 0 and r["speedup"] == r["tok_s"] / r["sequential_tok_s"] for r in rows)


def test_prefix_caching_computes_fewer_prefill_tokens_with_identical_outputs():
    on, off = serving.bench_prefix("tiny-llama", requests=3, prefix_len=64, suffix_len=4, new_tokens=3,
                                   kv_memory="32MiB")
    assert on["identical_outputs"] and off["identical_outputs"]
    assert on["prefill_tokens"] < off["prefill_tokens"] and on["cached_prompt_tokens"] >= 2 * 64
    assert off["cached_prompt_tokens"] == 0


def test_paged_memory_holds_more_live_tokens_than_reserving_max_length():
    r = serving.bench_memory_efficiency(requests=4, kv_memory="64MiB")
    assert 0 < r["reserved_utilization"] < r["paged_utilization"] <= 1


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "append", "--quick", "--json", str(out)]) == 0
    assert "re-stacking" in capsys.readouterr().out
    assert json.loads(out.read_text())["append"][0]["n"] == 1000


def test_all_runs_each_scenario_in_its_own_process(capfd):
    from kvcache.bench import scenarios

    rows = scenarios._run_isolated("append", quick=True, plot=None)
    assert rows[0]["n"] == 1000 and rows[0]["kvcache_s"] > 0
    assert "## append" in capfd.readouterr().out  # printed by the child on the inherited stdout


def test_quantized_bench_races_every_cache_on_the_same_model():
    from kvcache.bench import kv_quant

    rows = kv_quant.bench_quantized(lengths=(40,), steps=1, rounds=1, quick=True)
    caches = [r["cache"] for r in rows]
    assert caches[:3] == ["kvcache auto", "kvcache int8", "kvcache int4"] and "hf DynamicCache" in caches
    assert all(r["tok_s"] > 0 and r["kv_mb"] > 0 for r in rows)
    assert rows[0]["vs_kvcache_fp32"] == 1.0 and rows[1]["attention_gb_s"] > 0
    weights = rows[0]["mb_read_per_step"] - rows[0]["kv_mb"]
    assert weights > 1  # tiny-llama's matrices
    for r in rows:
        assert r["mb_read_per_step"] == pytest.approx(weights + r["kv_mb"])  # every weight once, plus its KV
        assert r["gb_s"] == pytest.approx(r["mb_read_per_step"] / 1e3 * r["tok_s"])
        assert r["of_bandwidth"] == pytest.approx(r["gb_s"] / r["read_bandwidth_gb_s"])
    assert "of read bandwidth" in kv_quant.format_quantized_table(rows)


def test_quantized_prefill_bench_times_every_cache_against_fp32():
    from kvcache.bench import kv_quant

    rows = kv_quant.bench_prefill(lengths=(48,), rounds=1, quick=True)
    assert [r["cache"] for r in rows] == ["auto", "int8", "int4"] and rows[0]["vs_fp32"] == 1.0
    assert all(r["prefill_s"] > 0 and r["tok_s"] == pytest.approx(48 / r["prefill_s"]) for r in rows)
    assert "time vs fp32 cache" in kv_quant.format_prefill_table(rows)


def test_engine_quant_bench_reports_bytes_read_and_bandwidth():
    from kvcache.bench import engine_quantized
    from kvcache.bench.common import weight_bytes
    from kvcache.model.shapes import random_model

    model = random_model("tiny-llama")
    rows = engine_quantized.bench_throughput(model, "tiny", sequences=2, context=64, steps=2, rounds=1)
    assert [r["cache"] for r in rows] == ["auto", "int8", "int4"]
    weights = weight_bytes(model) / 1e6
    kv = [r["mb_read_per_step"] - weights for r in rows]
    assert kv[0] > kv[1] > kv[2] > 0  # fp32 > int8 > int4 KV read per step, at the same context
    for r in rows:
        assert r["gb_s"] == pytest.approx(r["mb_read_per_step"] / 1e3 * r["decode_tok_s"] / 2)
        assert r["of_bandwidth"] > 0 and r["read_bandwidth_gb_s"] > 0
    assert "of read bandwidth" in engine_quantized.format_throughput_table(rows)


def test_compression_bench_hides_one_line_and_scores_every_policy():
    from kvcache.bench import compression
    from kvcache.model.loader import load_model

    model = load_model()
    (sample,) = compression.retrieval_samples(model.tokenizer, 1, 300)
    assert len(sample.prompt) <= 300 and 0.05 <= sample.depth <= 0.25
    answer = model.tokenizer.decode(sample.answer)
    assert len(answer) == 9 and answer.endswith('"')
    rows = compression.bench_compression(model, "shipped", 1, 200, window=8)
    assert [(r["policy"], r["budget_percent"]) for r in rows] == [("full cache", 100)] + [
        (p, b) for p in ("snapkv", "h2o") for b in (25, 50, 100)]
    full, snap100 = rows[0], rows[3]
    assert snap100["answer_ppl"] == pytest.approx(full["answer_ppl"], rel=1e-4)  # a budget that holds it all
    assert rows[1]["kv_bytes"] < rows[2]["kv_bytes"] < full["kv_bytes"]


def test_engine_window_bench_bounds_peak_memory():
    from kvcache.bench import streaming
    from kvcache.model.loader import load_model

    bounded, full = streaming.engine_memory(load_model(), "shipped", 200, 60, 64, 4)
    assert bounded["same_as_generate"] and full["same_as_generate"]
    assert bounded["released_blocks"] > 0 and bounded["peak_kv_bytes"] < full["peak_kv_bytes"]


def test_tiers_bench_times_every_source_and_checks_the_tiers_supplied_the_prefix():
    from kvcache.bench import tiers
    from kvcache.model.loader import load_model

    rows = tiers.bench_tiers(load_model(None), "tiny", (128,), chunk=64, rounds=1)
    (row,) = rows
    assert set(row["ttft_s"]) == {"recompute", "recompute + tier writes", "pool hit", "disk hit", "redis hit"}
    assert row["ttft_s"]["disk hit"] > 0 and row["tier_bytes_per_token"] > 0
    assert "| tiny | 128 |" in tiers.format_tiers_table(rows)


def test_replicas_bench_builds_its_workload_and_tables():
    from kvcache.bench import replicas
    from kvcache.model.loader import load_model

    tok = load_model(None).tokenizer
    systems = replicas.system_prompts(tok, 3, 100, 200)
    lengths = [len(tok.encode(s)) for s in systems]
    assert len(set(systems)) == 3 and all(100 <= n <= 260 for n in lengths) and lengths == sorted(lengths)
    jobs = replicas.workload(systems, 4, 8)
    assert len(jobs) == 12 and jobs == replicas.workload(systems, 4, 8)  # shuffled, the same every run
    assert {j.messages[0]["content"] for j in jobs} == set(systems)
    row = {"ttft_mean": 1.0, "ttft_p50": 0.5, "ttft_p99": 2.0, "tok_s": 10.0, "hit_rate": 0.9, "max_share": 0.5,
           "e2e_p50": 1.0, "e2e_p99": 3.0, "same_text": True}
    text = replicas.format_tables([{"part": "routing", "router": "prefix", **row},
                                   {"part": "routing", "router": "round-robin", **row, "ttft_mean": 3.0},
                                   {"part": "scaling", "replicas": 1, **row}])
    assert "| round-robin | 3.000 |" in text and "3.00x" in text and "| 1 | 10.0 |" in text
