"""Byte counts as people read them: the one formatter every message and table uses."""

from __future__ import annotations


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, as memory and disks are sized); None -> ``'?'``."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
