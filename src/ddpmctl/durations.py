"""Durations as people write them (``90s``, ``30m``, ``2h``, ``1d``, ``1h30m``) and as they read them."""

from __future__ import annotations

import math
import re

from ddpmctl.errors import UsageError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")
ACCEPTED = "a duration such as 90s, 30m, 2h, 1d or 1h30m (or a plain number of seconds)"


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """Seconds in ``text``: a plain number (seconds) or number+unit parts (s, m, h, d), e.g. ``1h30m``.

    Raises UsageError naming ``what`` and the accepted forms for anything else (empty, negative,
    zero, unknown unit, not finite)."""
    if isinstance(text, bool):
        raise UsageError(f"{what}: expected {ACCEPTED}, got {text!r}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        try:
            seconds = float(raw)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _PART.finditer(raw):
                if raw[pos:m.start()].strip():
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos == 0 or raw[pos:].strip():
                raise UsageError(f"{what}: expected {ACCEPTED}, got {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{what}: must be a positive duration ({ACCEPTED}), got {text!r}")
    return seconds


def short_duration(seconds: float) -> str:
    """The compact form parse_duration reads back: 5400 -> '1h30m', 90 -> '1m30s', 86400 -> '1d'."""
    s = max(1, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)


def human_duration(seconds: float) -> str:
    """Two significant units for estimates: '10 h 20 min', '3 d 4 h', '45 s'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m} min {r} s" if r and m < 10 else f"{m} min"
    if s < 86400:
        h, r = divmod(s, 3600)
        m = round(r / 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, r = divmod(s, 86400)
    h = round(r / 3600)
    return f"{d} d {h} h" if h else f"{d} d"
