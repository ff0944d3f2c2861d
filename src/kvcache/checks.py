"""Argument checks shared by the public API, so every bad argument gets the same clear wording.

Integers are ``numbers.Integral`` minus ``bool``: numpy integer scalars are
integers (they come out of arrays all the time), ``True`` is not a count or
an index.  Wrong types raise TypeError, wrong values ValueError.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools (numpy's bool_ is not Integral either)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int; TypeError if it is not an integer, ValueError if below ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite Python float; TypeError for non-numbers (and bools), ValueError for nan/inf."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
