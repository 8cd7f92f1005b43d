"""Sampling loops: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++(2M) (Lu et al. 2022) and
its stochastic form SDE-DPM-Solver++(2M) (eta > 0).

Each sampler is a pure function of (model_fn, schedule, x_T, generators): the caller draws x_T with
:func:`randn_per_image` from one generator per image seed, and every later random draw is made per
image from the same generators, so an image depends on its seed and not on the batch it was drawn in.

Conventions shared by all samplers:

* The network is called as ``model_fn(x_t, t, cond)`` (:mod:`ddpmctl.cond`; ``cond`` is handed
  through unchanged, None for an unconditional model) under ``torch.no_grad`` with the ORIGINAL
  discrete timestep index, a long
  tensor of shape (B,), even when a sampler skips steps.
* Per-step coefficients are Python floats computed from the float64 schedule
  (:meth:`Schedule.float64`), so the schedule handed in may live on any device in any dtype.
* ``x`` is kept in float32 (float64 if x_T is float64); the network output is cast to it (bf16 ok).
* Finiteness is checked every ``_CHECK_EVERY`` steps and at the end (one host sync each), raising
  :class:`~ddpmctl.errors.NonFiniteError` that names the timestep of the failed check.
* ``callback(step_index, num_steps, x, x0_pred)`` runs after every step with the updated sample and
  the x_0 prediction made during that step (step_index counts from 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ddpmctl.cond import Cond
from ddpmctl.diffusion import ModelFn, Prediction, Schedule, x0_eps_from_output
from ddpmctl.errors import NonFiniteError, UsageError
from ddpmctl.sampler_registry import REGISTRY, SAMPLERS, SamplerInfo, SamplerName, get_sampler

__all__ = [
    "SamplerCallback",
    "SamplerName",
    "SAMPLERS",
    "REGISTRY",
    "SamplerInfo",
    "SamplerName",
    "get_sampler",
    "per_image_generators",
    "randn_per_image",
    "PerImageNoise",
    "noise_chunk_steps",
    "ddpm_sample",
    "ddim_timesteps",
    "ddim_sample",
    "LAMBDA_MIN",
    "dpm_solver_timesteps",
    "dpm_solver_pp_sample",
    "sample",
    "guided",
]

SamplerCallback = Callable[[int, int, Tensor, Tensor], None]

_CHECK_EVERY = 50  # steps between finiteness checks (each one is a host-device sync)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance: a model_fn around a model_fn, so every sampler gets it unchanged
# ---------------------------------------------------------------------------------------------


def guided(model_fn: ModelFn, guidance: float, null_label: int) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a model function of the same interface:
    out = (1 + w) * f(x, t, c) - w * f(x, t, null), with w = ``guidance``.

    Applied to the network's own output (eps, or v: both are affine in x_t with the same x_t
    coefficient at a given t, so guiding v is guiding eps). The conditional and the unconditional
    branch run as one forward pass over the batch twice (labels, then the null label ``null_label``),
    so each image's output depends on its own inputs only, not on the batch around it. Calls without
    labels (or w = 0) go straight through: one evaluation, no guidance.
    """
    if guidance == 0:
        return model_fn

    def fn(x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.labels is None:
            return model_fn(x, t, cond)
        labels = cond.labels
        both = Cond(labels=torch.cat([labels, torch.full_like(labels, null_label)]))
        c, u = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return torch.lerp(u, c, 1.0 + guidance)  # u + (1 + w)(c - u) = (1 + w) c - w u

    return fn


# ---------------------------------------------------------------------------------------------
# Randomness: one generator per image
# ---------------------------------------------------------------------------------------------


def per_image_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One ``torch.Generator`` on ``device`` per image, seeded with that image's seed."""
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        gens.append(g)
    return gens


def randn_per_image(
    generators: Sequence[torch.Generator],
    shape_per_image: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Stack of ``torch.randn(shape_per_image)`` drawn from each generator, moved to ``device``.

    Image i depends only on generators[i]. Draws are made in float32 on the generator's device and
    then cast, so the values do not depend on ``dtype`` beyond rounding.
    """
    if len(generators) == 0:
        raise ValueError("randn_per_image needs at least one generator")
    shape = tuple(int(n) for n in shape_per_image)
    draws = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device=device, dtype=dtype)


# Per-image noise is drawn for several steps at once: one generator call per image per chunk of
# steps instead of per step (at batch 256, 256 small kernel launches per step cost as much as a
# quarter of a CIFAR-10 network evaluation on a fast GPU). The chunk length depends only on the
# image shape, never on the batch, so image i still depends only on its own generator. On the CPU
# one draw of (K, *shape) gives the same numbers as K draws of shape whenever the image has a
# multiple of 16 elements (every preset), so CPU samples are unchanged by the chunking.
_NOISE_CHUNK_BYTES = 512 * 1024  # per image
_NOISE_CHUNK_MAX = 64


def noise_chunk_steps(shape_per_image: Sequence[int]) -> int:
    """Steps of noise drawn per generator call: a function of the image shape alone."""
    numel = max(1, math.prod(int(n) for n in shape_per_image))
    return max(1, min(_NOISE_CHUNK_MAX, _NOISE_CHUNK_BYTES // (4 * numel)))


class PerImageNoise:
    """``next()`` returns the next (B, *shape) standard-normal draw, image i from generators[i].

    Draws ``noise_chunk_steps(shape)`` steps per generator call and hands them out one per call.
    """

    def __init__(self, generators: Sequence[torch.Generator], shape_per_image: Sequence[int],
                 device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.generators = list(generators)
        self.shape = tuple(int(n) for n in shape_per_image)
        self.device, self.dtype = device, dtype
        self.chunk = noise_chunk_steps(self.shape)
        self._buf: Tensor | None = None
        self._i = 0

    def next(self) -> Tensor:
        if self._buf is None or self._i == self._buf.shape[0]:
            draws = [torch.randn((self.chunk, *self.shape), generator=g, device=g.device, dtype=torch.float32)
                     for g in self.generators]
            self._buf = torch.stack(draws, dim=1).to(device=self.device, dtype=self.dtype)  # (K, B, *shape)
            self._i = 0
        z = self._buf[self._i]
        self._i += 1
        return z


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _prepare(x_T: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    if len(generators) != x_T.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x_T.shape[0]} images")
    return x_T if x_T.dtype in (torch.float32, torch.float64) else x_T.float()


def _predict(
    model_fn: ModelFn, x: Tensor, t: int, alpha: float, sigma: float, prediction: Prediction, cond: Cond | None
) -> tuple[Tensor, Tensor]:
    """Network call at discrete timestep t, converted to (x0, eps) in x's dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    return x0_eps_from_output(x, model_fn(x, t_batch, cond), alpha, sigma, prediction)


def _check_finite(x: Tensor, name: str, t: int, i: int, n: int) -> None:
    if (i + 1) % _CHECK_EVERY == 0 or i == n - 1:
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(
                f"sampling produced NaN/Inf at step t={t} ({name}, step {i + 1}/{n}); "
                "the model weights are probably diverged"
            )


def _strictly_decreasing(targets: np.ndarray, T: int) -> list[int]:
    """Round continuous timestep indices to distinct integers: T-1 first, 0 last, strictly decreasing.

    Where rounding makes neighbours collide (steps crowded near one end), indices are pushed apart by
    one, keeping room for the remaining steps.
    """
    n = len(targets)
    if not 1 <= n <= T:
        raise UsageError(f"the number of sampling steps must be between 1 and T = {T}, got {n}")
    out = [T - 1]
    for i in range(1, n):
        lo, hi = n - 1 - i, out[-1] - 1
        out.append(int(min(max(int(round(float(targets[i]))), lo), hi)))
    if n > 1:
        out[-1] = 0
    return out


# ---------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------


def ddpm_sample(
    model_fn: ModelFn,
    s: Schedule,
    x_T: Tensor,
    generators: Sequence[torch.Generator],
    *,
    prediction: Prediction = "eps",
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",
    clip_denoised: bool = True,
    callback: SamplerCallback | None = None,
    cond: Cond | None = None,
) -> Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).

    x_{t-1} = mu_tilde_t(x_t, x0_pred) + sigma_t z with z ~ N(0, I) for t > 0 and z = 0 at t = 0, where
    mu_tilde is the posterior mean of Ho eq. 7 at the predicted x_0 (clipped to [-1, 1] if
    ``clip_denoised``, as improved-diffusion does; without clipping this equals Ho eq. 11) and
    sigma_t^2 is beta_tilde_t ("fixed small") or beta_t ("fixed large"), Ho sec. 3.2.
    """
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown variance {variance!r}; expected 'beta_tilde' or 'beta'")
    s64 = s.float64()
    T = s64.T
    alpha = s64.sqrt_alphas_cumprod.tolist()
    sigma = s64.sqrt_one_minus_alphas_cumprod.tolist()
    coef1 = s64.posterior_mean_coef1.tolist()
    coef2 = s64.posterior_mean_coef2.tolist()
    std = (s64.posterior_variance if variance == "beta_tilde" else s64.betas).sqrt().tolist()
    x = _prepare(x_T, generators)
    noise = PerImageNoise(generators, x.shape[1:], x.device, x.dtype)
    with torch.no_grad():
        for i, t in enumerate(range(T - 1, -1, -1)):
            x0, _ = _predict(model_fn, x, t, alpha[t], sigma[t], prediction, cond)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            x_next = coef1[t] * x0 + coef2[t] * x
            if t > 0:
                x_next = x_next + std[t] * noise.next()
            x = x_next
            _check_finite(x, "ddpm", t, i, T)
            if callback is not None:
                callback(i, T, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(T: int, steps: int, spacing: Literal["uniform", "quadratic"] = "uniform") -> list[int]:
    """The ``steps`` timesteps DDIM visits, descending, from T-1 to 0 (both always included).

    uniform: t_i = round((T-1) (1 - i/(steps-1))), i = 0..steps-1 (evenly spaced, "linspace").
    quadratic: t_i = round((T-1) (1 - i/(steps-1))^2), denser near t = 0 (Song et al. 2021, sec. D.2,
    used there for CIFAR-10), with collisions near 0 pushed apart to keep ``steps`` distinct values.

    Unlike the DDIM code's range(0, T, T // steps) ("leading" spacing), the first step is at T-1, the
    timestep at which x_T ~ N(0, I) actually matches the forward process (Lin et al. 2024, "Common
    diffusion noise schedules and sample steps are flawed"). After the step at t = 0 the sampler
    returns the x_0 prediction (abar = 1).
    """
    if not 1 <= steps <= T:
        raise UsageError(f"ddim steps must be between 1 and T = {T}, got {steps}")
    if steps == 1:
        return [T - 1]
    u = 1.0 - np.arange(steps, dtype=np.float64) / (steps - 1)
    if spacing == "uniform":
        targets = (T - 1) * u
    elif spacing == "quadratic":
        targets = (T - 1) * u**2
    else:
        raise UsageError(f"unknown ddim spacing {spacing!r}; expected 'uniform' or 'quadratic'")
    return _strictly_decreasing(targets, T)


def ddim_sample(
    model_fn: ModelFn,
    s: Schedule,
    x_T: Tensor,
    generators: Sequence[torch.Generator],
    *,
    steps: int = 50,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    clip_denoised: bool = True,
    callback: SamplerCallback | None = None,
    cond: Cond | None = None,
    spacing: Literal["uniform", "quadratic"] = "uniform",
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over :func:`ddim_timesteps`.

    x_{t'} = sqrt(abar_{t'}) x0_pred + sqrt(1 - abar_{t'} - sigma^2) eps_pred + sigma z, with
    sigma = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'}) (eq. 16); t' is the
    next visited timestep and abar = 1 after the last one. eta = 0 is deterministic; eta = 1 with
    steps = T is DDPM with beta_tilde (and draws the same noise in the same order as
    :func:`ddpm_sample`). With ``clip_denoised``, eps is recomputed from the clipped x0 (as
    improved-diffusion does) so the two stay consistent.
    """
    if eta < 0:
        raise UsageError(f"ddim eta must be >= 0, got {eta}")
    s64 = s.float64()
    abar = s64.alphas_cumprod.tolist()
    ts = ddim_timesteps(s64.T, steps, spacing)
    n = len(ts)
    x = _prepare(x_T, generators)
    noise = PerImageNoise(generators, x.shape[1:], x.device, x.dtype)
    with torch.no_grad():
        for i, t in enumerate(ts):
            a_t = abar[t]
            a_next = abar[ts[i + 1]] if i + 1 < n else 1.0
            alpha, sigma = math.sqrt(a_t), math.sqrt(1.0 - a_t)
            x0, eps = _predict(model_fn, x, t, alpha, sigma, prediction, cond)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - alpha * x0) / sigma
            noise_std = eta * math.sqrt((1.0 - a_next) / (1.0 - a_t) * (1.0 - a_t / a_next))
            dir_coef = math.sqrt(max(1.0 - a_next - noise_std**2, 0.0))
            x = math.sqrt(a_next) * x0 + dir_coef * eps
            if noise_std > 0:
                x = x + noise_std * noise.next()
            _check_finite(x, "ddim", t, i, n)
            if callback is not None:
                callback(i, n, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------


# Lower end of the log-SNR range that DPM-Solver++'s logSNR spacing spreads its steps over: diffusers'
# lambda_min_clipped ("critical for the cosine (squaredcos_cap_v2) noise schedule"), at -5.1, the value its
# tests exercise.
# Under the cosine schedule lambda(t) = log(alpha / sigma) drops from -5.1 at t = 995 to -9.9 at t = 999
# (the last beta is clipped to 0.999), and lambdas evenly spaced over the whole range spent 7 of 20
# evaluations at t >= 993, where alpha < 0.01 and the x0 prediction is mostly clipped noise. The linear
# schedule (lambda(T-1) = -5.06 for T = 1000) is not affected.
LAMBDA_MIN = -5.1


def dpm_solver_timesteps(
    s: Schedule,
    steps: int,
    spacing: Literal["time_uniform", "logSNR"] = "logSNR",
    lambda_min: float | None = LAMBDA_MIN,
) -> list[int]:
    """The ``steps`` discrete timesteps at which DPM-Solver++ evaluates the network, descending, T-1 to 0.

    Continuous time follows the reference implementation's "discrete" NoiseScheduleVP (Lu et al.
    2022): discrete index n sits at t = (n + 1) / T, and log alpha is linearly interpolated between
    those points. The reference maps t back to a network input by (t - 1/T) * 1000; here the map is
    (t - 1/T) * T = n, i.e. exactly the discrete index (the two agree for T = 1000), rounded.

    logSNR: lambda = log(alpha / sigma) evenly spaced from lambda(T-1) to lambda(0) (the reference's
    default for this solver). Where lambda(T-1) is below ``lambda_min`` (:data:`LAMBDA_MIN`, diffusers'
    ``lambda_min_clipped``; the cosine schedule), the points are evenly spaced from ``lambda_min`` to
    lambda(0) instead, as diffusers spaces them, except that the noisiest one is moved out to T-1: the
    first step crosses the nearly signal-free end of the process (t = 999 -> 992 for 20 steps under the
    cosine schedule) and the others go where the image forms. ``lambda_min=None`` spaces the whole
    range. time_uniform: t evenly spaced. Each point is then snapped to the nearest discrete index
    (collisions pushed apart by one), and the solver uses the schedule's exact values at those
    indices, so the noise level it assumes is the one the network sees.
    """
    s64 = s.float64()
    T = s64.T
    if not 1 <= steps <= T:
        raise UsageError(f"dpm-solver++ steps must be between 1 and T = {T}, got {steps}")
    if steps == 1:
        return [T - 1]
    if spacing == "time_uniform":
        targets = np.linspace(T - 1, 0, steps)
    elif spacing == "logSNR":
        lam = (0.5 * s64.log_snr).numpy()  # strictly decreasing in the index
        lam_targets = np.linspace(lam[-1], lam[0], steps)
        if lambda_min is not None and lam[-1] < lambda_min < lam[0]:
            lam_targets = np.linspace(lambda_min, lam[0], steps)
            lam_targets[0] = lam[-1]  # the noisiest point is T-1 itself
        targets = np.interp(lam_targets, lam[::-1], np.arange(T - 1, -1, -1, dtype=np.float64))
    else:
        raise UsageError(f"unknown dpm-solver++ spacing {spacing!r}; expected 'logSNR' or 'time_uniform'")
    return _strictly_decreasing(targets, T)


def dpm_solver_pp_sample(
    model_fn: ModelFn,
    s: Schedule,
    x_T: Tensor,
    generators: Sequence[torch.Generator],
    *,
    steps: int = 20,
    spacing: Literal["time_uniform", "logSNR"] = "logSNR",
    prediction: Prediction = "eps",
    clip_denoised: bool = True,
    callback: SamplerCallback | None = None,
    cond: Cond | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) and, for eta > 0, its stochastic form SDE-DPM-Solver++(2M).

    With lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1} and D_i the x0 prediction at t_i:

        x_i = (sigma_i / sigma_{i-1}) e^{-eta h_i} x_{i-1} + alpha_i (1 - e^{-(1 + eta) h_i}) D
              + sigma_i sqrt(1 - e^{-2 eta h_i}) z,                                     z ~ N(0, I)
        D = D_{i-1} on the first step (first order), else D_{i-1} + (D_{i-1} - D_{i-2}) / (2 r_i),
        r_i = h_{i-1} / h_i.

    eta = 0 is the probability-flow ODE solver DPM-Solver++(2M) (deterministic; x_i = (sigma_i /
    sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D). eta = 1 solves the reverse SDE instead: the
    "sde-dpmsolver++" of diffusers' DPMSolverMultistepScheduler (eta as in k-diffusion's
    sample_dpmpp_2m_sde). A first-order eta = 1 step is exactly the DDPM posterior step
    q(x_i | x_{i-1}, x_0 = D), i.e. DDIM with eta = 1 on the same timesteps, and draws its noise the same
    way (one draw per step from each image's generator); the second-order correction is what lets 20
    steps stand in for DDPM's 1000. Why it matters: a deterministic sampler carries the network's errors
    at high noise (where x0 = (x - sigma eps) / alpha amplifies them by 1 / alpha) all the way to the
    image, while the noise an ancestral sampler injects washes them out (docs/quality.md measures this
    on the shapes demo).

    The network is evaluated at the ``steps`` indices of :func:`dpm_solver_timesteps`, which end at
    t = 0; the last update goes from t = 0 to the clean limit (sigma = 0, where the update is exactly
    x = D without noise), so the result is denoised and the number of network evaluations is ``steps``.
    This is the reference's ``lower_order_final`` (the final update is first order) plus
    ``denoise_to_zero`` folded into the last evaluation; as in the reference, for fewer than 10 steps
    the update into t = 0 is first order too. The generators are used only when eta > 0.
    """
    if eta < 0:
        raise UsageError(f"dpm-solver++ eta must be >= 0, got {eta}")
    s64 = s.float64()
    ts = dpm_solver_timesteps(s64, steps, spacing)
    n = len(ts)
    abar = s64.alphas_cumprod[ts]
    alphas, sigmas = abar.sqrt().tolist(), (1.0 - abar).sqrt().tolist()
    lambdas = (0.5 * s64.log_snr[ts]).tolist()
    x = _prepare(x_T, generators)
    noise = PerImageNoise(generators, x.shape[1:], x.device, x.dtype) if eta > 0 else None
    x0_prev: Tensor | None = None
    with torch.no_grad():
        for i, t in enumerate(ts):
            x0, _ = _predict(model_fn, x, t, alphas[i], sigmas[i], prediction, cond)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if i == n - 1:
                x = x0  # to sigma = 0: the update reduces to the data prediction
            else:
                h = lambdas[i + 1] - lambdas[i]
                first_order = x0_prev is None or (steps < 10 and i == n - 2)
                if first_order:
                    d = x0
                else:
                    r = (lambdas[i] - lambdas[i - 1]) / h
                    d = x0 + (0.5 / r) * (x0 - x0_prev)
                decay = sigmas[i + 1] / sigmas[i] * math.exp(-eta * h)  # (sigma_i / sigma_{i-1}) e^{-eta h}
                x = decay * x - (alphas[i + 1] * math.expm1(-(1.0 + eta) * h)) * d
                if noise is not None:
                    x = x + (sigmas[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h))) * noise.next()
            x0_prev = x0
            _check_finite(x, "dpm-solver++", t, i, n)
            if callback is not None:
                callback(i, n, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# The loops as the registry (ddpmctl.sampler_registry) calls them, and the dispatcher
# ---------------------------------------------------------------------------------------------


def _run_ddpm(model_fn, s, x_T, generators, *, steps, eta, spacing, prediction, variance, clip_denoised, callback,
              cond):
    return ddpm_sample(model_fn, s, x_T, generators, prediction=prediction, variance=variance,
                       clip_denoised=clip_denoised, callback=callback, cond=cond)


def _run_ddim(model_fn, s, x_T, generators, *, steps, eta, spacing, prediction, variance, clip_denoised, callback,
              cond):
    return ddim_sample(model_fn, s, x_T, generators, steps=steps, eta=eta, prediction=prediction,
                       clip_denoised=clip_denoised, callback=callback, spacing=spacing, cond=cond)


def _run_dpm_solver_pp(model_fn, s, x_T, generators, *, steps, eta, spacing, prediction, variance, clip_denoised,
                       callback, cond):
    return dpm_solver_pp_sample(model_fn, s, x_T, generators, steps=steps, spacing=spacing, prediction=prediction,
                                clip_denoised=clip_denoised, callback=callback, eta=eta, cond=cond)


def sample(
    name: str,
    model_fn: ModelFn,
    s: Schedule,
    x_T: Tensor,
    generators: Sequence[torch.Generator],
    *,
    steps: int | None = None,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",
    spacing: str | None = None,
    clip_denoised: bool | None = None,
    callback: SamplerCallback | None = None,
    cond: Cond | None = None,
) -> tuple[Tensor, int]:
    """Run the named sampler; return (x_0 clamped to [-1, 1], number of network evaluations).

    steps: None gives the sampler's usual number (:attr:`SamplerInfo.default_steps`); ddpm always runs
    all T (None or T accepted). spacing: one of the sampler's :attr:`SamplerInfo.spacings` (default the
    first). clip_denoised: None means True for every sampler (clipping the data prediction to [-1, 1]
    is the static form of the thresholding Lu et al. recommend for pixel-space models; unclipped, an
    imperfect eps at t near T, where alpha is ~5e-5 under the cosine schedule, gives wild x0).
    eta is used where :attr:`SamplerInfo.takes_eta` (0: deterministic, the probability-flow ODE; 1:
    stochastic, DDPM's reverse process; for dpm-solver++ eta = 1 is SDE-DPM-Solver++(2M), the one whose
    20-step samples look like 1000-step DDPM's on an under-trained model, docs/quality.md), variance
    where :attr:`SamplerInfo.takes_variance`.
    """
    info = get_sampler(name)
    nfe = info.steps_for(s.T, steps)
    if spacing is not None and spacing not in info.spacings:
        accepted = f"expected {' or '.join(map(repr, info.spacings))}" if info.spacings else "it has no spacing choice"
        raise UsageError(f"unknown {name} spacing {spacing!r}; {accepted}")
    x = globals()[info.loop](model_fn, s, x_T, generators, steps=nfe, eta=eta, prediction=prediction, variance=variance,
                 spacing=spacing or (info.spacings[0] if info.spacings else None),
                 clip_denoised=True if clip_denoised is None else clip_denoised, callback=callback, cond=cond)
    return x.clamp(-1.0, 1.0), nfe
