"""Diffusion maths against closed forms (float64 wherever it makes tolerances meaningful)."""

from __future__ import annotations

import math

import pytest
import torch

from ddpmctl.diffusion import (
    Schedule,
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    extract,
    make_betas,
    min_snr_weight,
    model_output_to_x0_eps,
    normal_kl,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    prior_bpd,
    q_posterior_mean_variance,
    q_sample,
    training_loss,
    training_target,
    v_from_x0_eps,
    vb_terms_bpd,
)

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

F64 = torch.float64


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def gaussian_eps_model(s: Schedule, mu: float, sd: float):
    """The exact eps predictor for data x0 ~ N(mu, sd^2 I): E[eps | x_t] = b (x_t - a mu) / (a^2 sd^2 + b^2)."""
    abar = s.float64().alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        ab = abar[t].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return b * (x - a * mu) / (a * a * sd * sd + b * b)

    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lin() -> Schedule:
    return Schedule.create("linear", 1000)


@pytest.fixture(scope="module")
def cos() -> Schedule:
    return Schedule.create("cosine", 1000)


# --- schedules --------------------------------------------------------------------------------


def test_cosine_alphas_cumprod_match_nichol_dhariwal_formula(cos: Schedule) -> None:
    T, s_off = 1000, 0.008
    f = lambda u: math.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    betas = make_betas("cosine", T)
    assert betas.dtype == F64 and betas.device.type == "cpu" and betas.shape == (T,)
    assert float(betas.max()) <= 0.999 and float(betas.min()) > 0
    clipped = (betas == 0.999).nonzero().flatten().tolist()
    assert clipped == [T - 1]  # only the singular last step is clipped
    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T - 1)], dtype=F64)
    torch.testing.assert_close(cos.alphas_cumprod[: T - 1], expected, rtol=1e-12, atol=1e-15)


def test_linear_endpoints_and_scaling() -> None:
    b = make_betas("linear", 1000)
    assert b.dtype == F64
    assert float(b[0]) == pytest.approx(1e-4, abs=1e-15) and float(b[-1]) == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64))
    b250 = make_betas("linear", 250)  # improved-diffusion scale = 1000 / T
    assert float(b250[0]) == pytest.approx(4e-4) and float(b250[-1]) == pytest.approx(0.08)
    with pytest.raises(ValueError, match="timesteps > 20"):
        make_betas("linear", 20)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 100)  # type: ignore[arg-type]


def test_schedule_fields_against_ho_definitions(lin: Schedule) -> None:
    T = lin.T
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "log_snr"):
        v = getattr(lin, name)
        assert v.shape == (T,) and v.dtype == F64 and torch.isfinite(v).all(), name
    # abar by an explicit running product, computed independently.
    abar, acc = [], 1.0
    for beta in lin.betas.tolist():
        acc *= 1 - beta
        abar.append(acc)
    torch.testing.assert_close(lin.alphas_cumprod, torch.tensor(abar, dtype=F64), rtol=1e-12, atol=0)
    assert float(lin.alphas_cumprod_prev[0]) == 1.0
    assert float(lin.posterior_variance[0]) == 0.0
    assert float(lin.posterior_log_variance_clipped[0]) == pytest.approx(math.log(float(lin.posterior_variance[1])))
    torch.testing.assert_close(lin.posterior_log_variance_clipped[1:], lin.posterior_variance[1:].log())
    torch.testing.assert_close(lin.log_snr, torch.log(lin.alphas_cumprod / (1 - lin.alphas_cumprod)))
    assert bool((lin.log_snr.diff() < 0).all())


