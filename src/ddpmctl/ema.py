"""Exponential moving average of the weights, with warm-up, using torch._foreach ops."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(num_updates: int, decay: float, warmup: bool) -> float:
    """min(decay, (1 + n) / (10 + n)): the EMA follows the model closely early on, so short runs
    still get a useful EMA (as in TensorFlow's ExponentialMovingAverage num_updates)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """Shadow copies of the floating-point parameters and buffers of a model."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()
        }
        self._names = [n for n, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, weight_scale: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) * (param - shadow). `weight_scale` (a 0-d device tensor, 0 or 1)
        holds the EMA still on a skipped step without a host-device sync."""
        d = ema_decay_at(self.num_updates, self.decay, self.warmup)
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in self._names]
        current = [params[n].detach().float() for n in self._names]
        if weight_scale is None:
            torch._foreach_lerp_(shadow, current, 1.0 - d)
        elif weight_scale.device.type == "cpu":
            # One lerp pass instead of three (sub, mul, add): 1.5 vs 7.0 ms for the mnist preset's 7M
            # parameters on the CPU, where reading the scale costs nothing (on CUDA it would sync).
            torch._foreach_lerp_(shadow, current, float(weight_scale) * (1.0 - d))
        else:
            delta = torch._foreach_sub(current, shadow)
            torch._foreach_mul_(delta, weight_scale * (1.0 - d))
            torch._foreach_add_(shadow, delta)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.shadow})
