"""Argument checks shared by the evaluation functions (one-line errors naming the value)."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools rejected), else a one-line ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value
