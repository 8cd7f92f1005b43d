"""The one progress display of every command: library events in, a rich progress bar (terminal) or
plain lines (pipes, CI, log files) out.

Without a terminal a heartbeat thread prints one plain line per running stage at least every
:data:`PROGRESS_INTERVAL_S` seconds (``$DDPMCTL_PROGRESS_INTERVAL`` overrides it), whatever the
training's log_every: counts done, a smoothed rate and an estimated time left. It reads only host-side
counters that the events already carry (the training loop's per-step ``tick``), so it adds no
host-device sync. ``--quiet`` turns bars and lines off; warnings and errors still show.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ddpmctl.cli.common import err_console, info, warn
from ddpmctl.durations import human_duration
from ddpmctl.units import human_bytes

if TYPE_CHECKING:
    from ddpmctl.train import StopFlag

PROGRESS_INTERVAL_S = 30.0  # the longest a long command stays silent on a pipe
PROGRESS_INTERVAL_ENV = "DDPMCTL_PROGRESS_INTERVAL"  # seconds; tests shorten it
RATE_TAU_S = 120.0  # time constant of the smoothed rate: an EMA over about the last two minutes


def progress_interval() -> float:
    """:data:`PROGRESS_INTERVAL_S`, or ``$DDPMCTL_PROGRESS_INTERVAL`` when that is a positive number."""
    try:
        v = float(os.environ.get(PROGRESS_INTERVAL_ENV, ""))
    except ValueError:
        return PROGRESS_INTERVAL_S
    return v if math.isfinite(v) and v > 0 else PROGRESS_INTERVAL_S


def describe_estimate(est: dict | None, device_type: str) -> str | None:
    """'~10 h 20 min (from 3 timed steps ...)' plus, past a day, what would shorten it."""
    if est is None or est.get("seconds") is None or est.get("steps", 0) <= 0:
        return None
    text = (f"estimated wall time ~{human_duration(est['seconds'])} for {est['steps']:,} steps "
            f"(from {est['method']} on this device; sample grids and checkpoints add to it)")
    if est["seconds"] > 86400:
        gpu = "" if device_type == "cuda" else ", or a GPU"
        text += ("; that is longer than a day: a smaller preset or network (--preset shapes, --preset "
                 "mnist-small, --set model.base_channels=32), fewer steps (--max-steps, --epochs), --time-limit "
                 f"to train in chunks with `ddpmctl resume`{gpu} would shorten it")
    elif est["seconds"] > 3600 and device_type != "cuda":
        text += ("; without a CUDA GPU, the CPU-sized presets train in under an hour on 2 cores: "
                 "--preset mnist-small (28x28 digits), --preset shapes")
    return text


class Meter:
    """One counted stage: done of total, a rate smoothed over about :data:`RATE_TAU_S` seconds (a
    time-weighted EMA of the throughput between updates) and the time left at that rate."""

    def __init__(self, label: str, total: float | None, unit: str = "images", start: float = 0, scale: float = 1,
                 scaled_unit: str | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.scale, self.scaled_unit = scale, scaled_unit  # e.g. steps counted, images/s shown
        self.done = start
        self.t0 = self._t = time.monotonic()
        self._done_at_t = start
        self.rate: float | None = None  # counts per second
        self.extra = ""
        self.finished = False

    def update(self, done: float, total: float | None = None) -> None:
        now = time.monotonic()
        if total is not None:
            self.total = total
        dt = now - self._t
        if dt > 0 and done > self._done_at_t:
            inst = (done - self._done_at_t) / dt
            a = 1.0 if self.rate is None else 1.0 - math.exp(-dt / RATE_TAU_S)
            self.rate = inst if self.rate is None else self.rate + a * (inst - self.rate)
            self._t, self._done_at_t = now, done
        self.done = done

    def _amount(self, n: float | None) -> str:
        return human_bytes(n) if self.unit == "bytes" else ("?" if n is None else f"{n:,.0f}")

    def line(self) -> str:
        if self.total is None and self.done == 0 and self.rate is None:
            return f"{self.label}: working, {human_duration(time.monotonic() - self.t0)} elapsed"
        total = f"/{self._amount(self.total)}" if self.total is not None else ""
        unit = "" if self.unit == "bytes" else f" {self.unit}"
        parts = [f"{self.label}: {self._amount(self.done)}{total}{unit}"]
        if self.rate is not None:
            r = self.rate * self.scale
            shown = self.scaled_unit or self.unit
            parts.append(f"{human_bytes(r)}/s" if shown == "bytes" else
                         f"{r:,.0f} {shown}/s" if r >= 100 else f"{r:.3g} {shown}/s")
            if self.total is not None and self.total > self.done:
                parts.append(f"~{human_duration((self.total - self.done) / self.rate)} left (estimate)")
        if self.extra:
            parts.append(self.extra)
        return " · ".join(parts)


class ProgressView:
    """Callable event sink for the library (training, data, evaluation) and the counter of the
    commands' own loops (sampling, export): ``view.meter(key, ...)``, ``view.update(key, done)``.

    ``quiet``: no bars or progress lines. ``silent``: nothing at all (a non-zero rank of a
    distributed job; rank 0 speaks for all)."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent
        self.live = err_console.is_terminal and not self.quiet
        self.bar: Progress | None = None
        self.meters: dict = {}
        self.tasks: dict = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.train_key: str | None = None

    # ---- lifetime
    def __enter__(self) -> "ProgressView":
        if self.live:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=err_console, transient=False)
            self.bar.__enter__()
        elif not self.quiet:
            self._beat = threading.Thread(target=self._heartbeat, args=(progress_interval(),), daemon=True,
                                          name="ddpmctl-progress")
            self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self.lock:
                lines = [m.line() for m in self.meters.values() if not m.finished]
            for line in lines:
                try:
                    info(escape(line))
                except (OSError, ValueError):  # stderr gone: progress is not worth a crash
                    return

    # ---- counters
    def meter(self, key, label: str, total: float | None, unit: str = "images", **kw) -> Meter:
        with self.lock:
            m = self.meters[key] = Meter(label, total, unit, **kw)
        if self.bar is not None:
            self.tasks[key] = self.bar.add_task(label, total=total, completed=m.done, detail="")
        return m

    def update(self, key, done: float, total: float | None = None, detail: str | None = None) -> None:
        m = self.meters[key]
        m.update(done, total)
        if self.bar is not None:
            self.bar.update(self.tasks[key], completed=done, total=m.total,
                            **({"detail": detail} if detail is not None else {}))

    def finish(self, key, line: bool = False) -> None:
        m = self.meters.get(key)
        if m is None or m.finished:
            return
        m.finished = True
        if line and self.bar is None and not self.quiet:
            info(escape(m.line() + " (done)"))

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """A stage without counts (e.g. export): on a pipe, 'LABEL: working, N s elapsed' lines."""
        self.meter(label, label, None)
        try:
            yield
        finally:
            self.finish(label)

    # ---- library events
    def __call__(self, ev: dict) -> None:
        if self.silent:
            return
        kind = ev.get("event")
        if kind == "tick":
            m = self.meters[self.train_key]
            self.update(self.train_key, ev["step"], detail=None if self.bar is None else
                        f"epoch {ev['epoch']:.2f}" + (f" · {m.extra}" if m.extra else ""))
        elif kind == "progress":
            self._stage(ev)
        elif kind == "start" and "total_steps" in ev:
            self._train_start(ev)
        elif kind == "start" and "metrics" in ev:
            info(escape(f"evaluating {ev['source']} ({ev['checkpoint']}, {ev['weights']} weights) on "
                        f"{ev['device']}: {', '.join(ev['metrics'])} against {ev['data']}"))
        elif kind == "log" and self.train_key is not None:
            m = self.meters[self.train_key]
            m.extra = f"loss {ev['loss']:.4f}" + (f" · {ev['skipped']} skipped" if ev.get("skipped") else "")
        elif kind == "warning":
            warn(escape(ev["message"]))
        elif kind == "resume":
            info(escape(f"resuming from {ev['checkpoint']} (step {ev['step']})"))
        elif kind == "rollback":
            warn(f"step {ev['step']}: non-finite steps in a row since step {ev['streak_from']}; rolled back to step "
                 f"{ev['to_step']} with the learning rate x{ev['lr_scale']:g} (rollback {ev['rollbacks']})")
        elif kind == "sample":
            if not self.quiet:
                info(escape(f"samples: {ev['path']}"))
        elif kind == "skipped":
            warn(escape(ev.get("message") or f"skipped {ev.get('count')} file(s): {ev.get('reason')}"))
        elif kind == "download":
            info(escape(ev.get("message") or f"downloading {ev.get('name', '')}"))
        elif kind in ("convert", "message"):
            if not self.quiet:
                info(escape(ev.get("message", "")))
        elif ev.get("message") and kind not in ("checkpoint",):
            info(escape(ev["message"]))

    def _train_start(self, ev: dict) -> None:
        info(escape(f"run dir {ev['run_dir']} · device {ev['device']} · precision {ev['precision']} · "
                    f"{ev['parameters'] / 1e6:.2f}M parameters · {ev['images']} images · "
                    f"{ev['steps_per_epoch']} steps/epoch · {ev['total_steps']} steps"
                    + (f" · {ev['world_size']} processes, global batch {ev['global_batch']}"
                       if ev.get("world_size", 1) > 1 else "")))
        est = describe_estimate(ev.get("estimate"), str(ev["device"]).split(" ")[0].split(":")[0])
        if est:
            info(escape(est))
        self.train_key = "train"
        self.meter("train", "training", ev["total_steps"], "steps", start=ev["start_step"],
                   scale=ev.get("global_batch", 1), scaled_unit="img")

    def _stage(self, ev: dict) -> None:
        """Data preparation, downloads and evaluation stages: one meter per (stage, split, source)."""
        key = (ev.get("stage"), ev.get("split"), ev.get("source"))
        if key not in self.meters or (self.meters[key].finished and not ev.get("final")):
            label = ev.get("stage", "working") + (f" {ev['split']}" if ev.get("split") else "")
            self.meter(key, label, ev.get("total"), ev.get("unit", "images"))
        m = self.meters[key]
        self.update(key, ev.get("done", 0), ev.get("total"))
        if ev.get("final"):
            rate = ev.get(f"{m.unit}_per_s")
            if rate:  # the stage's own average over its whole run
                m.rate = rate
            self.finish(key, line=True)


@contextmanager
def signals_to(stop: StopFlag, quiet: bool = False) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. Second SIGINT: stop at once.

    ``quiet``: a non-zero rank of a distributed job; it stops with the others and says nothing."""

    def handler(signum, frame):
        if stop.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(signum)
        if quiet:
            return
        try:
            err_console.print(f"{signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
                              "(Ctrl-C again to stop at once)", highlight=False)
        except (OSError, ValueError):  # stderr gone (closed pipe): stopping cleanly matters more
            pass

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if stop.signum is not None:  # on the way out already: a late Ctrl-C must not add a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
