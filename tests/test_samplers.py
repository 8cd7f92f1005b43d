"""Samplers against exact models: for Gaussian (and two-mode Gaussian) data the optimal denoiser is
closed-form, so every error left is the sampler's own."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from ddpmctl.diffusion import Schedule
from ddpmctl.errors import NonFiniteError, UsageError
from ddpmctl.samplers import (
    LAMBDA_MIN,
    PerImageNoise,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    dpm_solver_pp_sample,
    dpm_solver_timesteps,
    noise_chunk_steps,
    per_image_generators,
    randn_per_image,
    sample,
)

# The tests marked numerics run again with the AVX2 cap in .ci/run (issue 18); the others do not.
NUMERICS = pytest.mark.numerics

F64 = torch.float64
SHAPE = (1, 16, 16)  # 256 independent "pixels" per image; statistics pool over images and pixels
MU = torch.linspace(-0.3, 0.3, 256, dtype=F64).reshape(SHAPE)  # per-pixel data mean


def _ab(abar: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = abar[t.cpu()].to(x.device).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return ab.sqrt(), (1 - ab).sqrt()


def gaussian_model(s: Schedule, sd: float, prediction: str = "eps", mu: torch.Tensor = MU):
    """Exact predictor for x0 ~ N(mu, sd^2 I): E[eps|x_t] = b (x_t - a mu) / (a^2 sd^2 + b^2);
    for v, E[v|x_t] = a E[eps|x_t] - b E[x0|x_t] with E[x0|x_t] = mu + a sd^2 (x_t - a mu) / (a^2 sd^2 + b^2)."""
    abar = s.float64().alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a, b = _ab(abar, t, x)
        m = mu.to(x)
        den = a * a * sd * sd + b * b
        eps = b * (x - a * m) / den
        if prediction == "eps":
            return eps
        return a * eps - b * (m + a * sd * sd * (x - a * m) / den)

    return model


def mixture_model(s: Schedule, m: float, sd: float):
    """Exact eps predictor for x0 ~ 0.5 N(-m, sd^2) + 0.5 N(+m, sd^2) per pixel: the component posteriors
    weighted by their responsibilities w_k ∝ N(x_t; a mu_k, a^2 sd^2 + b^2)."""
    abar = s.float64().alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        a, b = _ab(abar, t, x)
        var = a * a * sd * sd + b * b
        logits = torch.stack([-((x - a * mk) ** 2) / (2 * var) for mk in (-m, m)])
        w = torch.softmax(logits, dim=0)
        return sum(w[k] * b * (x - a * mk) / var for k, mk in enumerate((-m, m)))

    return model


def exact_flow(s: Schedule, x_T: torch.Tensor, sd: float) -> torch.Tensor:
    """Where the probability-flow ODE takes x_T for Gaussian data (an affine map that keeps the standardised
    coordinate z), followed by the final x0 prediction at t = 0 that DDIM and DPM-Solver++ end with."""
    ab = s.float64().alphas_cumprod
    aT, bT, a0, b0 = ab[-1].sqrt(), (1 - ab[-1]).sqrt(), ab[0].sqrt(), (1 - ab[0]).sqrt()
    z = (x_T - aT * MU) / (aT**2 * sd**2 + bT**2).sqrt()
    return MU + sd * z * (a0 * sd / (a0**2 * sd**2 + b0**2).sqrt())


def draw(n: int, first_seed: int = 0, dtype: torch.dtype = F64):
    gens = per_image_generators(range(first_seed, first_seed + n), "cpu")
    return randn_per_image(gens, SHAPE, "cpu", dtype), gens


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


# --- randomness -------------------------------------------------------------------------------


@NUMERICS
def test_randn_per_image_depends_only_on_the_image_seed() -> None:
    batch = randn_per_image(per_image_generators([10, 11, 12], "cpu"), (3, 4, 4), "cpu")
    alone = randn_per_image(per_image_generators([11], "cpu"), (3, 4, 4), "cpu")
    assert batch.shape == (3, 3, 4, 4) and batch.dtype == torch.float32
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    as64 = randn_per_image(per_image_generators([11], "cpu"), (3, 4, 4), "cpu", F64)
    assert as64.dtype == F64 and torch.equal(as64[0].float(), alone[0])  # drawn in float32, then cast


# --- timesteps --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
@NUMERICS
def test_ddim_timesteps_are_distinct_descending_and_span_the_process(spacing: str, steps: int) -> None:
    ts = ddim_timesteps(1000, steps, spacing)  # type: ignore[arg-type]
    assert len(ts) == steps and ts[0] == 999
    assert all(a > b for a, b in pairwise(ts))
    if steps > 1:
        assert ts[-1] == 0


@NUMERICS
def test_ddim_timestep_spacings() -> None:
    uni = ddim_timesteps(1000, 10, "uniform")
    assert uni == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    quad = ddim_timesteps(1000, 50, "quadratic")
    gaps = [a - b for a, b in pairwise(quad)]
    assert gaps[0] > 10 * gaps[-1]  # denser near t = 0
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(UsageError, match="between 1 and T"):
            ddim_timesteps(1000, bad)


@NUMERICS
def test_dpm_solver_timesteps(lin: Schedule, cos: Schedule) -> None:
    ts = dpm_solver_timesteps(lin, 10, "logSNR")
    assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0
    lam = (0.5 * lin.log_snr[ts]).tolist()
    steps = [b - a for a, b in pairwise(lam)]
    assert max(steps) / min(steps) < 1.1  # evenly spaced in log-SNR up to rounding to integers
    assert dpm_solver_timesteps(lin, 10, "time_uniform") == ddim_timesteps(1000, 10, "uniform")
    # cosine: the clipped last beta makes lambda jump near t = T-1; rounding collisions are pushed apart
    for n in (10, 25, 100):
        ts = dpm_solver_timesteps(cos, n)
        assert len(ts) == n and ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in pairwise(ts))


@NUMERICS
def test_dpm_solver_logsnr_steps_skip_the_signal_free_end_of_the_cosine_schedule(lin: Schedule, cos: Schedule) -> None:
    """lambda(T-1) of the cosine schedule is -9.9 (-5.1 at t = 995): evenly spaced over the whole range, 7 of
    20 steps fell at t >= 993 (alpha < 0.01). Below LAMBDA_MIN only the first step remains (at T-1)."""
    lam = 0.5 * cos.log_snr
    assert float(lam[-1]) < LAMBDA_MIN < float(lam[995])
    whole = dpm_solver_timesteps(cos, 20, lambda_min=None)
    assert sum(t >= 993 for t in whole) == 7
    for n in (10, 20):
        ts = dpm_solver_timesteps(cos, n)
        assert ts[0] == 999 and sum(t >= 993 for t in ts) == 1 and float(lam[ts[1]]) > LAMBDA_MIN, ts
        steps = [float(lam[b] - lam[a]) for a, b in pairwise(ts[1:])]
        assert max(steps) / min(steps) < 1.5, (ts, steps)  # evenly spaced above LAMBDA_MIN, up to rounding
    assert float(lam[dpm_solver_timesteps(cos, 100)[1]]) > LAMBDA_MIN
    # the linear schedule's lambda(T-1) = -5.06 is above the threshold: unchanged
    assert float(0.5 * lin.log_snr[-1]) > LAMBDA_MIN
    assert dpm_solver_timesteps(lin, 20) == dpm_solver_timesteps(lin, 20, lambda_min=None)


# --- deterministic samplers against the exact probability-flow map ----------------------------


@pytest.mark.parametrize(
    "sampler,spacing,step_counts,final_tol",
    [
        ("ddim", "uniform", (25, 50, 100), 0.08),  # first order: the error halves when steps double
        ("ddim", "quadratic", (25, 50, 100), 0.04),
        ("dpm-solver++", "logSNR", (10, 25, 100), 2e-3),  # second order
        ("dpm-solver++", "time_uniform", (10, 25, 100), 0.05),
    ],
)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@NUMERICS
def test_deterministic_samplers_converge_to_the_exact_flow(
    lin: Schedule, sampler: str, spacing: str, step_counts: tuple[int, ...], final_tol: float, prediction: str
) -> None:
    sd = 0.4
    x_T, gens = draw(48)
    exact = exact_flow(lin, x_T, sd)
    model = gaussian_model(lin, sd, prediction)
    errors = []
    for steps in step_counts:
        if sampler == "ddim":
            x = ddim_sample(
                model, lin, x_T, gens, steps=steps, prediction=prediction, clip_denoised=False, spacing=spacing
            )  # type: ignore[arg-type]
        else:
            x = dpm_solver_pp_sample(model, lin, x_T, gens, steps=steps, spacing=spacing, prediction=prediction, clip_denoised=False)  # type: ignore[arg-type]
        assert x.dtype == F64 and x.shape == x_T.shape
        errors.append(float((x - exact).abs().max()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < final_tol, errors
    if sampler == "ddim":
        assert errors[2] < 0.6 * errors[1], errors
    if spacing == "logSNR":
        assert errors[2] < errors[1] / 8, errors  # 4x the steps, >= 8x smaller: better than first order


@NUMERICS
def test_v_and_eps_models_give_the_same_samples(cos: Schedule) -> None:
    """The same exact model in both parameterisations must give the same trajectory."""
    x_T, gens = draw(8)
    for fn, kw in ((ddim_sample, {"steps": 20, "clip_denoised": False}), (dpm_solver_pp_sample, {"steps": 15, "clip_denoised": False})):
        a = fn(gaussian_model(cos, 0.3, "eps"), cos, x_T, gens, prediction="eps", **kw)
        b = fn(gaussian_model(cos, 0.3, "v"), cos, x_T, gens, prediction="v", **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@NUMERICS
def test_dpm_solver_pp_on_cosine_schedule(cos: Schedule) -> None:
    sd = 0.4
    x_T, gens = draw(48)
    exact = exact_flow(cos, x_T, sd)
    errs = [
        float((dpm_solver_pp_sample(gaussian_model(cos, sd), cos, x_T, gens, steps=n, clip_denoised=False) - exact).abs().max())
        for n in (25, 100)
    ]
    assert errs[1] < errs[0] / 8 and errs[1] < 5e-3, errs


# --- sample statistics ------------------------------------------------------------------------


def _stats(x: torch.Tensor, sd: float) -> tuple[float, float]:
    """(mean error, relative std error) of x against N(MU, sd^2), pooled over images and pixels."""
    r = x - MU
    return float(r.mean()), float(r.std() / sd - 1)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@NUMERICS
def test_ddpm_reproduces_gaussian_data(kind: str) -> None:
    s, sd = Schedule.create(kind, 1000), 0.4
    x_T, gens = draw(64)
    x = ddpm_sample(gaussian_model(s, sd), s, x_T, gens, clip_denoised=False, variance="beta")
    mean_err, std_err = _stats(x, sd)
    # 16384 values: standard errors 0.003 (mean) and 0.6 % (std)
    assert abs(mean_err) < 0.012 and abs(std_err) < 0.02, (mean_err, std_err)
    # beta_tilde is the lower bound on the reverse variance (Ho sec. 3.2): slightly under-dispersed
    x_T, gens = draw(64)
    x = ddpm_sample(gaussian_model(s, sd), s, x_T, gens, clip_denoised=False, variance="beta_tilde")
    mean_err, small_err = _stats(x, sd)
    assert abs(mean_err) < 0.012 and -0.04 < small_err < 0.01, (mean_err, small_err)
    assert small_err < std_err


@NUMERICS
def test_ddim_eta1_with_all_steps_is_ddpm(lin: Schedule) -> None:
    """Song et al. 2021: eta = 1 over all T steps is the DDPM sampler with beta_tilde (and, here, the same draws)."""
    model = gaussian_model(lin, 0.4)
    x_T, gens = draw(4)
    a = ddpm_sample(model, lin, x_T, gens, clip_denoised=True)
    x_T, gens = draw(4)  # fresh generators with the same seeds
    b = ddim_sample(model, lin, x_T, gens, steps=1000, eta=1.0, clip_denoised=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    x_T, gens = draw(4)
    c = ddpm_sample(model, lin, x_T, gens, clip_denoised=True, variance="beta")
    assert not torch.allclose(a, c)  # the variance choice matters


@NUMERICS
def test_stochastic_ddim_and_all_samplers_reproduce_gaussian_data(lin: Schedule) -> None:
    sd = 0.4
    model = gaussian_model(lin, sd)
    results = {}
    for name, kw in [
        ("ddim eta=1 50", dict(steps=50, eta=1.0)),
        ("ddim eta=1 100", dict(steps=100, eta=1.0)),
        ("ddim eta=0 50", dict(steps=50)),
        ("ddim eta=0 100", dict(steps=100)),
    ]:
        x_T, gens = draw(64, first_seed=100)
        results[name] = _stats(ddim_sample(model, lin, x_T, gens, clip_denoised=False, **kw), sd)
    for name, kw in [
        ("dpm 10", dict(steps=10)),
        ("dpm 25", dict(steps=25)),
        ("dpm tu 10", dict(steps=10, spacing="time_uniform")),
        ("dpm tu 25", dict(steps=25, spacing="time_uniform")),
    ]:
        x_T, gens = draw(64, first_seed=100)
        results[name] = _stats(dpm_solver_pp_sample(model, lin, x_T, gens, clip_denoised=False, **kw), sd)
    for name, (mean_err, _) in results.items():
        assert abs(mean_err) < 0.012, (name, results)
    std = {k: abs(v[1]) for k, v in results.items()}
    # few-step DDIM loses variance; the loss shrinks with more steps
    assert std["ddim eta=1 100"] < std["ddim eta=1 50"] < 0.15, results
    assert std["ddim eta=0 100"] < std["ddim eta=0 50"] < 0.06, results
    assert std["dpm 25"] < std["dpm 10"] < 0.05, results
    # time-uniform steps are far too coarse where the noise level is small (as in the reference code)
    assert std["dpm 25"] < std["dpm tu 25"] < std["dpm tu 10"], results


@NUMERICS
def test_stochastic_dpm_solver_pp_first_order_steps_are_ddim_eta1(lin: Schedule) -> None:
    """SDE-DPM-Solver++ with eta = 1: a first-order step is the DDPM posterior step q(x_s | x_t, x0 = D), which is
    DDIM's eta = 1 step. With 3 steps every update is first order (the one into t = 0 too, for fewer than 10
    steps), so on the same timesteps the two samplers agree exactly, noise draws included."""
    model = gaussian_model(lin, 0.4)
    assert dpm_solver_timesteps(lin, 3, "time_uniform") == ddim_timesteps(1000, 3)
    x_T, gens = draw(4)
    a = dpm_solver_pp_sample(model, lin, x_T, gens, steps=3, spacing="time_uniform", eta=1.0, clip_denoised=False)
    x_T, gens = draw(4)
    b = ddim_sample(model, lin, x_T, gens, steps=3, eta=1.0, clip_denoised=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    x_T, gens = draw(4)
    c = dpm_solver_pp_sample(model, lin, x_T, gens, steps=3, spacing="time_uniform", clip_denoised=False)
    assert not torch.allclose(a, c)  # eta = 0 (the default) is the deterministic ODE solver
    with pytest.raises(UsageError, match="eta must be >= 0"):
        dpm_solver_pp_sample(model, lin, x_T, gens, eta=-0.5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@NUMERICS
def test_stochastic_dpm_solver_pp_reproduces_gaussian_data(kind: str) -> None:
    """eta = 1 samples the reverse SDE: random given x_T (the draws come from the image generators) and, for the
    exact model, distributed as the data, like DDPM, already with 20 steps."""
    s, sd = Schedule.create(kind, 1000), 0.4
    model = gaussian_model(s, sd)
    stats = {}
    for steps in (10, 20, 50):
        x_T, gens = draw(64, first_seed=200)
        x, nfe = sample("dpm-solver++", model, s, x_T, gens, steps=steps, eta=1.0, clip_denoised=False)
        assert nfe == steps
        stats[steps] = _stats(x.double(), sd)
    for steps, (mean_err, std_err) in stats.items():
        # 16384 values: standard errors 0.003 (mean) and 0.6 % (std). On the cosine schedule with the steps
        # spread over its whole log-SNR range, 10 steps gave a std 12 % too small and 20 steps 5 % too large.
        assert abs(mean_err) < 0.012 and abs(std_err) < 0.045, stats
    # the same x_T with other noise draws gives other samples, as with DDPM
    x_T, gens = draw(4)
    a, _ = sample("dpm-solver++", model, s, x_T, gens, eta=1.0)
    b, _ = sample("dpm-solver++", model, s, x_T, per_image_generators([100, 101, 102, 103], "cpu"), eta=1.0)
    assert float((a - b).abs().mean()) > 0.05


@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("ddpm", {"variance": "beta"}),
        ("ddim", {"steps": 100}),
        ("dpm-solver++", {"steps": 25}),
        ("dpm-solver++", {"steps": 25, "eta": 1.0}),
    ],
)
@NUMERICS
def test_two_mode_mixture_keeps_both_modes(lin: Schedule, sampler: str, kw: dict) -> None:
    m, sd = 0.5, 0.12
    x_T, gens = draw(64)
    x, nfe = sample(sampler, mixture_model(lin, m, sd), lin, x_T, gens, clip_denoised=False, **kw)  # type: ignore[arg-type]
    upper, lower = x[x > 0], x[x <= 0]
    frac = upper.numel() / x.numel()
    assert abs(frac - 0.5) < 0.02, frac  # 16384 values: standard error 0.004
    for mode, centre in ((upper, m), (lower, -m)):
        assert abs(float(mode.mean()) - centre) < 0.02
        assert abs(float(mode.std()) / sd - 1) < 0.1, float(mode.std())


# --- batch independence, NaN guard, dispatcher ------------------------------------------------


@pytest.mark.parametrize(
    "sampler,kw",
    [
        ("ddpm", {}),
        ("ddim", {"steps": 20, "eta": 1.0}),
        ("ddim", {"steps": 20}),
        ("dpm-solver++", {"steps": 10}),
        ("dpm-solver++", {"steps": 10, "eta": 1.0}),
    ],
)
@NUMERICS
def test_an_image_depends_on_its_seed_not_its_batch(lin: Schedule, sampler: str, kw: dict) -> None:
    model = gaussian_model(lin, 0.4)
    outs = []
    for seeds in ([10, 11, 12], [11]):
        gens = per_image_generators(seeds, "cpu")
        x_T = randn_per_image(gens, SHAPE, "cpu")
        x, _ = sample(sampler, model, lin, x_T, gens, **kw)  # type: ignore[arg-type]
        assert x.dtype == torch.float32
        outs.append(x)
    torch.testing.assert_close(outs[0][1], outs[1][0], rtol=0, atol=1e-6)
    assert not torch.allclose(outs[0][0], outs[0][1])


def _nan_after(t_bad: int):
    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        out = torch.zeros_like(x)
        return out + float("nan") if int(t[0]) <= t_bad else out

    return model


@pytest.mark.parametrize("sampler,kw", [("ddpm", {}), ("ddim", {"steps": 200}), ("dpm-solver++", {"steps": 20})])
@NUMERICS
def test_non_finite_samples_raise_naming_the_step(lin: Schedule, sampler: str, kw: dict) -> None:
    x_T, gens = draw(2, dtype=torch.float32)
    with pytest.raises(NonFiniteError, match=rf"NaN/Inf at step t=\d+ \({sampler}"):
        sample(sampler, _nan_after(10_000), lin, x_T, gens, **kw)  # type: ignore[arg-type]
    # NaN from t = 537 on is reported at the first check after it, within 50 steps
    with pytest.raises(NonFiniteError) as info:
        sample(sampler, _nan_after(537), lin, x_T, gens, **kw)  # type: ignore[arg-type]
    reported = int(str(info.value).split("t=")[1].split(" ")[0])
    ts = {
        "ddpm": list(range(999, -1, -1)),
        "ddim": ddim_timesteps(1000, 200),
        "dpm-solver++": dpm_solver_timesteps(lin, 20),
    }[sampler]
    first_bad = next(i for i, t in enumerate(ts) if t <= 537)
    assert reported in ts[first_bad : first_bad + 50], (reported, str(info.value))


@NUMERICS
def test_dispatcher_counts_evaluations_clamps_and_calls_back(lin: Schedule) -> None:
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        calls.append(int(t[0]))
        return -10 * torch.ones_like(x, dtype=torch.bfloat16)  # x0 prediction far outside [-1, 1]

    gens = per_image_generators([0, 1], "cpu")
    x_T = randn_per_image(gens, (3, 4, 4), "cpu")
    for name, steps, expected in (
        ("ddpm", None, 1000),
        ("ddim", 7, 7),
        ("dpm-solver++", 5, 5),
        ("ddim", None, 50),
        ("dpm-solver++", None, 20),
    ):
        calls.clear()
        seen = []
        cb = lambda i, n, x, x0, seen=seen: seen.append((i, n, x.dtype, x0.shape))  # noqa: E731
        x, nfe = sample(name, model, lin, x_T, gens, steps=steps, callback=cb)  # type: ignore[arg-type]
        assert nfe == expected == len(calls) == len(seen)
        assert [c[0] for c in seen] == list(range(expected)) and {c[1] for c in seen} == {expected}
        assert seen[0][2] == torch.float32 and seen[0][3] == x_T.shape
        assert calls[0] == 999 and calls[-1] == 0
        assert x.dtype == torch.float32 and float(x.abs().max()) <= 1.0 and float(x.max()) == 1.0
    with pytest.raises(UsageError, match="unknown sampler"):
        sample("euler", model, lin, x_T, gens)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="all T = 1000 steps"):
        sample("ddpm", model, lin, x_T, gens, steps=50)
    with pytest.raises(ValueError, match="generators"):
        sample("ddim", model, lin, x_T, gens[:1])


@NUMERICS
def test_samplers_accept_a_float32_device_schedule(lin: Schedule) -> None:
    """Coefficients come from the float64 original, so a cast schedule gives the same samples."""
    model = gaussian_model(lin, 0.4)
    x_T, gens = draw(4, dtype=torch.float32)
    a, _ = sample("dpm-solver++", model, lin, x_T, gens, steps=10)
    b, _ = sample("dpm-solver++", model, lin.to("cpu", torch.float32), x_T, gens, steps=10)
    assert torch.equal(a, b)


# --- chunked noise ----------------------------------------------------------------------------


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


# --- classifier-free guidance -------------------------------------------------------------------


def class_gaussian_model(s: Schedule, sd: float, means: list[float], calls: list | None = None):
    """Exact predictor of a class-conditional model whose class c has data N(MU + means[c], sd^2 I); the
    last entry of ``means`` is the null (unconditional) branch's mean. ``calls`` records batch sizes."""

    def model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if calls is not None:
            calls.append(x.shape[0])
        labels = cond.labels if cond is not None else torch.full((x.shape[0],), len(means) - 1)
        mu = MU + torch.tensor(means, dtype=F64)[labels.cpu()].view(-1, 1, 1, 1)
        return gaussian_model(s, sd, mu=mu)(x, t)

    return model


