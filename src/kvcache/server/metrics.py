"""Prometheus metrics with vLLM V1's names (``<prefix>:num_requests_running`` ...), via prometheus-client.

The prefix is ``kvcache`` by default; ``--metrics-prefix vllm`` makes a dashboard written for vLLM read this
server unchanged.  Counters and histograms are updated on the engine thread after each step; gauges are read
from the latest snapshot the engine thread published, so a scrape never touches the engine.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..engine.llm import LLM
from ..engine.sequence import RequestDelta

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0, 640.0)


class ServerMetrics:
    def __init__(self, llm: LLM, model_name: str, prefix: str = "kvcache"):
        self.llm, self.model_name = llm, model_name
        self.registry = CollectorRegistry()
        p, labels, r = prefix + ":", ["model_name"], self.registry
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter(p + "request_success", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.request_errors = Counter(p + "request_errors", "Requests that failed inside the engine.", labels,
                                      registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to the first token.", labels,
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between a request's successive tokens.",
                             labels, buckets=_LATENCY, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to finish.", labels, buckets=_LATENCY,
                             registry=r)
        Info(p + "kv_cache", "The KV pool's cache type.", registry=r).info(
            {"spec": llm.kv_cache_spec, "dtype": str(llm.model.dtype).replace("torch.", ""),
             "block_size": str(llm.block_size), "num_blocks": str(llm.num_blocks)})
        self.snapshot = llm_snapshot(llm)
        self._last_token: dict[int, float] = {}
        self.total_generated = 0  # the page's tokens/s
        r.register(_Gauges(self, prefix))

    def on_step(self, deltas: list[RequestDelta], seconds: float) -> None:
        """Engine thread, after a step: count tokens, observe latencies (``refresh`` publishes the gauges)."""
        now, m = time.perf_counter(), self.model_name
        for d in deltas:
            new = sum(len(c.token_ids) for c in d.outputs)
            if new:
                self.total_generated += new
                self.generation_tokens.labels(m).inc(new)
                last = self._last_token.get(d.request_id)
                if last is not None:
                    self.itl.labels(m).observe((now - last) / max(1, new // max(1, len(d.outputs))))
                self._last_token[d.request_id] = now
            if d.finished:
                self._last_token.pop(d.request_id, None)
                self._finished(d)

    def refresh(self) -> None:
        """Engine thread: publish a snapshot for the gauges, after a step's finished requests are collected and
        after commands that ran without a step (requests aborted on an idle engine)."""
        self.snapshot = llm_snapshot(self.llm)

    def _finished(self, d: RequestDelta) -> None:
        m, metrics = self.model_name, d.metrics
        if d.error is not None:
            self.request_errors.labels(m).inc()
            return
        request = self.llm.requests.get(d.request_id)
        if request is not None:
            self.prompt_tokens.labels(m).inc(len(request.prompt_ids))
            for seq in request.sequences:
                self.request_success.labels(m, seq.finish_reason or "unknown").inc()
        if metrics.time_to_first_token is not None:
            self.ttft.labels(m).observe(metrics.time_to_first_token)
        if metrics.finish_time is not None:
            self.e2e.labels(m).observe(metrics.finish_time - metrics.arrival_time)

    def failed(self) -> None:
        self.request_errors.labels(self.model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def llm_snapshot(llm: LLM) -> dict:
    """The engine's state for the gauges and the page; read on the engine thread only."""
    stats = llm.stats()
    running, waiting = llm.request_counts()
    stats.update(requests_running=running, requests_waiting=waiting, requests_held=len(llm.requests),
                 kv_bytes_in_use=stats["kv_blocks_in_use"] * llm.kv_block_bytes, time=time.time())
    return stats


class _Gauges:
    """Reads the snapshot at scrape time."""

    def __init__(self, metrics: ServerMetrics, prefix: str):
        self.metrics, self.p = metrics, prefix + ":"

    def collect(self):
        s, labels, p = self.metrics.snapshot, ["model_name"], self.p
        name = [self.metrics.model_name]
        for metric, kind, value, text in [
            ("num_requests_running", GaugeMetricFamily, s["requests_running"], "Requests in the running batch."),
            ("num_requests_waiting", GaugeMetricFamily, s["requests_waiting"], "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", GaugeMetricFamily, s["kv_usage_in_use"], "Fraction of KV blocks in use (0-1)."),
            ("kv_cache_bytes_in_use", GaugeMetricFamily, s["kv_bytes_in_use"], "KV bytes held by requests."),
            ("kv_cache_bytes_reserved", GaugeMetricFamily, s["kv_bytes"], "KV bytes of the whole pool."),
            ("kv_cache_blocks_cached", GaugeMetricFamily, s["kv_blocks_cached_evictable"],
             "Free blocks whose content the prefix cache keeps."),
            ("prefix_cache_queries", CounterMetricFamily, s["prefix_query_tokens"], "Prompt tokens looked up."),
            ("prefix_cache_hits", CounterMetricFamily, s["prefix_hit_tokens"], "Prompt tokens found cached."),
            ("num_preemptions", CounterMetricFamily, s["preemptions"], "Sequences preempted."),
            ("kv_cache_evictions", CounterMetricFamily, s["evictions"], "Cached blocks evicted for reuse."),
            ("kv_cache_window_released_blocks", CounterMetricFamily, s["window_released_blocks"],
             "Blocks given back from behind a sliding window (bounded attention)."),
        ]:
            family = kind(p + metric, text, labels=labels)
            family.add_metric(name, value)
            yield family
        if s.get("kv_tiers"):
            yield from _tier_families(p, self.metrics.model_name, s["kv_tiers"]["stores"])


_TIER_COUNTERS = [
    ("lookups", "Prefix lookups that reached the tier."),
    ("hit_chunks", "Chunks loaded from the tier and verified."),
    ("hit_tokens", "Prompt tokens the tier supplied (not recomputed)."),
    ("bytes_read", "Bytes read from the tier."),
    ("bytes_written", "Bytes written to the tier."),
    ("saves", "Chunks written to the tier."),
    ("errors", "Tier calls that failed or timed out (each served by computing)."),
    ("verify_failures", "Chunks read that did not verify (deleted, computed instead)."),
]


def _tier_families(p: str, model_name: str, stores: dict):
    """Per-tier counters and load/save latency histograms (label ``tier``: disk, redis)."""
    for field, text in _TIER_COUNTERS:
        family = CounterMetricFamily(p + "kv_tier_" + field, text, labels=["model_name", "tier"])
        for tier, values in stores.items():
            family.add_metric([model_name, tier], values[field])
        yield family
    for field in ("load_latency", "save_latency"):
        family = HistogramMetricFamily(p + f"kv_tier_{field}_seconds", f"Tier {field.split('_')[0]} call latency.",
                                       labels=["model_name", "tier"])
        for tier, values in stores.items():
            h, running, buckets = values[field], 0, []
            for edge, count in h["buckets"]:
                running += count
                buckets.append((str(edge), running))
            buckets.append(("+Inf", h["count"]))
            family.add_metric([model_name, tier], buckets, h["sum"])
        yield family
