"""The sampler registry (ddpmctl.sampler_registry): every entry runs through the one dispatcher on an
exact model, and spec validation and the commands offer exactly what it lists."""

from __future__ import annotations

import re

import pytest
import torch

from ddpmctl import spec as S
from ddpmctl.diffusion import Schedule
from ddpmctl.errors import SpecError, UsageError
from ddpmctl.generate import run_defaults
from ddpmctl.sampler_registry import REGISTRY, SAMPLERS, get_sampler
from ddpmctl.samplers import per_image_generators, randn_per_image, sample
from test_samplers import MU, SHAPE, gaussian_model

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_entry_samples_the_exact_gaussian_with_its_usual_steps(name):
    """Data x0 ~ N(MU, 0.2^2): each sampler's default run lands on that mean and spread, and reports
    the network evaluations the registry promises."""
    s = Schedule.create("cosine", 200)
    info = get_sampler(name)
    gens = per_image_generators(range(64), "cpu")
    x_T = randn_per_image(gens, SHAPE, "cpu", dtype=torch.float64)
    x, nfe = sample(name, gaussian_model(s, 0.2), s, x_T, gens, eta=1.0 if info.takes_eta else 0.0,
                    clip_denoised=False)
    assert nfe == info.steps_for(200) == (200 if info.all_steps else info.default_steps)
    assert (x.mean(0) - MU).abs().mean() < 0.05
    assert abs(float(x.std(0).mean()) - 0.2) < 0.03


def test_an_all_steps_sampler_refuses_other_steps_naming_the_ones_that_take_them():
    fixed = [i for i in REGISTRY.values() if i.all_steps]
    assert fixed, "ddpm runs all T steps"
    with pytest.raises(UsageError) as exc:
        fixed[0].steps_for(1000, 20)
    msg = str(exc.value)
    assert "--" not in msg  # the library does not know the command line
    assert all(i.name in msg for i in REGISTRY.values() if not i.all_steps)
    notes: list[str] = []
    assert fixed[0].lenient_steps(1000, 20, notes.append) == 1000 and "ignoring --steps 20" in notes[0]


def test_unknown_sampler_and_spacing_list_what_is_accepted():
    with pytest.raises(UsageError, match=re.escape("expected one of " + ", ".join(SAMPLERS))):
        get_sampler("euler")
    s = Schedule.create("cosine", 10)
    gens = per_image_generators([0], "cpu")
    x_T = randn_per_image(gens, (1, 2, 2), "cpu")
    for info in REGISTRY.values():
        with pytest.raises(UsageError, match=re.escape(f"{info.name} spacing 'zigzag'")):
            sample(info.name, lambda x, t, cond=None: torch.zeros_like(x), s, x_T, gens, spacing="zigzag")


def test_spec_accepts_every_registered_sampler_and_rejects_others():
    for name in SAMPLERS:
        assert S.resolve("shapes", sets=[f"sample.sampler={name}"]).sample.sampler == name
    with pytest.raises(SpecError, match="sample.sampler"):
        S.resolve("shapes", sets=["sample.sampler=euler"])


def test_run_defaults_follow_the_registry():
    spec = S.resolve("shapes", sets=["sample.sampler=ddim", "sample.steps=7", "sample.eta=0.5"])
    assert run_defaults(spec, None) == ("ddim", 7, 0.5)  # the run's own
    for info in REGISTRY.values():
        if info.name != "ddim":
            assert run_defaults(spec, info.name) == (info.name, info.steps_for(spec.diffusion.timesteps), 0.0)


@pytest.mark.parametrize("command", [["sample"], ["grid", "x"], ["eval"]])
def test_commands_offer_exactly_the_registered_samplers(command, cli):
    """A name outside the registry is a usage error that lists the registry's names, in order."""
    r = cli(*command, "--sampler", "euler")
    assert r.returncode == 2
    flat = re.sub(r"[\s│]", "", r.stderr)
    assert ",".join(f"'{n}'" for n in SAMPLERS) in flat, flat