@NUMERICS
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_guidance_moves_the_mean_as_the_closed_form_says(w):
    """With equal variances, (1 + w) eps_c - w eps_u is exactly the eps of N(mu_c + w (mu_c - mu_u), sd^2),
    so guided DDPM sampling lands there: w = 0 follows the class, w > 0 moves away from the unconditional
    mean by w times the gap, and the spread stays sd. Both branches run in one forward pass per step."""
    from ddpmctl.cond import Cond
    from ddpmctl.samplers import guided

    s = Schedule.create("cosine", 200)
    means, sd, n = [0.15, -0.15, 0.05], 0.1, 64  # class 0, class 1, null (all within [-1, 1]: no clamping)
    calls: list[int] = []
    fn = guided(class_gaussian_model(s, sd, means, calls), w, null_label=2)
    x_T, gens = draw(n)
    labels = torch.tensor([0, 1] * (n // 2))
    x, nfe = sample("ddpm", fn, s, x_T, gens, clip_denoised=False, cond=Cond(labels=labels))
    for c in (0, 1):
        expect = means[c] + w * (means[c] - means[2])
        got = x[labels == c] - MU
        assert abs(float(got.mean()) - expect) < 0.02, (c, float(got.mean()), expect)
        assert abs(float(got.std()) - sd) < 0.01
    assert len(calls) == nfe == 200
    assert set(calls) == {2 * n if w else n}  # one batched call: conditional and null rows together


@NUMERICS
def test_guided_images_do_not_depend_on_the_batch():
    """Image i of class c is the same drawn alone or among others (per-image seeds, per-image labels)."""
    from ddpmctl.cond import Cond
    from ddpmctl.samplers import guided

    s = Schedule.create("cosine", 50)
    fn = guided(class_gaussian_model(s, 0.2, [0.4, -0.4, 0.0]), 2.0, null_label=2)
    x_T, gens = draw(4)
    together, _ = sample("dpm-solver++", fn, s, x_T, gens, steps=10, eta=1.0, cond=Cond(labels=torch.tensor([0, 1, 1, 0])))
    x1, g1 = draw(1, first_seed=2)
    alone, _ = sample("dpm-solver++", fn, s, x1, g1, steps=10, eta=1.0, cond=Cond(labels=torch.tensor([1])))
    torch.testing.assert_close(together[2:3], alone, rtol=0, atol=1e-12)


def test_no_guidance_or_no_labels_is_one_plain_call():
    from ddpmctl.samplers import guided

    s = Schedule.create("cosine", 50)
    model = class_gaussian_model(s, 0.2, [0.4, 0.0])
    assert guided(model, 0.0, null_label=1) is model
    calls: list[int] = []
    fn = guided(class_gaussian_model(s, 0.2, [0.4, 0.0], calls), 3.0, null_label=1)
    x = torch.zeros(3, *SHAPE, dtype=F64)
    fn(x, torch.full((3,), 10), None)
    assert calls == [3]
