"""Human-readable units in one place: bytes, seconds, throughput."""

from __future__ import annotations

MIB = 1024 * 1024


def format_bytes(num_bytes: float) -> str:
    """``1536`` → ``'1.5 KiB'``; binary prefixes, one decimal."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_mib(num_bytes: float) -> str:
    """Bytes as MiB with two decimals, for stats lines that compare sizes."""
    return f"{num_bytes / MIB:.2f} MiB"


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def per_second(count: float, seconds: float) -> float:
    """Rate that is 0.0 rather than a division error when nothing was timed."""
    return count / seconds if seconds > 0 else 0.0
