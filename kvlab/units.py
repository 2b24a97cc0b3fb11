"""Human-readable units in one place: bytes, seconds, throughput."""

from __future__ import annotations

MIB = 1024 * 1024
# the size units kvlab reads and writes: binary ones (powers of 1024) first, each list from the largest
SIZE_UNITS = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "KiB": 2**10,
              "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def format_bytes(num_bytes: float) -> str:
    """``1536`` → ``'1.5 KiB'``; binary prefixes, one decimal."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_exact_size(num_bytes: int) -> str:
    """``67108864`` → ``'64MiB'``: the largest unit of ``SIZE_UNITS`` that divides the size exactly (binary units
    first), else bytes (``'1000B'``), so two different sizes never read the same; ``store.parse_size`` reads it
    back."""
    for unit, size in SIZE_UNITS.items():
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return f"{num_bytes}B"


def format_mib(num_bytes: float) -> str:
    """Bytes as MiB with two decimals, for stats lines that compare sizes."""
    return f"{num_bytes / MIB:.2f} MiB"


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def per_second(count: float, seconds: float) -> float:
    """Rate that is 0.0 rather than a division error when nothing was timed."""
    return count / seconds if seconds > 0 else 0.0
