"""The engine (ddpmctl.engine): the training step's bf16 autocast, the sampling function, and the
compile fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpmctl import bench
from ddpmctl import spec as S
from ddpmctl.devices import choose_precision
from ddpmctl.engine import _CompiledOrEager, make_sample_fn, maybe_compile
from ddpmctl.unet import build
from conftest import randomise

# The tests marked numerics run again with the AVX2 cap in .ci/run (issue 18); the others do not.
NUMERICS = pytest.mark.numerics


# ------------------------------------------------------------------------------ the training step


@NUMERICS
def test_bf16_training_on_cpu_tracks_fp32_and_keeps_fp32_master_weights():
    """The CPU's bf16 autocast step: same losses as fp32 within bf16 rounding, parameters, gradients
    and optimizer state stay float32, and the updates match fp32's direction."""
    cpu = torch.device("cpu")
    runs = {}
    for name in ("fp32", "bf16"):
        spec = bench.resolve_spec("shapes", cpu, 8, name)
        one_step, read, training = bench.ddpmctl_train_step(spec, cpu, choose_precision(name, cpu))
        start = [p.detach().clone() for p in training.model.parameters()]
        losses = []
        for _ in range(4):
            before = read()
            one_step()
            losses.append(read() - before)
        params = list(training.model.parameters())
        assert all(p.dtype == torch.float32 for p in params)
        assert all(v.dtype == torch.float32 for st in training.opt.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.is_floating_point())
        delta = torch.cat([(p.detach() - s0).flatten() for p, s0 in zip(params, start)])
        runs[name] = (torch.tensor(losses), delta)
    (l32, d32), (l16, d16) = runs["fp32"], runs["bf16"]
    assert torch.isfinite(l16).all()
    assert not torch.equal(d16, d32)  # bf16 really ran: its rounding shows in the updates
    torch.testing.assert_close(l16, l32, rtol=3e-2, atol=0)
    cos = float(F.cosine_similarity(d16, d32, dim=0))
    assert cos > 0.9, cos


# ------------------------------------------------------------------------------ sampling fast paths


@NUMERICS
def test_sample_fn_on_cpu_is_the_fp32_model():
    sp = S.resolve("shapes").model
    net = randomise(build(sp)).eval()
    x, t = torch.randn(2, sp.channels, sp.image_size, sp.image_size), torch.tensor([0, 999])
    fn = make_sample_fn(net, None, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t), net(x, t), rtol=0, atol=0)


@NUMERICS
def test_bf16_sample_fn_stays_within_bf16_tolerance_on_cpu_and_leaves_the_model_fp32():
    sp = S.resolve("shapes").model
    net = randomise(build(sp)).eval()
    x, t = torch.randn(2, sp.channels, sp.image_size, sp.image_size), torch.tensor([10, 500])
    fn = make_sample_fn(net, choose_precision("bf16", torch.device("cpu")), torch.device("cpu"))
    with torch.no_grad():
        out, ref = fn(x, t), net(x, t)
    assert out.dtype == torch.float32
    assert 0 < float((out - ref).norm() / ref.norm()) < 3e-2  # bf16 rounding, not fp32's exact result
    assert all(p.dtype == torch.float32 for p in net.parameters())  # sampling works on a copy


# ---------------------------------------------------------------------------------------- compile


def test_compile_off_returns_the_model_itself():
    net = torch.nn.Linear(2, 2)
    assert maybe_compile(net, "off", torch.device("cpu"), lambda e: None) is net
    assert maybe_compile(net, "auto", torch.device("cpu"), lambda e: None) is net  # auto = CUDA only


def test_compile_failure_falls_back_to_eager_and_says_why(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("backend exploded")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)  # the third-party boundary
    events = []
    net = torch.nn.Linear(3, 2)
    fwd = maybe_compile(net, "on", torch.device("cpu"), events.append)
    assert isinstance(fwd, _CompiledOrEager)
    x = torch.randn(4, 3)
    torch.testing.assert_close(fwd(x), net(x))
    torch.testing.assert_close(fwd(x), net(x))  # stays eager, warns once
    assert len(events) == 1 and events[0]["event"] == "warning"
    assert "backend exploded" in events[0]["message"] and "without compilation" in events[0]["message"]
    assert fwd.failed.startswith("RuntimeError")
