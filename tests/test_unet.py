import math

import pytest
import torch

from ddpmctl import spec as S
from ddpmctl.unet import build, count_parameters, timestep_embedding

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


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


# ------------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p_and_is_unbiased(p):
    from ddpmctl.unet import Dropout

    torch.manual_seed(0)
    drop = Dropout(p).train()
    n = 1 << 20
    y = drop(torch.ones(n))
    kept = y != 0
    rate, se = float(kept.float().mean()), math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * se
    # every one of the four 16-bit lanes of a 64-bit draw is a full coin (a sign bit stuck at 0 in one
    # lane would keep that lane's elements always)
    for lane in range(4):
        assert abs(float(kept[lane::4].float().mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (n // 4))
    # kept elements carry exactly 1 / (1 - p) for the p used (1/65536 steps): E[y] = x
    p_used = round(p * 65536) / 65536
    assert torch.all(y[kept] == torch.tensor(1 / (1 - p_used)))
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_cpu_dropout_gradient_is_the_mask_and_draws_follow_the_seed():
    from ddpmctl.unet import Dropout

    drop = Dropout(0.1).train()
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = y.detach() / x.detach()
    torch.testing.assert_close(x.grad, g * mask)
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x).detach(), y.detach(), rtol=0, atol=0)  # same seed, same mask
    assert not torch.equal(drop(x), y)  # the generator moved on: a new mask
    xb = x.detach().bfloat16()
    assert drop(xb).dtype == torch.bfloat16
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
