"""Progress reporting through an ``on_event`` callback (the library never prints).

Events are plain dicts with an ``"event"`` key:

* ``{"event": "progress", "stage": "prepare", "split": "train", "done": n, "total": N,
  "unit": "images", "images_per_s": r, "final": bool}`` (``unit`` is ``"bytes"`` with
  ``"bytes_per_s"`` for downloads, ``"files"`` for Hub files);
* ``{"event": "skipped", "count": k, "reason": "...", "split": ..., "examples": [...], "message": ...}``;
* ``{"event": "download", "source": ..., "name": ..., "message": ...}`` when a dataset is to be fetched;
  the one sent just before data is fetched carries ``"bytes"``: the size to download (an https server's
  Content-Length, the Hub listing's file sizes, a torchvision dataset's known size), None when unknown;
* ``{"event": "convert", ..., "message": ...}`` when a prepared array is resized or its channels converted on load;
* ``{"event": "message", "message": ...}`` for anything else worth telling the user.
"""

from __future__ import annotations

import time
from typing import Any, Callable

Event = Callable[[dict], None]


def _noop(ev: dict) -> None:
    pass


def emitter(on_event: Event | None) -> Event:
    return on_event if on_event is not None else _noop


class Progress:
    """Throttled ``progress`` events for one stage: at most every ``interval`` seconds, plus the last."""

    def __init__(self, on_event: Event | None, stage: str, total: int | None, *, unit: str = "images",
                 split: str | None = None, interval: float = 0.25, **fields: Any):
        self.emit = emitter(on_event)
        self.stage, self.total, self.unit, self.split = stage, total, unit, split
        self.interval, self.fields = interval, fields
        self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self._send(final=False)

    def _send(self, final: bool) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        ev = {"event": "progress", "stage": self.stage, "done": self.done, "total": self.total,
              "unit": self.unit, f"{self.unit}_per_s": self.done / dt, "final": final, **self.fields}
        if self.split is not None:
            ev["split"] = self.split
        self.emit(ev)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._send(final=False)

    def close(self) -> float:
        """Send the final event; returns the rate (units per second)."""
        self._send(final=True)
        return self.done / max(time.perf_counter() - self.t0, 1e-9)
