"""Resizing and channel conversion of whole uint8 arrays, as tensor ops (no per-image Python)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
_LUMA = (299, 587, 114)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, H, W): RGB -> L by luma, L -> RGB by repetition."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=torch.int32).view(1, 3, 1, 1)
        y = (x.to(torch.int32) * w).sum(1, keepdim=True)
        return ((y + 500) // 1000).clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, size, size), antialiased bicubic (like Pillow's), rounded."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.to(torch.float32), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def convert_images(x: torch.Tensor, size: int, channels: int, chunk: int = 2048) -> torch.Tensor:
    """Channels first (cheaper when reducing), then size; chunked to bound memory."""
    if x.shape[1] == channels and x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = torch.empty((x.shape[0], channels, size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        out[i:i + chunk] = resize(to_channels(x[i:i + chunk], channels), size)
    return out
