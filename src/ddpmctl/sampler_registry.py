"""The one sampler registry: name -> what ddpmctl knows about the sampler (its loop, usual steps,
spacings, whether it takes eta or a variance, a one-line summary).

Spec validation, every command's options and help, generate, eval, the demo and the model card read
it; none of them names a sampler. Adding a sampler is one loop function in :mod:`ddpmctl.samplers`,
one entry in :data:`REGISTRY` and its tests. This module imports no torch, so `--help` and spec
validation stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ddpmctl.errors import UsageError


@dataclass(frozen=True)
class SamplerInfo:
    """What the rest of ddpmctl knows about a sampler."""

    name: str
    loop: str  # the function in ddpmctl.samplers: (model_fn, s, x_T, generators, *, steps, eta, spacing,
    #   prediction, variance, clip_denoised, callback) -> x_0
    summary: str  # one line for help texts and the model card
    default_steps: int | None  # None: all T steps, always
    spacings: tuple[str, ...] = ()  # the first is the default; empty: no choice
    takes_eta: bool = False  # eta 0 = deterministic, 1 = stochastic like DDPM
    takes_variance: bool = False  # sigma_t^2: beta_tilde or beta

    @property
    def all_steps(self) -> bool:
        """True when the sampler always runs all T steps (``--steps`` does not apply)."""
        return self.default_steps is None

    def steps_for(self, T: int, steps: int | None = None) -> int:
        """Network evaluations for ``steps`` (None: the usual number) on a T-step process."""
        if self.all_steps:
            if steps is not None and steps != T:
                others = [i.name for i in REGISTRY.values() if not i.all_steps]
                raise UsageError(f"{self.name} always runs all T = {T} steps (got steps={steps}); "
                                 f"{' or '.join(others)} take fewer steps (eta = 1 for a stochastic one)")
            return T
        return self.default_steps if steps is None else steps

    def lenient_steps(self, T: int, steps: int | None, on_ignored: Callable[[str], None] | None = None) -> int:
        """:meth:`steps_for` for a command line: a sampler that runs all T steps ignores ``steps``
        (saying so through ``on_ignored``) instead of refusing it."""
        if self.all_steps and steps not in (None, T) and on_ignored is not None:
            on_ignored(f"{self.name} runs all {T} steps; ignoring --steps {steps}")
        return self.steps_for(T, None if self.all_steps else steps)

    def eta_or_none(self, eta: float) -> float | None:
        """eta as a record states it: None for a sampler that has no eta."""
        return eta if self.takes_eta else None

    def variance_or_none(self, variance: str) -> str | None:
        return variance if self.takes_variance else None


REGISTRY: dict[str, SamplerInfo] = {i.name: i for i in (
    SamplerInfo("ddpm", "_run_ddpm", "ancestral, all T steps; Ho et al. 2020", None, takes_variance=True),
    SamplerInfo("ddim", "_run_ddim", "Song et al. 2021, 50 steps", 50, ("uniform", "quadratic"), takes_eta=True),
    # time_uniform takes far too large steps at low noise in pixel space and needs ~100 steps for the
    # accuracy logSNR reaches in ~25, as in the reference implementation
    SamplerInfo("dpm-solver++", "_run_dpm_solver_pp", "DPM-Solver++(2M), Lu et al. 2022, 20 steps; eta 1: its SDE form",
                20, ("logSNR", "time_uniform"), takes_eta=True),
)}
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]  # for pydantic and typer choices


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry for ``name``; a UsageError listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None


def sampler_help() -> str:
    """``name (summary) | ...`` for option help texts."""
    return " | ".join(f"{i.name} ({i.summary})" for i in REGISTRY.values())
