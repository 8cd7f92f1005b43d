"""Turns library events into a rich progress bar (terminal) or plain log lines (pipes, CI)."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ddpmctl.cli.common import err_console, info, warn
from ddpmctl.train import StopFlag

PLAIN_EVERY_S = 10.0  # plain-line logging rate when stderr is not a terminal


class TrainProgress:
    """Callable event sink for ddpmctl.train.run."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent  # another rank of a distributed job: rank 0 speaks for all
        self.live = err_console.is_terminal and not self.quiet
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self.last_plain = 0.0
        self.data_task = None

    def __enter__(self) -> "TrainProgress":
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, ev: dict) -> None:
        if self.silent:
            return
        kind = ev.get("event")
        if kind == "tick":
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, completed=ev["step"],
                                     description=f"epoch {ev['epoch']:.2f}")
            return
        if kind == "start":
            self.total = ev["total_steps"]
            info(f"run dir {ev['run_dir']} · device {ev['device']} · precision {ev['precision']} · "
                 f"{ev['parameters'] / 1e6:.2f}M parameters · {ev['images']} images · "
                 f"{ev['steps_per_epoch']} steps/epoch · {ev['total_steps']} steps"
                 + (f" · {ev['world_size']} processes, global batch {ev['global_batch']}"
                    if ev.get("world_size", 1) > 1 else ""))
            if self.progress is not None:
                self.task = self.progress.add_task("epoch 0", total=self.total, completed=ev["start_step"],
                                                   status="")
            return
        if kind == "log":
            status = f"loss {ev['loss']:.4f} · {ev['images_per_s']:.0f} img/s"
            if ev.get("skipped"):
                status += f" · [yellow]{ev['skipped']} skipped[/]"
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, status=status)
            elif not self.quiet:
                now = time.monotonic()
                if now - self.last_plain >= PLAIN_EVERY_S or ev["step"] >= self.total:
                    self.last_plain = now
                    info(f"step {ev['step']}/{self.total} epoch {ev['epoch']:.2f} loss {ev['loss']:.4f} "
                         f"grad_norm {ev['grad_norm']:.3f} lr {ev['lr']:.2e} {ev['images_per_s']:.0f} img/s")
            return
        if kind == "progress":  # data preparation
            if self.progress is not None:
                if self.data_task is None:
                    self.data_task = self.progress.add_task(ev.get("stage", "prepare"), total=ev.get("total"),
                                                            status="")
                self.progress.update(self.data_task, completed=ev.get("done", 0),
                                     status=f"{ev.get('images_per_s', 0):.0f} img/s")
            return
        if kind == "warning":
            warn(ev["message"])
        elif kind == "resume":
            info(f"resuming from {ev['checkpoint']} (step {ev['step']})")
        elif kind == "rollback":
            warn(f"step {ev['step']}: non-finite steps in a row since step {ev['streak_from']}; rolled back to step "
                 f"{ev['to_step']} with the learning rate x{ev['lr_scale']:g} (rollback {ev['rollbacks']})")
        elif kind == "sample":
            if not self.quiet:
                info(f"samples: {ev['path']}")
        elif kind == "download":
            info(ev.get("message") or f"downloading {ev.get('name', '')}")
        elif kind in ("skipped",):
            warn(f"skipped {ev.get('count')} file(s): {ev.get('reason')}")
        elif "message" in ev and kind not in ("checkpoint",):
            info(ev["message"])


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
