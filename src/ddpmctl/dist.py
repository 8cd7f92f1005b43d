"""Distributed training and sampling on PyTorch's own engine: torchrun + DistributedDataParallel.

A process started by ``torchrun`` (or by ``ddpmctl train --nproc N``, which runs torchrun's launcher
in-process) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment; :func:`from_env` then
joins the process group (NCCL on CUDA, gloo on the CPU) and returns a :class:`Dist`. Without those
variables, or with a world of one, :func:`from_env` returns the single-process :data:`SINGLE`, whose
collectives are no-ops, so the training loop has one code path.

Two planes:

* data: DDP's gradient all-reduce and the per-step loss all-reduce run on the default group
  (NCCL on CUDA), asynchronously, without a host sync;
* control: small host-side agreements (stop on a signal, weight fingerprints, broadcast of a run
  directory or a checkpoint step) run on a separate gloo group over CPU tensors, so they never wait
  for the GPU.

Timeouts: every collective gives up after ``DDPMCTL_DIST_TIMEOUT`` seconds (default 1800: rank 0
may spend minutes drawing a sample grid or writing a checkpoint while the others wait). A rank
that dies is noticed sooner: torchrun's agent stops the other local workers within seconds, and a
gloo peer whose process is gone fails the next control collective at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ddpmctl.errors import DdpmctlError, UsageError

DEFAULT_TIMEOUT_S = 1800
# Marks of a collective that failed because of a peer (gloo raises plain RuntimeErrors).
COLLECTIVE_ERRORS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out")


class DistError(DdpmctlError):
    """A collective failed: a peer died, hung past the timeout, or the ranks disagree."""


@dataclass
class Dist:
    """This process's place in the job. ``world_size == 1``: every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: Any = None  # the gloo ProcessGroup for host-side agreement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- control plane (host side, gloo)
    def _control(self, fn, *args, **kwargs):
        import torch.distributed as td

        try:
            return fn(*args, group=self.control, **kwargs)
        except (RuntimeError, td.DistBackendError) as exc:  # peer gone, timeout
            first = _short(str(exc)) or exc.__class__.__name__
            raise DistError(f"rank {self.rank}: lost contact with the other ranks ({first}); "
                            "another rank has probably failed, see its message above") from None

    def max_int(self, value: int) -> int:
        """The largest ``value`` over all ranks (for agreements: 0 = no, anything else = yes)."""
        if not self.distributed:
            return int(value)
        import torch.distributed as td

        t = torch.tensor([int(value)], dtype=torch.long)
        self._control(td.all_reduce, t, op=td.ReduceOp.MAX)
        return int(t.item())

    def gather_floats(self, values: Sequence[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on all ranks), in rank order, on every rank."""
        if not self.distributed:
            return [list(values)]
        import torch.distributed as td

        mine = torch.tensor(list(values), dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._control(td.all_gather, out, mine)
        return [o.tolist() for o in out]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small, picklable-free JSON-like values only)."""
        if not self.distributed:
            return obj
        import json

        import torch.distributed as td

        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.long)
        self._control(td.broadcast, size, src=0)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else torch.empty(
            int(size.item()), dtype=torch.uint8)
        self._control(td.broadcast, buf, src=0)
        return json.loads(bytes(buf.tolist()).decode())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as td

            self._control(td.barrier)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a failed collective inside the block (a peer died or hung) into a DistError: one
        line for the user instead of a traceback. Outside a distributed job it does nothing."""
        if not self.distributed:
            yield
            return
        import torch.distributed as td

        try:
            yield
        except RuntimeError as exc:
            text = str(exc)
            if not (isinstance(exc, td.DistBackendError) or any(k in text for k in COLLECTIVE_ERRORS)):
                raise
            first = _short(text)
            raise DistError(f"rank {self.rank}: a collective failed ({first}); another rank has probably "
                            "failed, see its message above") from None

    # ---- data plane (the training device)
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks; asynchronous on CUDA (no host sync). NaN anywhere -> NaN."""
        if not self.distributed:
            return t
        import torch.distributed as td

        t = t.detach().float().clone()
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t / self.world_size

    def shard(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (the batch must split evenly: see :func:`check_batch`)."""
        per = global_batch // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


SINGLE = Dist()


def _short(text: str) -> str:
    """The useful part of a gloo/NCCL error: no source location, no advice paragraph."""
    import re

    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h)(:\d+)?\]\s*", "", line)
    return line.split(". This is typically")[0][:300]


def launched() -> bool:
    """True in a process started by torchrun (or ``--nproc``)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def timeout_s() -> float:
    raw = os.environ.get("DDPMCTL_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"DDPMCTL_DIST_TIMEOUT={raw!r}: give a number of seconds, e.g. 1800") from None
    if value <= 0:
        raise UsageError(f"DDPMCTL_DIST_TIMEOUT={raw!r}: must be positive")
    return value


def from_env(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment, on ``device``'s backend.

    ``device`` is the device the user asked for (already resolved); on CUDA each rank takes
    ``cuda:LOCAL_RANK``. Returns :data:`SINGLE` outside torchrun or for a world of one.
    """
    if not launched():
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world <= 1:
        return SINGLE
    import torch.distributed as td

    device = torch.device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s); use --nproc/--nproc-per-node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not {device.type}; "
                         "use --device cuda or --device cpu")
    timeout = datetime.timedelta(seconds=timeout_s())
    if not td.is_initialized():
        try:  # device_id (torch >= 2.3) binds the NCCL communicator to this rank's GPU eagerly
            kwargs = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
            td.init_process_group(backend=backend, timeout=timeout, **kwargs)
        except TypeError:
            td.init_process_group(backend=backend, timeout=timeout)
    control = td.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local_rank, control)


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for CUDA jobs, else ``device``."""
    device = torch.device(device)
    if dist.distributed and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def check_batch(global_batch: int, world_size: int) -> None:
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        raise UsageError(f"train.batch_size {global_batch} is the global batch and must split evenly over "
                         f"{world_size} ranks; use a multiple of {world_size} (e.g. {lower or world_size} "
                         f"or {lower + world_size})")


def fingerprint(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Two float64 numbers that change with any change of the weights: the sum, and a sum weighted
    by position. Ranks compare them at each checkpoint (DDP keeps replicas equal; this checks it)."""
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    weighted = total.clone()
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1).to(torch.float64)
        total += flat.sum()
        weighted += (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)).sum() * (i + 1)
    return torch.stack([total, weighted]).tolist()
