import math

import pytest
import torch
import torch.nn.functional as F

from ddpmctl import spec as S
from ddpmctl.unet import Attention, ResBlock, build, count_parameters, timestep_embedding
from conftest import randomise

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

F64 = torch.float64


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


# -------------------------------------------------------------------- the network's fast formulations


def _ref_resblock(b: ResBlock, x, emb):
    """The plain formulation: skip(x) + conv2(silu((1 + scale) * GN(conv1(silu(GN(x)))) + shift))."""
    h = b.conv1(F.silu(b.norm1(x)))
    scale, shift = b.emb(emb)[:, :, None, None].chunk(2, dim=1)
    h = b.norm2(h) * (1 + scale) + shift
    return b.skip(x) + b.conv2(F.silu(h))


def _ref_attention(a: Attention, x):
    """The plain formulation with 1x1 convolutions over (B, C, H, W)."""
    b, c, hgt, wid = x.shape
    qkv = a.qkv(a.norm(x)).reshape(b, 3, a.heads, c // a.heads, hgt * wid)
    q, k, v = qkv.transpose(-1, -2).unbind(1)
    h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hgt, wid)
    return x + a.proj(h)


@pytest.mark.parametrize("in_ch, out_ch", [(16, 16), (16, 32)])
def test_resblock_matches_plain_formulation_forward_and_backward(in_ch, out_ch):
    blk = randomise(ResBlock(in_ch, out_ch, 24, 0.0, 8)).to(F64)
    x = torch.randn(3, in_ch, 8, 8, dtype=F64, requires_grad=True)
    emb = torch.randn(3, 24, dtype=F64)
    y, y_ref = blk(x, emb), _ref_resblock(blk, x, emb)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *blk.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *blk.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # inference takes the in-place path
        torch.testing.assert_close(blk(x, emb), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_token_path_matches_convolutions(channels_last):
    att = randomise(Attention(32, 8, 8)).to(F64)
    x = torch.randn(2, 32, 6, 5, dtype=F64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y, y_ref = att(xin), _ref_attention(att, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, [x, *att.parameters()], g),
                    torch.autograd.grad(y_ref, [x, *att.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channels_last_network_matches_default_layout_on_cpu():
    sp = S.resolve("shapes").model
    net = randomise(build(sp)).eval()
    x = torch.randn(2, sp.channels, sp.image_size, sp.image_size)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref = net(x, t)
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def _conditional_spec(classes=("circle", "square", "triangle")):
    return S.resolve("shapes", sets=["model.conditional=true", f"model.classes={','.join(classes)}"]).model


def test_class_embedding_changes_the_output_and_the_null_class_is_the_default():
    """A conditional network: labels change the prediction, each image's by its own label only; no
    labels means the null class (the unconditional branch of guidance)."""
    from ddpmctl.cond import Cond

    sp = _conditional_spec()
    m = build(sp).eval()
    randomise(m)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = {c: m(x, t, Cond(labels=torch.full((3,), c))) for c in range(4)}
        plain = m(x, t, None)
        mixed = m(x, t, Cond(labels=torch.tensor([0, 2, 1])))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(plain, out[3])  # label 3 = the null class
    for i, c in enumerate([0, 2, 1]):
        torch.testing.assert_close(mixed[i], out[c][i])


def test_class_embedding_parameters_and_unconditional_refusal():
    from ddpmctl.cond import Cond

    cond_net, plain = build(_conditional_spec()), build(S.resolve("shapes").model)
    emb = S.resolve("shapes").model.time_embed_dim
    assert count_parameters(cond_net) - count_parameters(plain) == 4 * emb  # 3 classes + null
    with pytest.raises(ValueError, match="unconditional"):
        plain(torch.randn(1, 3, 32, 32), torch.tensor([1]), Cond(labels=torch.tensor([0])))
    no_names = S.resolve("shapes", sets=["model.conditional=true"]).model
    with pytest.raises(ValueError, match="class names"):
        build(no_names)