@pytest.mark.parametrize("t", [1, 2, 10, 250, 500, 999])
def test_posterior_matches_product_of_gaussians(lin: Schedule, t: int) -> None:
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precision-weighted combination (Ho eq. 6-7)."""
    g = torch.Generator().manual_seed(t)
    x0, xt = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    beta, abar_prev = float(lin.betas[t]), float(lin.alphas_cumprod[t - 1])
    prec = (1 - beta) / beta + 1 / (1 - abar_prev)
    var = 1 / prec
    mean = var * (math.sqrt(1 - beta) / beta * xt + math.sqrt(abar_prev) / (1 - abar_prev) * x0)
    m, v, logv = q_posterior_mean_variance(lin, x0, xt, _t(t, t, t))
    assert v.shape == (3, 1, 1, 1)
    torch.testing.assert_close(m, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, torch.full_like(v, var), rtol=1e-10, atol=0)
    torch.testing.assert_close(logv, torch.full_like(v, math.log(var)), rtol=1e-10, atol=0)


def test_schedule_to_casts_from_float64_and_keeps_values(lin: Schedule) -> None:
    s32 = lin.to("cpu")
    assert s32.dtype == torch.float32 and s32.T == lin.T and s32.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(s32.alphas_cumprod, lin.alphas_cumprod.float(), rtol=0, atol=0)
    torch.testing.assert_close(s32.posterior_log_variance_clipped, lin.posterior_log_variance_clipped.float())
    assert s32.float64() is lin
    back = s32.to("cpu", F64)  # cast from the float64 original, not from the float32 copy
    for name in ("betas", "alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef2"):
        assert torch.equal(getattr(back, name), getattr(lin, name)), name


def test_extract_shape_and_values(lin: Schedule) -> None:
    out = extract(lin.sqrt_alphas_cumprod, _t(0, 5, 999), 4)
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [lin.sqrt_alphas_cumprod[i].item() for i in (0, 5, 999)]


# --- forward process and parameterisations ----------------------------------------------------


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_statistics(cos: Schedule, t: int) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 16, dtype=F64).reshape(1, 1, 4, 4).expand(20000, 1, 4, 4)
    xt = q_sample(cos, x0, torch.full((20000,), t), torch.randn(x0.shape, generator=g, dtype=F64))
    a, var = math.sqrt(float(cos.alphas_cumprod[t])), 1 - float(cos.alphas_cumprod[t])
    se = math.sqrt(var / 20000)
    torch.testing.assert_close(xt.mean(0), a * x0[0], rtol=0, atol=5 * se)
    torch.testing.assert_close(xt.var(0), torch.full_like(x0[0], var), rtol=0.05, atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_eps_x0_v_round_trips(kind: str, dtype: torch.dtype, tol: float) -> None:
    s = Schedule.create(kind, 1000).to("cpu", dtype)
    g = torch.Generator().manual_seed(1)
    t = _t(0, 1, 100, 500, 900)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=dtype)
    xt = q_sample(s, x0, t, eps)
    assert xt.dtype == dtype
    v = v_from_x0_eps(s, x0, t, eps)
    # x0 from eps is ill-conditioned where abar -> 0 (the error is multiplied by 1/sqrt(abar)).
    scale = extract(s.sqrt_recip_alphas_cumprod, t, 4)
    torch.testing.assert_close(predict_x0_from_eps(s, xt, t, eps), x0, rtol=0, atol=tol * float(scale.max()))
    torch.testing.assert_close(predict_eps_from_x0(s, xt, t, x0), eps, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(predict_x0_from_v(s, xt, t, v), x0, rtol=0, atol=tol)
    torch.testing.assert_close(predict_eps_from_v(s, xt, t, v), eps, rtol=0, atol=tol)
    for pred, out in (("v", v), ("eps", eps)):
        x0_hat, eps_hat = model_output_to_x0_eps(s, xt, t, out, pred)  # type: ignore[arg-type]
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=tol * 10)
    with pytest.raises(ValueError, match="prediction"):
        model_output_to_x0_eps(s, xt, t, v, "x0")  # type: ignore[arg-type]


# --- training loss ----------------------------------------------------------------------------


def test_training_loss_targets_shape_and_dtype(lin: Schedule) -> None:
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = _t(0, 10, 500, 999)
    s32 = lin.to("cpu")
    perfect_eps = training_loss(lambda x, tt, cond=None: noise, s32, x0, t, noise, "eps")
    assert perfect_eps.shape == (4,) and float(perfect_eps.abs().max()) == 0.0
    v = training_target(s32, x0, t, noise, "v")
    assert float(training_loss(lambda x, tt, cond=None: v, s32, x0, t, noise, "v").abs().max()) == 0.0
    # bf16 model output (autocast): the loss is still computed and returned in float32.
    loss = training_loss(lambda x, tt, cond=None: torch.zeros_like(x, dtype=torch.bfloat16), s32, x0, t, noise, "eps")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, noise.square().flatten(1).mean(1))
    # v-loss with a zero output equals |v|^2, and v differs from eps except at abar = 1.
    zero_v = training_loss(lambda x, tt, cond=None: torch.zeros_like(x), s32, x0, t, noise, "v")
    torch.testing.assert_close(zero_v, v.square().flatten(1).mean(1))


@pytest.mark.parametrize("t", [50, 300, 700])
def test_training_loss_of_exact_model_is_posterior_variance(lin: Schedule, t: int) -> None:
    """For x0 ~ N(mu, sd^2): E||eps - E[eps|x_t]||^2 per dim = Var(eps | x_t) = a^2 sd^2 / (a^2 sd^2 + b^2)."""
    mu, sd = 0.2, 0.3
    g = torch.Generator().manual_seed(t)
    x0 = mu + sd * torch.randn(2000, 1, 8, 8, generator=g, dtype=F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    loss = training_loss(gaussian_eps_model(lin, mu, sd), lin, x0, torch.full((2000,), t), noise)
    ab = float(lin.alphas_cumprod[t])
    expected = ab * sd**2 / (ab * sd**2 + 1 - ab)
    assert float(loss.mean()) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_matches_closed_form(kind: str, prediction: str) -> None:
    """min(SNR, 5) / SNR for eps and min(SNR, 5) / (SNR + 1) for v, SNR = abar / (1 - abar), all t."""
    s = Schedule.create(kind, 1000)
    t = torch.arange(1000)
    abar = s.alphas_cumprod
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction == "eps" else snr + 1)
    got = min_snr_weight(s, t, prediction, 5.0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    assert bool((got > 0).all()) and bool((got <= 1).all())
    # float32 schedule (as training uses it): finite at both ends, no overflow at t = 0 or 0/0 at t = T
    got32 = min_snr_weight(s.to("cpu"), t, prediction, 5.0)
    assert bool(torch.isfinite(got32).all())
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_min_snr_times_x0_error(cos: Schedule, prediction: str) -> None:
    """Hang et al.'s definition: the weighted loss equals min(SNR, gamma) x ||x0_hat - x0||^2, whichever
    the network predicts (x0_hat from the network's output through the usual conversion)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 1, 8, 8, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    out = torch.randn(x0.shape, generator=g, dtype=F64)
    t = _t(0, 3, 100, 500, 900, 999)
    gamma = 5.0
    loss = training_loss(lambda x, tt, cond=None: out, cos, x0, t, noise, prediction, min_snr_gamma=gamma)
    x0_hat, _ = model_output_to_x0_eps(cos, q_sample(cos, x0, t, noise), t, out, prediction)
    snr = cos.alphas_cumprod[t] / (1 - cos.alphas_cumprod[t])
    expected = snr.clamp(max=gamma) * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=0)
    # gamma None: L_simple, bitwise what it was
    plain = training_loss(lambda x, tt, cond=None: out, cos, x0, t, noise, prediction)
    assert torch.equal(plain, training_loss(lambda x, tt, cond=None: out, cos, x0, t, noise, prediction, None, None))
    assert not torch.equal(plain, loss)


