"""Device-resident batches: the whole uint8 array on the device, batching as tensor ops.

A batch is a pure function of ``(seed, epoch, index)``: the epoch's permutation and its flip
decisions come from CPU generators seeded from ``(seed, epoch)``, so resuming in the middle
of an epoch reproduces the remaining batches bit for bit, on any device.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

# Keep the dataset on a CUDA device only if it takes at most this share of the free memory
# and leaves at least this much free for the model, activations and the allocator.
DEVICE_MEMORY_SHARE = 0.4
DEVICE_MEMORY_RESERVE = 2 << 30


def _seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any tuple (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(_seed(*parts))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` images in ``epoch`` (CPU int64); a pure function of ``(seed, epoch)``."""
    return torch.randperm(n, generator=_generator("perm", seed, epoch), dtype=torch.long)


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Per-position horizontal-flip decisions for ``epoch`` (CPU bool, about half True)."""
    return torch.rand(n, generator=_generator("flip", seed, epoch)) < 0.5


# uint8 -> [-1, 1] as x * fl32(1/127.5) - 1: two IEEE float32 operations, so CPU and CUDA give the
# same bits (a division by a scalar runs as a multiplication by its reciprocal on CUDA but not on
# the CPU); 0 -> -1 and 255 -> 1 exactly, every value within 1.5e-7 of (x - 127.5) / 127.5.
UNIT_SCALE = float(torch.tensor(1 / 127.5, dtype=torch.float32))


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], bitwise identical on every device."""
    return x.to(torch.float32).mul_(UNIT_SCALE).sub_(1.0)


def _fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:
            return False
        return nbytes <= DEVICE_MEMORY_SHARE * free and free - nbytes >= DEVICE_MEMORY_RESERVE
    if device.type == "mps":
        try:
            budget = torch.mps.recommended_max_memory()
        except (AttributeError, RuntimeError):
            return False
        return nbytes <= 0.25 * budget
    return True


class DeviceLoader:
    """Batches of float32 images in [-1, 1] on ``device`` from a uint8 (N, C, H, W) array.

    The array lives on the device when it fits (CPU: always; CUDA: within
    :data:`DEVICE_MEMORY_SHARE` of the free memory, keeping :data:`DEVICE_MEMORY_RESERVE` free);
    otherwise in pinned host memory, gathered on the host and copied with ``non_blocking=True``.
    ``placement`` says which ("device" or "pinned-host").

    ``shard=(rank, world_size)``: ``batch_size`` is the global batch, the same on every rank, and
    this rank gets rows ``rank * b .. (rank + 1) * b - 1`` of it (``b = batch_size / world_size``),
    so the data a run sees does not depend on how many ranks share it.
    """

    def __init__(self, images_uint8: torch.Tensor, batch_size: int, device: torch.device | str, *,
                 seed: int, flip: bool = True, drop_last: bool = True, shard: tuple[int, int] = (0, 1),
                 labels: torch.Tensor | None = None):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"expected a uint8 (N, C, H, W) tensor, got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}")
        if images_uint8.shape[0] < 1:
            raise ValueError("cannot batch an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.n = int(images_uint8.shape[0])
        self.batch_size = min(batch_size, self.n)
        self.seed, self.flip, self.drop_last = int(seed), bool(flip), bool(drop_last)
        if drop_last:
            self.steps_per_epoch = max(1, self.n // self.batch_size)
        else:
            self.steps_per_epoch = -(-self.n // self.batch_size)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {shard}: rank must be in 0..world_size-1")
        if self.batch_size % world:
            raise ValueError(f"global batch {self.batch_size} does not split over {world} ranks")
        self.rank, self.world = rank, world
        nbytes = images_uint8.numel()
        if _fits_on(self.device, nbytes):
            self.placement = "device"
            self.images = images_uint8.to(self.device).contiguous()
        else:
            self.placement = "pinned-host"
            self.images = images_uint8.contiguous().pin_memory()
        if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != (self.n,)):
            raise ValueError(f"expected int64 labels of shape ({self.n},), got {labels.dtype} {tuple(labels.shape)}")
        self.labels = None if labels is None else labels.to(self.device if self.placement == "device" else "cpu")
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None
        self._flips: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _prepare_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        perm = epoch_permutation(self.n, self.seed, epoch)
        flips = epoch_flips(self.n, self.seed, epoch)
        index_device = self.device if self.placement == "device" else torch.device("cpu")
        self._perm = perm.to(index_device)
        self._flips = flips.to(self.device)
        self._epoch = epoch

    def _rows(self, epoch: int, index: int) -> tuple[int, int]:
        """Positions lo..hi-1 of ``epoch``'s permutation that batch ``index`` takes on this rank."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch index {index} out of range 0..{self.steps_per_epoch - 1}")
        self._prepare_epoch(epoch)
        lo = index * self.batch_size
        hi = min(lo + self.batch_size, self.n)
        if self.world > 1:  # this rank's rows of the global batch (a last short batch splits unevenly)
            per = -(-(hi - lo) // self.world)
            lo, hi = min(lo + self.rank * per, hi), min(lo + (self.rank + 1) * per, hi)
        return lo, hi

    def batch_labels(self, epoch: int, index: int) -> torch.Tensor:
        """The class labels (int64 (B,), on the device) of the images of :meth:`batch` (same arguments)."""
        if self.labels is None:
            raise ValueError("this loader has no labels")
        lo, hi = self._rows(epoch, index)
        return self.labels.index_select(0, self._perm[lo:hi]).to(self.device, non_blocking=True)

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        """Batch ``index`` of ``epoch`` (this rank's share of it): float32 (B, C, H, W) in [-1, 1]."""
        lo, hi = self._rows(epoch, index)
        idx = self._perm[lo:hi]
        if self.placement == "device":
            x = self.images.index_select(0, idx)
        else:
            staged = torch.empty((hi - lo, *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            torch.index_select(self.images, 0, idx, out=staged)
            x = staged.to(self.device, non_blocking=True)
        if self.flip:
            f = self._flips[lo:hi].view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(3), x)
        return to_unit_range(x)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches ``start .. steps_per_epoch - 1`` of ``epoch``."""
        for i in range(start, self.steps_per_epoch):
            yield self.batch(epoch, i)
