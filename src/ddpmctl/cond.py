"""What a denoiser is conditioned on besides (x_t, t): the third argument of every model call.

``model(x_t, t, cond)`` is the one network interface. The loss, every sampler, the CUDA-graph cache,
bench, eval, the demo and the ONNX export pass ``cond`` through without looking inside, so a new
conditioning input is a new field here plus its use in the network, and no signature changes.
``None`` means unconditional (every model trained so far).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor


@dataclass(frozen=True)
class Cond:
    """Per-image conditioning, batched like x_t (first dimension B)."""

    labels: Tensor | None = None  # (B,) long class indices

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields that are set, in field order."""
        return tuple(v for f in fields(self) if (v := getattr(self, f.name)) is not None)

    def key(self) -> tuple:
        """What a cache of shape-specialised callables (CUDA graphs) must tell apart."""
        return tuple((f.name, tuple(v.shape), v.dtype) for f in fields(self)
                     if (v := getattr(self, f.name)) is not None)

    def with_tensors(self, tensors: tuple[Tensor, ...]) -> "Cond":
        """The same fields set, holding ``tensors`` (e.g. a graph's static copies) instead."""
        it = iter(tensors)
        return Cond(**{f.name: next(it) for f in fields(self) if getattr(self, f.name) is not None})


def cond_key(cond: Cond | None) -> tuple:
    return () if cond is None else cond.key()
