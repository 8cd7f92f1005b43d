"""ddpmctl.generate: batch sizing, per-image seeds and when sampling compiles."""

from __future__ import annotations

import pytest
import torch

from ddpmctl import spec as S
from ddpmctl.unet import build
from conftest import randomise

# The tests marked numerics run again with the AVX2 cap in .ci/run (issue 18); the others do not.
NUMERICS = pytest.mark.numerics


@NUMERICS
def test_generate_picks_a_batch_size_and_images_depend_only_on_their_seed():
    from ddpmctl.generate import generate
    from ddpmctl.modelfolder import Denoiser

    spec = S.resolve("shapes", sets=["model.base_channels=8", "model.groups=4", "model.head_channels=8",
                                     "model.time_embed_dim=16"])
    den = Denoiser(randomise(build(spec.model)).eval(), spec, "test", None, "ema")
    dev = torch.device("cpu")
    auto = list(generate(den, [3, 4, 5], sampler="ddim", steps=3, device=dev))
    assert [(start, imgs.shape[0]) for start, imgs, _ in auto] == [(0, 3)]  # auto: one batch on the CPU
    ones = torch.cat([imgs for _, imgs, _ in generate(den, [3, 4, 5], sampler="ddim", steps=3, eta=1.0,
                                                      batch_size=1, device=dev)])
    both = torch.cat([imgs for _, imgs, _ in generate(den, [3, 4, 5], sampler="ddim", steps=3, eta=1.0,
                                                      batch_size=2, device=dev)])
    assert torch.equal(ones, both)


def test_sampling_compiles_automatically_on_cuda_for_large_jobs_only_and_never_on_cpu():
    """Measured: compiling the CPU sampling network costs tens of seconds and gains nothing
    (docs/performance.md), so `auto` leaves the CPU eager however large the job."""
    from ddpmctl.generate import COMPILE_MIN_IMAGE_STEPS, compile_pays_off

    spec = S.resolve("mnist")
    big = COMPILE_MIN_IMAGE_STEPS // spec.diffusion.timesteps
    assert not compile_pays_off(spec, 100 * big, "ddpm", None, "cpu")
    assert compile_pays_off(spec, big, "ddpm", None, "cuda")
    assert not compile_pays_off(spec, big - 1, "ddpm", None, "cuda")
    assert not compile_pays_off(spec, big, "dpm-solver++", 20, "cuda")  # 20 evaluations, not 1000
