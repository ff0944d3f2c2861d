"""Where kvcache finds its files: the shipped model inside the package, and, kept between runs, pulled models
and compiled kernels under one home.

``KVCACHE_HOME`` if set, else ``$XDG_CACHE_HOME/kvcache``, else ``~/.cache/kvcache``.  Its own small
module, below the model and the caches, so neither finds its directory through the other.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "data" / "default_model"  # the default --model


def home() -> Path:
    if os.environ.get("KVCACHE_HOME"):
        return Path(os.environ["KVCACHE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kvcache"


def models_dir() -> Path:
    """Pulled, converted models (model/hub.py)."""
    return home() / "models"


def kernels_dir() -> Path:
    """Compiled attention kernels, one shared object per source, flags and CPU (caches/kernels.py)."""
    return home() / "kernels"
