"""One optimisation step, shared by the training loop and `ddpmctl bench`."""

from __future__ import annotations

from typing import Callable

import torch

from ddpmctl.diffusion import Schedule, training_loss
from ddpmctl.ema import EMA
from ddpmctl.spec import RunSpec

Event = Callable[[dict], None]


def make_train_step(forward, model, opt, ema: EMA, schedule: Schedule, spec: RunSpec, precision, device,
                    scaler=None) -> Callable:
    """One optimisation step: (x0, t, noise, lr) -> (loss, grad_norm, finite), all device tensors.

    Forward under autocast, backward, clip, AdamW (fused: a non-finite loss or gradient norm sets
    the optimizer's found_inf so the update is skipped on the device), then EMA. No host sync.
    Shared by the training loop and `ddpmctl bench`.
    """
    op, prediction = spec.optim, spec.diffusion.prediction
    params = [p for p in model.parameters() if p.requires_grad]
    channels_last = device.type == "cuda"

    def step(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, lr: float):
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr
        with precision.autocast(device):
            loss = training_loss(forward, schedule, x0, t, noise, prediction).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, op.grad_clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.found_inf = (~finite).float()
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, weight_scale=finite.float())
        return loss.detach(), gnorm.detach(), finite

    return step


def maybe_compile(model, mode: str, device: torch.device, emit: Event):
    want = mode == "on" or (mode == "auto" and device.type == "cuda")
    if not want:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
        emit({"event": "warning", "message": f"torch.compile unavailable ({exc.__class__.__name__}: {exc}); "
                                             "training without compilation"})
        return model


