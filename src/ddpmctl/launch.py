"""``--nproc N``: start N workers on this machine through torch.distributed's elastic launcher (the
engine behind ``torchrun``), in-process, so that the exit code and stderr stay ddpmctl's own.

The launcher's agent forwards SIGINT/SIGTERM to every worker once; the workers agree to stop,
rank 0 writes one checkpoint, each worker exits with 128 + the signal. A worker that dies makes
the agent stop the others (SIGTERM, then SIGKILL after ``shutdown_timeout``) and the launch fail.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

from ddpmctl.errors import DdpmctlError, UsageError

SHUTDOWN_TIMEOUT_S = 60  # a stopping worker's grace period: finish the step, write a checkpoint


@dataclass
class LaunchResult:
    exit_code: int
    message: str | None = None  # for the user, when the launch failed


def _describe(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} was killed by {name}"
    return f"rank {rank} exited with code {exitcode}"


def launch(nproc: int, argv: list[str], *, threads_per_worker: int | None = None) -> LaunchResult:
    """Run ``python -m ddpmctl ARGV`` in ``nproc`` local workers; wait for all of them.

    ``threads_per_worker`` sets OMP_NUM_THREADS for the workers when the user has not (CPU jobs:
    the cores split between workers instead of every worker using all of them).
    """
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give 1 or more worker processes")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's own log lines (rendezvous, "shutting down workers") are not for our users.
    for name in list(logging.root.manager.loggerDict):  # torch sets levels per module logger
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if threads_per_worker is not None and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads_per_worker))
    extra = {"shutdown_timeout": SHUTDOWN_TIMEOUT_S}  # newer torch only; older ones wait 30 s
    known = {f.name for f in dataclasses.fields(LaunchConfig)}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, **{k: v for k, v in extra.items() if k in known})
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ddpmctl", *argv)
    except SignalException as exc:
        return LaunchResult(128 + int(exc.sigval))
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        codes = {f.exitcode for _, f in failures}
        if codes <= {130, 143}:  # every failed worker stopped on a signal, cleanly
            return LaunchResult(max(codes))
        # the agent stops the survivors with SIGTERM: name the ranks that failed first
        causes = [(r, f) for r, f in failures if f.exitcode not in (-signal.SIGTERM, 128 + signal.SIGTERM)]
        detail = "; ".join(_describe(r, f.exitcode) for r, f in causes or failures)
        stopped = len(failures) - len(causes) if causes else 0
        more = f"; the other {stopped} rank(s) were stopped" if stopped else ""
        code = next(iter(codes)) if len(codes) == 1 and min(codes) > 0 else 1  # all alike, e.g. 2: usage
        return LaunchResult(code, f"distributed job failed: {detail}{more}")
    except Exception as exc:  # noqa: BLE001 - rendezvous or agent failure
        raise DdpmctlError(f"could not start {nproc} workers: {exc.__class__.__name__}: {exc}") from None
    return LaunchResult(0)


def worker_argv(argv: list[str], drop: str = "--nproc", add: list[str] | None = None) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``, plus ``add`` (e.g. the resolved ``--out``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == drop:
            skip = True
            continue
        if a.startswith(drop + "="):
            continue
        out.append(a)
    return out + list(add or [])
