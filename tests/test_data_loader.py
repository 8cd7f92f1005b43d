"""DeviceLoader: batches are pure functions of (seed, epoch, index), scaled to [-1, 1], flipped horizontally."""

from __future__ import annotations

import pytest
import torch

from ddpmctl.data.loader import DeviceLoader, epoch_permutation, to_unit_range

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


def _images(n=200, c=3, s=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)


def test_epoch_permutation_pure_and_varies():
    a = epoch_permutation(1000, seed=1, epoch=3)
    assert a.dtype == torch.long and a.device.type == "cpu"
    assert torch.equal(a, epoch_permutation(1000, seed=1, epoch=3))
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, epoch_permutation(1000, seed=1, epoch=4))
    assert not torch.equal(a, epoch_permutation(1000, seed=2, epoch=3))


def test_steps_per_epoch():
    x = _images(10)
    assert DeviceLoader(x, 4, "cpu", seed=0).steps_per_epoch == 2
    assert DeviceLoader(x, 4, "cpu", seed=0, drop_last=False).steps_per_epoch == 3
    small = DeviceLoader(x[:3], 8, "cpu", seed=0)
    assert small.steps_per_epoch == 1 and small.batch(0, 0).shape == (3, 3, 8, 8)
    assert len(DeviceLoader(x, 5, "cpu", seed=0)) == 2


def test_batch_is_pure_function_of_seed_epoch_index():
    x = _images()
    a = DeviceLoader(x, 32, "cpu", seed=5)
    b = DeviceLoader(x, 32, "cpu", seed=5)
    ref = a.batch(2, 3)
    for e in range(4):  # visiting other epochs and batches first changes nothing
        list(b.epoch(e))
    assert torch.equal(b.batch(2, 3), ref)
    assert torch.equal(a.batch(2, 3), ref)
    assert not torch.equal(a.batch(2, 4), ref)
    assert not torch.equal(a.batch(3, 3), ref)
    assert not torch.equal(DeviceLoader(x, 32, "cpu", seed=6).batch(2, 3), ref)
    resumed = list(a.epoch(2, start=3))
    assert len(resumed) == a.steps_per_epoch - 3 and torch.equal(resumed[0], ref)


def test_range_dtype_and_exact_ends():
    x = _images()
    x[0] = 0
    x[1] = 255
    ld = DeviceLoader(x, 50, "cpu", seed=0, flip=False)
    batches = torch.cat(list(ld.epoch(0)))
    assert batches.dtype == torch.float32 and batches.shape == (200, 3, 8, 8)
    assert batches.min() == -1.0 and batches.max() == 1.0
    levels = torch.arange(256, dtype=torch.uint8)
    assert (to_unit_range(levels).double() - (levels.double() / 127.5 - 1)).abs().max() < 2e-7
    perm = epoch_permutation(200, 0, 0)
    assert torch.equal(batches, to_unit_range(x[perm]))


def test_flips_are_horizontal_and_about_half():
    n = 2000
    x = _images(n, c=1, s=6)
    ld = DeviceLoader(x, 100, "cpu", seed=9, flip=True)
    got = torch.cat(list(ld.epoch(1)))
    src = to_unit_range(x[epoch_permutation(n, 9, 1)])
    same = (got == src).flatten(1).all(1)
    hflip = (got == src.flip(3)).flatten(1).all(1)
    assert bool((same | hflip).all())  # every image is either unchanged or mirrored left-right
    assert not bool((got == src.flip(2)).flatten(1).all(1).any())  # never upside down
    frac = hflip.float().mean().item()
    assert 0.45 < frac < 0.55
    # Flip decisions differ between epochs.
    got2 = torch.cat(list(ld.epoch(2)))
    src2 = to_unit_range(x[epoch_permutation(n, 9, 2)])
    assert not torch.equal((got2 == src2.flip(3)).flatten(1).all(1), hflip)


def test_no_flip_when_disabled_and_placement_on_cpu():
    x = _images()
    ld = DeviceLoader(x, 20, "cpu", seed=0, flip=False)
    assert ld.placement == "device"
    perm = epoch_permutation(200, 0, 0)
    assert torch.equal(ld.batch(0, 1), to_unit_range(x[perm[20:40]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_bitwise_on_device_and_pinned(monkeypatch):
    import ddpmctl.data.loader as loader_mod

    x = _images(300, c=3, s=16)
    cpu = DeviceLoader(x, 64, "cpu", seed=3)
    gpu = DeviceLoader(x, 64, "cuda", seed=3)
    assert gpu.placement == "device" and gpu.images.device.type == "cuda"
    monkeypatch.setattr(loader_mod, "DEVICE_MEMORY_SHARE", 0.0)  # pretend the data does not fit
    pinned = DeviceLoader(x, 64, "cuda", seed=3)
    assert pinned.placement == "pinned-host" and pinned.images.is_pinned()
    for e, i in [(0, 0), (0, 3), (5, 2)]:
        ref = cpu.batch(e, i)
        for ld in (gpu, pinned):
            b = ld.batch(e, i)
            assert b.device.type == "cuda" and b.dtype == torch.float32
            assert torch.equal(b.cpu(), ref)


def test_batch_labels_follow_the_batch_rows():
    """Image i holds the value i % 256 and label i: every batch's labels name its own images, on every
    rank of a sharded loader too."""
    n = 96
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n, dtype=torch.int64)
    for shard in ((0, 1), (1, 2)):
        dl = DeviceLoader(images, 16, "cpu", seed=3, flip=False, shard=shard, labels=labels)
        for epoch, index in ((0, 0), (2, 5)):
            x = dl.batch(epoch, index)
            got = torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()
            assert torch.equal(dl.batch_labels(epoch, index), got)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images, 16, "cpu", seed=3, labels=labels[:5])
