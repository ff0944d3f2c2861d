"""The shipped model's corpus: the running interpreter's standard library sources.

Present on every machine and PSF-licensed.  ``*.py`` files under
``sysconfig.get_paths()["stdlib"]``, without site-packages and the test
suites, in sorted order; about 5% are held out for validation by a stable
hash of their relative path (never trained on).  Used by the training script
and by the tests that measure the shipped model.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections import Counter
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
VALIDATION_PERCENT = 5


def is_validation(relative_path: str) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def corpus_files(root: str | Path | None = None) -> tuple[list[Path], list[Path], Path]:
    """(training files, validation files, stdlib root), deterministic order and split."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    train, val = [], []
    for p in files:
        (val if is_validation(p.relative_to(root).as_posix()) else train).append(p)
    return train, val, root


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats/token) of the token frequencies of ``ids``: the loss of the best context-free model."""
    counts = Counter(ids)
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in counts.values())
