"""The one image writer: tensors in [-1, 1] -> uint8 -> PNG files, grids and GIFs."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ddpmctl.errors import UsageError
from ddpmctl.safefile import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 on the CPU, rounded as in Ho et al."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(img: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> PIL image (L or RGB)."""
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


def png_bytes(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: Path, img: torch.Tensor) -> None:
    """Write one uint8 (C, H, W) image atomically."""
    atomic_write_bytes(Path(path), png_bytes(img))


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """uint8 (B, C, H, W) -> one uint8 (C, H', W') image with `nrow` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def label_columns(grid: torch.Tensor, labels: Sequence[str], cell: int, padding: int = 2) -> torch.Tensor:
    """``grid`` (a :func:`make_grid` of ``cell``-pixel images, ``padding`` apart) with a white strip on
    top holding ``labels[i]`` in black, centred over column ``i`` (PIL's default font). Where labels
    are wider than a column, only every k-th column is labelled so that none overlap; the grid itself
    is unchanged below the strip."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    c, _, w = grid.shape
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    top, bottom = measure.textbbox((0, 0), "0123456789", font=font)[1::2]
    strip = Image.new("L", (w, bottom - top + 2 * padding), 255)
    draw = ImageDraw.Draw(strip)
    boxes = [measure.textbbox((0, 0), str(t), font=font) for t in labels]
    pitch = cell + padding
    every = max(1, math.ceil((max((b[2] - b[0] for b in boxes), default=0) + padding) / pitch))
    for i, (text, box) in enumerate(zip(labels, boxes)):
        if i % every:
            continue
        width = box[2] - box[0]
        x = min(max(0, padding + i * pitch + (cell - width) // 2), max(0, w - width))
        draw.text((x - box[0], padding - top), str(text), fill=0, font=font)
    band = torch.from_numpy(np.asarray(strip).copy())[None].expand(c, -1, -1)
    return torch.cat([band, grid], dim=1).contiguous()


def split_grid(grid: torch.Tensor, n: int, nrow: int, size: int, padding: int = 2) -> torch.Tensor:
    """Inverse of make_grid for square images of `size`: uint8 (n, C, size, size)."""
    out = []
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = padding + r * (size + padding), padding + q * (size + padding)
        out.append(grid[:, y : y + size, x : x + size])
    return torch.stack(out)


def read_image(path: Path, channels: int | None = None) -> torch.Tensor:
    """A PNG/JPEG/WebP file -> uint8 (C, H, W) (RGB unless channels == 1 or the file is grayscale)."""
    with Image.open(path) as im:
        mode = "L" if channels == 1 or (channels is None and im.mode in ("L", "I;16", "1")) else "RGB"
        arr = torch.from_numpy(__import__("numpy").asarray(im.convert(mode)).copy())
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def stack_same_size(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack images, converting grayscale to RGB when mixed; sizes must match."""
    if not images:
        raise UsageError("no images to put in a grid")
    chans = max(i.shape[0] for i in images)
    imgs = [i.expand(chans, -1, -1) if i.shape[0] != chans else i for i in images]
    sizes = {tuple(i.shape[1:]) for i in imgs}
    if len(sizes) > 1:
        raise UsageError(f"images have different sizes {sorted(sizes)}; a grid needs one size")
    return torch.stack(imgs)


def save_gif(path: Path, frames: Sequence[torch.Tensor], duration_ms: int = 80) -> None:
    """uint8 (C, H, W) frames -> animated GIF (the last frame held longer)."""
    pils = [to_pil(f).convert("RGB") for f in frames]
    buf = io.BytesIO()
    durations = [duration_ms] * (len(pils) - 1) + [duration_ms * 15]
    pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=durations, loop=0)
    atomic_write_bytes(Path(path), buf.getvalue())
