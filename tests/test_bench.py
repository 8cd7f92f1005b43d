"""`ddpmctl bench` runs and reports sane fields (never timings), and every speed-up computes the same
function as the plain formulation it replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ddpmctl import bench
from ddpmctl import spec as S
from ddpmctl.devices import auto_precision_name, choose_precision, cpu_has_native_bf16
from ddpmctl.samplers import PerImageNoise, noise_chunk_steps, per_image_generators, randn_per_image
from ddpmctl.engine import _CompiledOrEager, make_sample_fn, maybe_compile
from ddpmctl.unet import Attention, ResBlock, build

# The tests marked numerics run again with the AVX2 cap in .ci/run (issue 18); the CLI-output ones do not.
NUMERICS = pytest.mark.numerics

F64 = torch.float64

TINY_BENCH = ["--preset", "shapes", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--repeats", "1",
              "--warmup", "1", "--sample-batch-size", "2", "--sample-steps", "2"]


# ---------------------------------------------------------------------------------------------- bench


def test_bench_json_reports_sane_fields(cli):
    r = cli("bench", *TINY_BENCH, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    required = ["device", "preset", "batch_size", "train_images_per_s", "sample_ms_per_step",
                "sample_images_per_s_1000_steps", "flops_per_image_train", "peak_memory_bytes", "achieved_tflops",
                "mfu"]
    assert not [k for k in required if k not in out]
    assert out["device"] == "cpu" and out["preset"] == "shapes" and out["batch_size"] == 2
    auto = auto_precision_name(torch.device("cpu"))  # bf16 on CPUs with native bf16, else fp32
    assert out["sample_batch_size"] == 2 and out["precision"] == auto and out["compile"] is False
    assert out["train_images_per_s"] > 0 and out["sample_ms_per_step"] > 0
    # images/s of a 1000-step DDPM follows from ms per step and the batch
    assert out["sample_images_per_s_1000_steps"] == pytest.approx(2 / (out["sample_ms_per_step"] * 1e-3 * 1000))
    # backward costs about twice the forward
    assert 2.5 < out["flops_per_image_train"] / out["flops_per_image_forward"] < 3.5
    assert out["peak_memory_bytes"] > 10 * 2**20
    assert out["achieved_tflops"] == pytest.approx(out["train_images_per_s"] * out["flops_per_image_train"] / 1e12)
    assert out["matmul_peak_tflops"] > 0 and out["peak_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[auto]
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / out["matmul_peak_tflops"])
    assert out["parameters"] == sum(p.numel() for p in build(S.resolve("shapes").model).parameters())
    assert "training shapes" in r.stderr  # progress on stderr, the result alone on stdout


def test_bench_human_output_and_only(cli):
    r = cli("bench", *TINY_BENCH, "--only", "sample")
    assert r.returncode == 0, r.stderr
    assert "ms per step" in r.stdout and "1000-step DDPM" in r.stdout
    assert "training " not in r.stdout  # --only sample skips training


@pytest.mark.parametrize("tflops, shown", [(0.0213, "21.3 GFLOP/s"), (0.000456, "0.456 GFLOP/s"),
                                           (0.5, "500 GFLOP/s"), (1.0, "1.00 TFLOP/s"), (12.34, "12.3 TFLOP/s"),
                                           (987.6, "988 TFLOP/s"), (None, "n/a")])
def test_flop_rates_keep_three_significant_digits(tflops, shown):
    from ddpmctl.cli.bench import flop_rate

    assert flop_rate(tflops) == shown


def test_a_cpu_bench_report_shows_a_rate_that_agrees_with_its_utilisation():
    """0.02 TFLOP/s against a 0.5 TFLOP/s peak is 4 %: the line must not read "0.0 TFLOP/s, 4.0%"."""
    import re

    from ddpmctl.cli.bench import report_lines

    r = {"device_name": "cpu", "torch": "2", "precision": "fp32", "compile": False, "preset": "shapes",
         "parameters": 1e6, "flops_per_image_train": 3e7, "flops_per_image_forward": 1e7,
         "train_images_per_s": 666.7, "batch_size": 16, "train_step_ms": 24.0, "achieved_tflops": 0.02,
         "mfu": 0.04, "peak_memory_bytes": None, "peak_memory_kind": "n/a", "sample_ms_per_step": None,
         "matmul_peak_tflops": 0.5, "peak_dtype": "float32"}
    lines = report_lines(r)
    train = next(x for x in lines if x.startswith("training"))
    rate = float(re.search(r"([\d.]+) GFLOP/s", train).group(1))
    util = float(re.search(r"utilisation ([\d.]+)%", train).group(1))
    peak = float(re.search(r"([\d.]+) GFLOP/s", next(x for x in lines if x.startswith("matmul"))).group(1))
    assert rate == 20.0 and peak == 500.0 and util == pytest.approx(100 * rate / peak)
    assert "0.0300 GFLOP train" in lines[2]  # 3e7 FLOPs: not "0.0 GFLOP"


@pytest.mark.parametrize("args, message", [(["--preset", "nope"], "unknown preset 'nope'"),
                                           (["--only", "both"], "--only expects 'train' or 'sample'")])
def test_bench_usage_errors_exit_2(cli, args, message):
    r = cli("bench", *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_flops_per_image_match_the_ho_et_al_network():
    f = bench.model_flops_per_image(S.resolve("cifar10"))
    assert f["train"] == pytest.approx(37.3e9, rel=0.01)
    assert f["forward"] == pytest.approx(12.44e9, rel=0.01)


def test_bench_restores_global_flags():
    before = torch.are_deterministic_algorithms_enabled()
    bench.run("shapes", device="cpu", batch_size=2, steps=1, warmup=0, repeats=1, sample=False, peak=False)
    assert torch.are_deterministic_algorithms_enabled() == before


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


def _randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module


@NUMERICS
@pytest.mark.parametrize("in_ch, out_ch", [(16, 16), (16, 32)])
def test_resblock_matches_plain_formulation_forward_and_backward(in_ch, out_ch):
    blk = _randomise(ResBlock(in_ch, out_ch, 24, 0.0, 8)).to(F64)
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


@NUMERICS
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_token_path_matches_convolutions(channels_last):
    att = _randomise(Attention(32, 8, 8)).to(F64)
    x = torch.randn(2, 32, 6, 5, dtype=F64, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y, y_ref = att(xin), _ref_attention(att, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, [x, *att.parameters()], g),
                    torch.autograd.grad(y_ref, [x, *att.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@NUMERICS
def test_channels_last_network_matches_default_layout_on_cpu():
    sp = S.resolve("shapes").model
    net = _randomise(build(sp)).eval()
    x = torch.randn(2, sp.channels, sp.image_size, sp.image_size)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref = net(x, t)
        cl = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ sampling fast paths


@NUMERICS
def test_sample_fn_on_cpu_is_the_fp32_model():
    sp = S.resolve("shapes").model
    net = _randomise(build(sp)).eval()
    x, t = torch.randn(2, sp.channels, sp.image_size, sp.image_size), torch.tensor([0, 999])
    fn = make_sample_fn(net, None, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(fn(x, t), net(x, t), rtol=0, atol=0)


@NUMERICS
def test_bf16_sample_fn_stays_within_bf16_tolerance_on_cpu_and_leaves_the_model_fp32():
    sp = S.resolve("shapes").model
    net = _randomise(build(sp)).eval()
    x, t = torch.randn(2, sp.channels, sp.image_size, sp.image_size), torch.tensor([10, 500])
    fn = make_sample_fn(net, choose_precision("bf16", torch.device("cpu")), torch.device("cpu"))
    with torch.no_grad():
        out, ref = fn(x, t), net(x, t)
    assert out.dtype == torch.float32
    assert 0 < float((out - ref).norm() / ref.norm()) < 3e-2  # bf16 rounding, not fp32's exact result
    assert all(p.dtype == torch.float32 for p in net.parameters())  # sampling works on a copy


def _cpu_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@NUMERICS
def test_auto_precision_on_cpu_is_bf16_exactly_when_the_cpu_has_native_bf16():
    flags = _cpu_flags()
    if flags is None or "avx2" not in flags:
        pytest.skip("needs an x86 Linux CPU (/proc/cpuinfo flags)")
    # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA below AVX-512 (the restricted-ISA pass of .ci/run)
    # make this CPU act as one without bf16 arithmetic
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2") or \
        os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE")
    native = ("avx512_bf16" in flags or "amx_tile" in flags) and torch.backends.mkldnn.is_available() and not capped
    assert cpu_has_native_bf16() is native
    cpu = torch.device("cpu")
    assert auto_precision_name(cpu) == ("bf16" if native else "fp32")
    assert choose_precision("auto", cpu).autocast_dtype == (torch.bfloat16 if native else None)
    assert choose_precision("fp32", cpu).autocast_dtype is None  # the way back to full precision


@NUMERICS
@pytest.mark.parametrize("cap", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}])
def test_an_isa_cap_below_avx512_makes_auto_precision_fp32(cap):
    """Told to use AVX2 (as an older CPU would), auto must not pick bf16 that would then be emulated."""
    code = "import torch; from ddpmctl.devices import auto_precision_name as a; print(a(torch.device('cpu')))"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, **cap}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fp32"


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


@NUMERICS
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (1, 28, 28)])
def test_chunked_noise_equals_per_step_draws_on_cpu(shape):
    """Chunking the per-image draws leaves CPU samples unchanged (image sizes with 16k elements)."""
    steps = noise_chunk_steps(shape) + 3  # cross a chunk boundary
    seeds = [5, 9, 11]
    noise = PerImageNoise(per_image_generators(seeds, "cpu"), shape, "cpu")
    gens = per_image_generators(seeds, "cpu")
    for _ in range(steps):
        torch.testing.assert_close(noise.next(), randn_per_image(gens, shape, "cpu"), rtol=0, atol=0)


@NUMERICS
def test_chunked_noise_depends_on_the_image_seed_only():
    shape = (3, 5, 7)  # an odd size, where the chunked stream differs from per-step draws
    a = PerImageNoise(per_image_generators([1, 2, 3], "cpu"), shape, "cpu")
    b = PerImageNoise(per_image_generators([2], "cpu"), shape, "cpu")
    for _ in range(noise_chunk_steps(shape) + 2):
        torch.testing.assert_close(a.next()[1], b.next()[0], rtol=0, atol=0)


def test_noise_chunk_depends_on_image_size_only():
    assert noise_chunk_steps((3, 32, 32)) == 42 and noise_chunk_steps((3, 64, 64)) == 10
    assert noise_chunk_steps((3, 512, 512)) == 1 and noise_chunk_steps((1, 2, 2)) == 64


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


@NUMERICS
def test_generate_picks_a_batch_size_and_images_depend_only_on_their_seed():
    from ddpmctl.generate import generate
    from ddpmctl.modelfolder import Denoiser

    spec = S.resolve("shapes", sets=["model.base_channels=8", "model.groups=4", "model.head_channels=8",
                                     "model.time_embed_dim=16"])
    den = Denoiser(_randomise(build(spec.model)).eval(), spec, "test", None, "ema")
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


@NUMERICS
def test_ema_update_is_the_moving_average_and_holds_still_on_a_skipped_step():
    from ddpmctl.ema import EMA, ema_decay_at

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7, affine=True))
    ema = EMA(net, decay=0.9, warmup=True)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net, weight_scale=torch.tensor(0.0))  # a skipped step: the EMA does not move at all
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
    for scale in (torch.tensor(1.0), None):
        d = ema_decay_at(ema.num_updates, 0.9, True)
        want = {n: before[n].double() + (1 - d) * (p.detach().double() - before[n].double())
                for n, p in net.named_parameters()}
        ema.update(net, weight_scale=scale)
        for n in want:
            torch.testing.assert_close(ema.shadow[n].double(), want[n], rtol=0, atol=1e-6)
        before = {k: v.clone() for k, v in ema.shadow.items()}
    assert ema.num_updates == 3
