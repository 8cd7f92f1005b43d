"""NaN forward passes at chosen training steps, injected at the torch boundary.

The divergence guard (skip, roll back, give up) must be driven the same way on every CPU. An absurd
learning rate is not such a driver: whether lr = 1.0 overflows within 40 steps depends on the
kernels' summation order, which differs between AVX-512 and AVX2 builds of the same torch (issue 18).
This module makes chosen U-Net training forward passes return NaN through torch's global module
forward hook, so a test names the steps that diverge.

In process: ``with nan_forward({2, *range(5, 15)}): run(...)``. In subprocesses (torchrun workers):
put ``tests/faults`` and ``tests`` on PYTHONPATH and set ``DDPMCTL_TEST_NAN_CALLS`` (``"2,5-14"``,
``"3-"`` for every call from 3 on) and optionally ``DDPMCTL_TEST_NAN_RANK`` (only that RANK).
"""

from __future__ import annotations

import contextlib
import os

import torch


class Calls:
    """A set of 1-based call numbers parsed from ``"2,5-14,30-"`` (an open end means every call on)."""

    def __init__(self, text: str):
        self.ranges: list[tuple[int, float]] = []
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            self.ranges.append((int(lo), (float(hi) if hi else float("inf")) if sep else int(lo)))

    def __contains__(self, n: int) -> bool:
        return any(lo <= n <= hi for lo, hi in self.ranges)


def install(calls) -> torch.utils.hooks.RemovableHandle:
    """Count the U-Net's forward passes in training mode on real tensors (sampling grids run in eval
    mode, the memory estimate on the meta device: neither is counted) and return NaN from those
    numbered in ``calls``."""
    seen = 0

    def hook(module, _args, output):
        nonlocal seen
        if type(module).__name__ != "UNet" or not module.training or output.device.type == "meta":
            return None  # sampling grids (eval mode) and the memory estimate's meta-device pass
        seen += 1
        return output * float("nan") if seen in calls else None

    return torch.nn.modules.module.register_module_forward_hook(hook)


@contextlib.contextmanager
def nan_forward(calls):
    handle = install(Calls(calls) if isinstance(calls, str) else calls)
    try:
        yield
    finally:
        handle.remove()


def install_from_env() -> None:
    calls = os.environ.get("DDPMCTL_TEST_NAN_CALLS")
    rank = os.environ.get("DDPMCTL_TEST_NAN_RANK")
    if calls and (rank is None or os.environ.get("RANK", "0") == rank):
        install(Calls(calls))
