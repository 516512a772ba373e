"""Sizes and rates as people write them: ``8GiB``, ``20GB``, ``512MiB``, ``3GB/s``."""

from __future__ import annotations

__all__ = ["parse_bytes", "parse_rate"]

# decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB; K, M, G, T as their shorthand) units
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``268435456``, ``256MiB``, ``8GiB``, ``1.5GB`` -> bytes.

    Raises:
      ValueError: not a non-negative number with one of the units above.
    """
    number = text.strip().rstrip("BbKkMmGgTtIi")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 268435456, 256MiB, 8GiB, 20GB)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a size in bytes: must be a finite number >= 0")
    return int(value)


def parse_rate(text: str) -> float:
    """``3GB/s``, ``1.9GB/s``, ``500MiB/s`` -> bytes per second (the ``/s`` may be left out)."""
    size = text.strip().removesuffix("/s")
    try:
        return float(parse_bytes(size))
    except ValueError:
        raise ValueError(f"{text!r} is not a rate in bytes per second (e.g. 3GB/s, 500MiB/s)") from None
