import pytest
import torch

from ddpmctl import spec as S
from ddpmctl.unet import build, count_parameters, timestep_embedding


@pytest.mark.parametrize("preset", ["shapes", "mnist", "cifar10"])
def test_shapes_per_preset(preset):
    sp = S.resolve(preset).model
    m = build(sp)
    x = torch.randn(2, sp.channels, sp.image_size, sp.image_size)
    y = m(x, torch.tensor([0, 999]))
    assert y.shape == x.shape


def test_celeba_shape_on_meta():
    sp = S.resolve("celeba").model
    with torch.device("meta"):
        m = build(sp)
        y = m(torch.empty(1, 3, 64, 64), torch.tensor([3]))
    assert y.shape == (1, 3, 64, 64)


def test_cifar10_is_ho_et_al_size():
    with torch.device("meta"):
        n = count_parameters(build(S.resolve("cifar10").model))
    assert abs(n - 35.7e6) / 35.7e6 < 0.03, n


def test_time_embedding_distinguishes_timesteps():
    e = timestep_embedding(torch.tensor([0, 1, 500]), 256)
    assert e.shape == (3, 256)
    assert (e[0] - e[1]).abs().max() > 1e-3 and (e[1] - e[2]).abs().max() > 1e-3


def test_output_depends_on_timestep_through_adaptive_groupnorm():
    sp = S.resolve("shapes").model
    torch.manual_seed(0)
    m = build(sp)
    for p in m.parameters():  # zero-initialised output convs would hide the dependence
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, sp.channels, sp.image_size, sp.image_size)
    assert (m(x, torch.tensor([10])) - m(x, torch.tensor([900]))).abs().max() > 1e-4


def test_odd_size_with_matching_levels():
    sp = S.resolve("mnist").model  # 28 -> 14 -> 7
    m = build(sp)
    assert m(torch.randn(1, 1, 28, 28), torch.tensor([5])).shape == (1, 1, 28, 28)
