"""Append cost: doubling-buffer :class:`KVCache` vs. the re-stacking textbook cache.

The re-stacking cache copies the whole history on every append (O(T^2) total),
the buffered one copies each row O(1) times amortized. This module measures the
total wall time for N appends of ``(dim,)`` float64 rows into each.

The re-stacking run is only *measured*, never extrapolated: above
``restacking_max`` rows it is skipped, and if it exceeds ``restacking_budget_s``
seconds it is stopped and reported as "skipped (too slow)" with how far it got.

Run: ``python -m kvcache.bench.append [N ...]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

import numpy as np

from kvcache.caches.simple import KVCache, RestackingKVCache


def _time_appends(cache: Any, K: np.ndarray, V: np.ndarray,
                  budget_s: float | None = None) -> tuple[float, int]:
    """Append all rows; return (elapsed seconds, rows appended). Stops early past budget_s."""
    n = K.shape[0]
    start = time.perf_counter()
    for i in range(n):
        cache.append(K[i], V[i])
        # Checking the clock every 256 rows keeps the overhead negligible.
        if budget_s is not None and (i & 255) == 255 and time.perf_counter() - start > budget_s:
            return time.perf_counter() - start, i + 1
    return time.perf_counter() - start, n


def bench_append(sizes: Iterable[int] = (10_000, 100_000), dim: int = 64,
                 restacking_max: int = 100_000, restacking_budget_s: float = 60.0,
                 seed: int = 0) -> list[dict]:
    """Time N appends into KVCache and RestackingKVCache for each N in ``sizes``.

    Returns one dict per N: ``n``, ``kvcache_s``, ``restacking_s`` (None if
    skipped), ``ratio`` = restacking_s / kvcache_s (None if skipped) and
    ``restacking_note`` (None, or why the re-stacking run has no time) and
    ``ratio_lower_bound``: when the re-stacking run was stopped, the time it had
    already spent over KVCache's time for all N rows (the true ratio is larger).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        K = rng.standard_normal((n, dim))
        V = rng.standard_normal((n, dim))
        fast = KVCache(dim=dim)
        kv_s, _ = _time_appends(fast, K, V)
        assert len(fast) == n

        re_s: float | None = None
        note: str | None = None
        lower: float | None = None
        if n > restacking_max:
            note = f"skipped (n > restacking_max={restacking_max:,})"
        else:
            slow = RestackingKVCache()
            elapsed, done = _time_appends(slow, K, V, restacking_budget_s)
            if done < n:
                note = (f"stopped after {elapsed:.1f} s "
                        f"at {done:,} of {n:,} appends")
                lower = elapsed / kv_s
            else:
                re_s = elapsed
                # Same rows in, same rows out: the comparison is apples to apples.
                assert np.array_equal(slow.K, fast.keys) and np.array_equal(slow.V, fast.values)
            del slow
        rows.append({"n": n, "kvcache_s": kv_s, "restacking_s": re_s,
                     "ratio": None if re_s is None else re_s / kv_s,
                     "restacking_note": note, "ratio_lower_bound": lower})
    return rows


def format_append_table(rows: list[dict]) -> str:
    """Markdown table of :func:`bench_append` results."""
    lines = ["| appends (N) | KVCache (s) | re-stacking (s) | re-stacking / KVCache |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("restacking_s") is None:
            slow = r.get("restacking_note") or "skipped"
            lower = r.get("ratio_lower_bound")
            ratio = f"> {lower:.1f}x" if lower else "n/a"
        else:
            slow = f"{r['restacking_s']:.3f}"
            ratio = f"{r['ratio']:.1f}x"
        lines.append(f"| {r['n']:,} | {r['kvcache_s']:.3f} | {slow} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sizes = tuple(int(a.replace("_", "")) for a in args) or (10_000, 100_000)
    print(format_append_table(bench_append(sizes=sizes)))


if __name__ == "__main__":
    main()