# --- bits/dim ---------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(m1, (0.5 * lv1).exp()), N(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, math.log(0.01)), (0.37, math.log(0.2)), (-0.999, math.log(0.003)), (0.9, 0.0)]
)
def test_discretized_gaussian_is_a_distribution_over_256_levels(mean: float, log_scale: float) -> None:
    x = torch.arange(256, dtype=F64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # an inner bin is the Gaussian mass of [x - 1/255, x + 1/255]
    k = 200
    d = torch.distributions.Normal(torch.tensor(mean, dtype=F64), torch.tensor(math.exp(log_scale), dtype=F64))
    mass = d.cdf(x[k] + 1 / 255) - d.cdf(x[k] - 1 / 255)
    assert float(logp[k].exp()) == pytest.approx(float(mass), rel=1e-9, abs=2e-12)  # floor 1e-12


@pytest.mark.parametrize("x,mean", [(1.0, -0.9), (-1.0, 0.9)])
def test_discretized_gaussian_edge_bins_are_floored_like_inner_bins(x: float, mean: float) -> None:
    # a saturated pixel (x = +-1) under a far decoder mean: the unfloored edge bin cost about -17,982
    # nats (log_ndtr of -189.6 sigma); improved-diffusion floors every bin at 1e-12, i.e. -27.63 nats
    xs = torch.tensor([x, 0.5], dtype=F64)
    means = torch.tensor([mean, 0.5 + 1.9 * (1 if mean > 0 else -1)], dtype=F64)  # an inner bin as far off
    logp = discretized_gaussian_log_likelihood(xs, means, torch.full_like(xs, math.log(0.01)))
    assert float(logp[0]) == pytest.approx(math.log(1e-12), rel=1e-12)
    assert float(logp[0]) == float(logp[1])  # edge and inner bins share the floor


def test_prior_bpd_is_kl_to_standard_normal(lin: Schedule) -> None:
    x0 = torch.linspace(-1, 1, 32, dtype=F64).reshape(2, 1, 4, 4)
    a, b = lin.sqrt_alphas_cumprod[-1], lin.sqrt_one_minus_alphas_cumprod[-1]
    N = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(N(a * x0, b.expand_as(x0)), N(torch.zeros_like(x0), torch.ones_like(x0)))
    torch.testing.assert_close(prior_bpd(lin, x0), kl.flatten(1).mean(1) / math.log(2))
    assert float(prior_bpd(lin, x0).max()) < 1e-4  # x_T carries almost no information about x0


@pytest.mark.parametrize("t", [1, 5, 50, 400])
def test_vb_kl_terms_of_exact_gaussian_model(lin: Schedule, t: int) -> None:
    """E[L_t] = coef1^2 Var(x0|x_t) / (2 beta_tilde_t) nats/dim, Var(x0|x_t) = sd^2 b^2 / (a^2 sd^2 + b^2)."""
    mu, sd, B = 0.1, 0.3, 512
    g = torch.Generator().manual_seed(t)
    x0 = mu + sd * torch.randn(B, 1, 8, 8, generator=g, dtype=F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    terms = vb_terms_bpd(gaussian_eps_model(lin, mu, sd), lin, x0, torch.full((B,), t), noise, clip_x0=False)
    ab = float(lin.alphas_cumprod[t])
    var_x0 = sd**2 * (1 - ab) / (ab * sd**2 + 1 - ab)
    expected = float(lin.posterior_mean_coef1[t]) ** 2 * var_x0 / (2 * float(lin.posterior_variance[t])) / math.log(2)
    assert terms.shape == (B,)
    assert float(terms.mean()) == pytest.approx(expected, rel=0.03)


def test_decoder_term_improves_as_x0_prediction_approaches_data(lin: Schedule) -> None:
    g = torch.Generator().manual_seed(4)
    x0 = (torch.randint(0, 256, (8, 1, 8, 8), generator=g) / 127.5 - 1).to(F64)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    t0 = torch.zeros(8, dtype=torch.long)
    nll = []
    for err in (0.1, 0.02, 0.005, 0.0):
        # a model whose x0 prediction is off by `err` at t = 0
        model = lambda x, t, cond=None, err=err: predict_eps_from_x0(lin, x, t, x0 + err)  # noqa: E731
        nll.append(float(vb_terms_bpd(model, lin, x0, t0, noise).mean()))
    assert nll == sorted(nll, reverse=True) and nll[0] > nll[-1] + 1
    # perfect x0: -log2 of the mass of the +-1/255 bin under N(x0, beta_tilde_1)
    sd = math.sqrt(float(lin.posterior_variance[1]))
    inner = -math.log2(math.erf((1 / 255) / (sd * math.sqrt(2))))
    assert nll[-1] <= inner + 1e-9 and nll[-1] > inner - 0.1  # edge bins (+-1) are a little likelier


def test_calc_bpd_loop_full_and_strided(lin: Schedule) -> None:
    mu, sd = 0.1, 0.3
    g = torch.Generator().manual_seed(5)
    x = mu + sd * torch.randn(64, 1, 8, 8, generator=g, dtype=F64)
    x0 = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # 8-bit data
    model = gaussian_eps_model(lin, mu, sd)
    full = calc_bpd_loop(model, lin, x0, generator=torch.Generator().manual_seed(0), clip_x0=False)
    assert full["stride"] == 1
    for key in ("total", "prior", "decoder", "kl"):
        assert full[key].shape == (64,) and torch.isfinite(full[key]).all(), key
    torch.testing.assert_close(full["total"], full["prior"] + full["kl"] + full["decoder"])
    # The bound is at least the entropy of the 8-bit data, h(N(mu, sd^2)) - log(bin width), and the
    # exact Gaussian model keeps it within about a bit of it (fixed-variance DDPM bound).
    entropy = 0.5 * math.log2(2 * math.pi * math.e * sd**2) - math.log2(2 / 255)
    total = float(full["total"].mean())
    assert entropy < total < entropy + 1.2
    strided = calc_bpd_loop(model, lin, x0, generator=torch.Generator().manual_seed(1), stride=10, clip_x0=False)
    assert strided["stride"] == 10
    assert float(strided["total"].mean()) == pytest.approx(total, rel=0.03)
    assert float(strided["kl"].mean()) == pytest.approx(float(full["kl"].mean()), rel=0.04)
