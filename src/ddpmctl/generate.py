"""Sampling glue: draw images by seed, in batches, from a :class:`~ddpmctl.modelfolder.Denoiser`
(:func:`ddpmctl.modelfolder.load_source` loads one from a run dir, a model folder or the Hub).

Image i of a call depends only on its seed (one generator per image), so the batch size never
changes the output and `--n 100` shares its first 10 images with `--n 10`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from ddpmctl.cond import Cond
from ddpmctl.devices import Precision
from ddpmctl.diffusion import Schedule
from ddpmctl.images import to_uint8
from ddpmctl.modelfolder import Denoiser
from ddpmctl.errors import UsageError
from ddpmctl.samplers import get_sampler, guided, per_image_generators, randn_per_image, sample
from ddpmctl.spec import RunSpec
from ddpmctl.unet import UNet


def model_fn_for(model: UNet, precision: Precision | None, device: torch.device) -> Callable:
    """(x_t, t, cond=None) -> float32 prediction, under autocast when asked."""

    def fn(x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        if precision is None or precision.autocast_dtype is None:
            return model(x, t, cond)
        with precision.autocast(device):
            return model(x, t, cond).float()

    return fn


def generate(
    den: Denoiser,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    batch_size: int | None = None,
    device: torch.device,
    precision: Precision | None = None,
    variance: str = "beta_tilde",
    callback_factory: Callable[[int], Callable | None] | None = None,
    compile: str | bool | None = None,
    cuda_graph: bool | None = None,
    on_warning: Callable[[str], None] | None = None,
    labels: Sequence[int] | None = None,
    guidance: float = 0.0,
) -> Iterator[tuple[int, torch.Tensor, int]]:
    """Yield (first_index, uint8 images (B, C, H, W), network evaluations) batch by batch.

    The network runs through :func:`ddpmctl.engine.make_sample_fn`: on CUDA bf16 weights (with bf16
    precision), channels_last and one CUDA graph replay per evaluation (``cuda_graph``, default on),
    compiled when ``compile`` says so (None = auto: on CUDA when the call does at least
    :data:`COMPILE_MIN_IMAGE_STEPS` image-steps, where compilation pays for itself; a failed
    compilation falls back to eager with a warning). ``batch_size``
    None picks one from free device memory. Image i depends only on seeds[i] (and labels[i]) whatever
    the batching.

    ``labels`` (conditional models): a class index per seed; ``guidance`` the classifier-free guidance
    weight W (:func:`ddpmctl.samplers.guided`: each guided evaluation runs the network on twice the batch).
    The process's backend flags (TF32, cuDNN autotuning) are the caller's: the CLI sets them once per
    command (:func:`ddpmctl.devices.set_fast_math`); this function leaves them as they are.
    """
    from ddpmctl.engine import auto_sample_batch_size, make_sample_fn

    s = den.spec
    schedule = Schedule.create(s.diffusion.schedule, s.diffusion.timesteps, s.diffusion.beta_range).to(device)
    shape = (s.model.channels, s.model.image_size, s.model.image_size)
    if batch_size is None:
        batch_size = auto_sample_batch_size(den.model, shape, device, len(seeds), precision)
    if compile is None or compile == "auto":
        compile = compile_pays_off(s, len(seeds), sampler, steps, device)

    def emit(event: dict) -> None:
        if on_warning is not None and event.get("event") == "warning":
            on_warning(event["message"])

    check_labels(s, labels, guidance, len(seeds))
    fn = make_sample_fn(den.model, precision, device, compile=compile, cuda_graph=cuda_graph, emit=emit)
    if labels is not None:
        fn = guided(fn, guidance, s.model.num_classes)
    for start in range(0, len(seeds), batch_size):
        batch_seeds = list(seeds[start : start + batch_size])
        gens = per_image_generators(batch_seeds, device)
        x_T = randn_per_image(gens, shape, device)
        cb = callback_factory(start) if callback_factory else None
        cond = None if labels is None else Cond(labels=torch.tensor(
            list(labels[start : start + batch_size]), dtype=torch.long, device=device))
        x0, nfe = sample(sampler, fn, schedule, x_T, gens, steps=steps, eta=eta,
                         prediction=s.diffusion.prediction, variance=variance, callback=cb, cond=cond)
        yield start, to_uint8(x0), nfe


def check_labels(spec: RunSpec, labels: Sequence[int] | None, guidance: float, n: int) -> None:
    """Labels fit the model: one per image, each a class of a conditional model; guidance >= 0."""
    k = spec.model.num_classes
    if labels is None:
        return
    if not k:
        raise UsageError("this model is unconditional: it takes no class (train with --conditional for one that does)")
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < k})
    if bad:
        raise UsageError(f"class index {bad[0]} is out of range: this model has {k} classes (0..{k - 1})")
    if not guidance >= 0:
        raise UsageError(f"guidance must be >= 0 (0: none), got {guidance}")


def per_class(classes: Sequence[int], per_row: int, seed: int) -> tuple[list[int], list[int]]:
    """(seeds, labels) for a grid with one row per class: column i uses seed + i in every row, the same
    starting noise, so the rows differ by their class only."""
    seeds = [seed + i for _ in classes for i in range(per_row)]
    return seeds, [c for c in classes for _ in range(per_row)]


# Below this many (images x network evaluations) a sampling call runs uncompiled on CUDA: compiling
# the network takes tens of seconds. Never automatic on the CPU: on an idle 2-core machine the
# compiled, frozen network was no faster than eager (mnist 384 vs 384 ms, cifar10 1017 vs 1019 ms per
# step) after 9-52 s of compilation (docs/performance.md); generate(compile=True) still forces it.
COMPILE_MIN_IMAGE_STEPS = 200_000


def compile_pays_off(spec: RunSpec, n: int, sampler: str, steps: int | None, device) -> bool:
    """The `auto` compile choice for drawing ``n`` images: on CUDA from
    :data:`COMPILE_MIN_IMAGE_STEPS` image-steps up, never elsewhere."""
    nfe = get_sampler(sampler).steps_for(spec.diffusion.timesteps, steps)
    return torch.device(device).type == "cuda" and n * nfe >= COMPILE_MIN_IMAGE_STEPS


def run_defaults(spec: RunSpec, sampler: str | None) -> tuple[str, int, float]:
    """(sampler, steps, eta) a run samples with when not told: its spec.sample for its own sampler,
    else that sampler's usual steps and eta 0. `sample`, `demo` and exported model cards agree."""
    own = spec.sample
    sampler = sampler or own.sampler
    info, T = get_sampler(sampler), spec.diffusion.timesteps
    if sampler == own.sampler:
        return sampler, info.steps_for(T, None if info.all_steps else own.steps), own.eta
    return sampler, info.steps_for(T), 0.0
