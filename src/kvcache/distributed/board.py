"""The board: a small Ray actor the replicas post their state and metrics to, and the ingress reads.

A Serve handle sends each call to one replica, so nothing can ask "every replica" through it.  Instead each
replica posts what its page and ``/metrics`` need every ``PUBLISH_S`` seconds; a replica that stops posting
(killed, scaled down) drops off after ``STALE_S``.  The ingress creates the board and owns it, so it goes away
with the application.
"""

from __future__ import annotations

import time

import ray
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_S = 0.5
STALE_S = 3.0
NAMESPACE = "kvcache"


def board_name(app_name: str) -> str:
    return f"kvcache-board-{app_name}"


@ray.remote(num_cpus=0)
class Board:
    def __init__(self):
        self.posts: dict[str, tuple[float, dict]] = {}

    def post(self, replica: str, state: dict) -> None:
        self.posts[replica] = (time.monotonic(), state)

    def read(self, max_age: float = STALE_S) -> dict[str, dict]:
        """The replicas that posted in the last ``max_age`` seconds; older posts are dropped."""
        now = time.monotonic()
        for replica in [r for r, (t, _) in self.posts.items() if now - t > max_age]:
            del self.posts[replica]
        return {r: s for r, (_, s) in sorted(self.posts.items())}


def open_board(app_name: str):
    """The application's board, created if it is not there yet (the ingress calls this)."""
    return Board.options(name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True).remote()


def find_board(app_name: str):
    """The board, or None while the ingress has not created it (replicas call this)."""
    try:
        return ray.get_actor(board_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None


class MergedMetrics:
    """A prometheus-client collector: every replica's series, each with a ``replica`` label, one family per name
    (the exposition format allows a family once), beside the ingress's own."""

    def __init__(self):
        self.texts: dict[str, str] = {}

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, text in self.texts.items():
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
        yield from families.values()
