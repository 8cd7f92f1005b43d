"""`ddpmctl bench`: training and sampling speed of a preset on synthetic data.

Measures the very code training and sampling run (:func:`ddpmctl.engine.setup_training` and its
step, :func:`ddpmctl.engine.make_sample_fn` inside :func:`ddpmctl.samplers.ddpm_sample`), after a
warm-up that absorbs compilation, as the median of repeats. Counts FLOPs per image with
torch.utils.flop_counter and, where a peak is measured (a large matrix product on the device),
reports utilisation. The library never prints: progress goes through ``emit``.

The timing helpers (:func:`measure_train`, :func:`measure_sampling`, :func:`matmul_peak_tflops`)
are public so that benchmarks/peer_diffusers.py times other implementations the same way.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import time
from typing import Callable

import torch

from ddpmctl import __version__
from ddpmctl import spec as specmod
from ddpmctl.devices import choose_precision, describe, resolve, set_fast_math
from ddpmctl.diffusion import Schedule, training_loss
from ddpmctl.spec import RunSpec

Event = Callable[[dict], None]

# Defaults per device type: (timed train steps per repeat, train warm-up steps, repeats,
# sampling batch, sampling steps per repeat).
DEFAULTS = {
    "cuda": {"steps": 20, "warmup": 8, "repeats": 5, "sample_batch_size": 256, "sample_steps": 50},
    "cpu": {"steps": 3, "warmup": 1, "repeats": 3, "sample_batch_size": 32, "sample_steps": 5},
    "mps": {"steps": 10, "warmup": 3, "repeats": 3, "sample_batch_size": 64, "sample_steps": 20},
}


def _ignore(_e: dict) -> None:
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def _restore_global_state():
    """Bench sets the same global flags as training; put them back afterwards (tests share a process)."""
    det = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn)
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = tf32
        torch.set_rng_state(rng)


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of ``fn()`` by torch.utils.flop_counter, attention through the math kernel (counted
    as its two matrix products on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops_per_image(spec: RunSpec) -> dict[str, int]:
    """Forward and forward+backward FLOPs per image of the training loss, counted on the meta device."""
    from ddpmctl.unet import build

    m, n = spec.model, 2
    with torch.device("meta"):
        net = build(m)
        x = torch.empty(n, m.channels, m.image_size, m.image_size)
        t = torch.zeros(n, dtype=torch.long)
        noise = torch.empty_like(x)
    schedule = Schedule.create(spec.diffusion.schedule, spec.diffusion.timesteps, spec.diffusion.beta_range).to("meta")

    def train() -> None:
        training_loss(net, schedule, x, t, noise, spec.diffusion.prediction).mean().backward()

    def forward() -> None:
        with torch.no_grad():
            net(x, t)

    return {"train": count_flops(train) // n, "forward": count_flops(forward) // n}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 10) -> float:
    """Measured matrix-multiply rate (TFLOP/s): the best of 5 timed runs of ``reps`` products of
    random ``size``-square matrices, rotating among 3 input pairs so caches do not flatter it (the
    best run: a peak, and the run least disturbed by other work on a shared CPU)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
        reps = reps if device.type == "cuda" else 3
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    pairs = [(torch.randn(size, size, device=device, dtype=dtype, generator=gen),
              torch.randn(size, size, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    for a, b in pairs:  # warm-up
        torch.matmul(a, b, out=out)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(reps):
            a, b = pairs[i % 3]
            torch.matmul(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - t0)
    del pairs, out
    return 2 * size**3 * reps / min(times) / 1e12


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what it is): CUDA's max allocated since the last reset, else the process's max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "process_max_rss"


def measure_train(one_step: Callable[[], None], batch_size: int, device: torch.device, *, steps: int,
                  warmup: int, repeats: int, read: Callable[[], object] | None = None,
                  emit: Event = _ignore, label: str = "train") -> dict:
    """Images/s of ``one_step`` (which must not sync): warm-up steps (compilation included) first,
    then ``repeats`` timed windows of ``steps`` steps, each ended by ``read()`` (the host read a
    training loop does every N steps) and a device sync. Median over the windows."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    if read is not None:
        read()
    sync(device)
    warmup_s = time.perf_counter() - t0
    emit({"event": "bench", "message": f"{label}: warm-up {warmup} steps in {warmup_s:.1f}s"})
    peak_memory_reset(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        if read is not None:
            read()
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    mem, mem_kind = peak_memory(device)
    images_per_s = statistics.median(rates)
    emit({"event": "bench", "message": f"{label}: {images_per_s:.1f} images/s at batch {batch_size}"})
    return {"images_per_s": images_per_s, "step_ms": 1e3 * batch_size / images_per_s, "repeats": rates,
            "warmup_s": warmup_s, "peak_memory_bytes": mem, "peak_memory_kind": mem_kind}


def measure_sampling(run_steps: Callable[[int], None], batch_size: int, device: torch.device, *, steps: int,
                     repeats: int, emit: Event = _ignore, label: str = "sample", warmup: bool = True) -> dict:
    """ms per denoising step of ``run_steps(n)`` (n steps of a sampling loop, whole loop included):
    one warm-up run (compilation, graph capture), then the median of ``repeats`` timed runs."""
    t0 = time.perf_counter()
    if warmup:
        run_steps(steps)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if warmup:
        emit({"event": "bench", "message": f"{label}: warm-up in {warmup_s:.1f}s"})
    peak_memory_reset(device)
    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        sync(device)
        per_step.append((time.perf_counter() - t0) / steps)
    mem, mem_kind = peak_memory(device)
    ms = 1e3 * statistics.median(per_step)
    emit({"event": "bench", "message": f"{label}: {ms:.2f} ms per step at batch {batch_size}"})
    return {"ms_per_step": ms, "images_per_s_1000_steps": batch_size / (ms * 1e-3 * 1000),
            "repeats_ms": [1e3 * p for p in per_step], "warmup_s": warmup_s,
            "peak_memory_bytes": mem, "peak_memory_kind": mem_kind}


# ------------------------------------------------------------------------------------------------
# ddpmctl's own training step and sampler
# ------------------------------------------------------------------------------------------------


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def ddpmctl_train_step(spec: RunSpec, device: torch.device, precision, *, compile_mode=None,
                       emit: Event = _ignore) -> tuple[Callable[[], None], Callable[[], object], object]:
    """(one_step, read, training) with the training loop's data phase and step: device-resident
    uint8 batches, t and noise from a device generator, setup_training's step, device-side loss sums."""
    from ddpmctl.data.loader import DeviceLoader
    from ddpmctl.engine import setup_training
    from ddpmctl.train import get_lr

    tr_spec, op, T = spec.train, spec.optim, spec.diffusion.timesteps
    torch.manual_seed(tr_spec.seed)
    training = setup_training(spec, device, precision, emit, compile_mode)
    m = spec.model
    images = synthetic_images(4 * tr_spec.batch_size, m.channels, m.image_size)
    loader = DeviceLoader(images, tr_spec.batch_size, device, seed=tr_spec.seed, flip=spec.data.flip)
    gen = torch.Generator(device=device)
    gen.manual_seed(tr_spec.seed + 1)
    loss_sum = torch.zeros((), device=device)
    state = {"step": 0}
    training.model.train()

    def one_step() -> None:
        step = state["step"]
        epoch, index = divmod(step, loader.steps_per_epoch)
        x0 = loader.batch(epoch, index)
        t = torch.randint(0, T, (x0.shape[0],), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        loss, _gnorm, finite = training.step(x0, t, noise, get_lr(step, op.lr, op.warmup_steps))
        loss_sum.add_(torch.where(finite, loss.float(), 0.0))
        state["step"] = step + 1

    return one_step, loss_sum.item, training


def ddpmctl_sampler(spec: RunSpec, device: torch.device, precision, batch_size: int, *, compile_mode=None,
                    emit: Event = _ignore, guidance: float | None = None) -> Callable[[int], None]:
    """run(n): n steps of ddpm_sample (the real loop: per-image noise, clipping, checks) with the
    network as `ddpmctl sample` runs it, random weights (zeros would flatter the timing). ``guidance``
    (a conditional spec): every image has class 0 and each step is guided (two branches, one forward)."""
    from ddpmctl.cond import Cond
    from ddpmctl.samplers import ddpm_sample, guided, per_image_generators, randn_per_image
    from ddpmctl.engine import compile_wanted, make_sample_fn
    from ddpmctl.unet import build

    torch.manual_seed(spec.train.seed)
    net = build(spec.model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    net = net.to(device).eval()
    fn = make_sample_fn(net, precision, device, compile=compile_wanted(compile_mode, device), emit=emit)
    m = spec.model
    cond = None
    if guidance is not None:
        fn = guided(fn, guidance, m.num_classes)
        cond = Cond(labels=torch.zeros(batch_size, dtype=torch.long, device=device))
    shape = (m.channels, m.image_size, m.image_size)
    schedules: dict[int, Schedule] = {}

    def run(n: int) -> None:
        if n not in schedules:  # an n-step process: the cost of a step does not depend on T
            kind = spec.diffusion.schedule if n > 20 else "cosine"  # linear needs T > 20
            schedules[n] = Schedule.create(kind, n).to(device)
        gens = per_image_generators(range(batch_size), device)
        x_T = randn_per_image(gens, shape, device)
        ddpm_sample(fn, schedules[n], x_T, gens, prediction=spec.diffusion.prediction, cond=cond)

    return run


BENCH_CLASSES = tuple(str(i) for i in range(10))  # `bench --guidance`: a 10-class version of the preset


def resolve_spec(preset: str, device: torch.device, batch_size: int | None, precision: str,
                 conditional: bool = False) -> RunSpec:
    overrides = {"train": {"batch_size": batch_size, "device": str(device), "precision": precision},
                 "model": {"conditional": True, "classes": BENCH_CLASSES} if conditional else {}}
    return specmod.resolve(preset, overrides=overrides)


def run(preset: str = "cifar10", *, device: str | torch.device | None = None, batch_size: int | None = None,
        steps: int | None = None, warmup: int | None = None, repeats: int | None = None,
        sample_batch_size: int | None = None,
        sample_steps: int | None = None, compile: bool | None = None, precision: str = "auto",
        train: bool = True, sample: bool = True, peak: bool = True, guidance: float | None = None,
        emit: Event = _ignore) -> dict:
    """Benchmark a preset on ``device`` (a resolved torch.device, as the CLI hands it; a name or None,
    auto, goes through :func:`ddpmctl.devices.resolve`); returns one flat dict (see docs/performance.md)."""
    dev = resolve(device)
    prec = choose_precision(precision, dev)
    spec = resolve_spec(preset, dev, batch_size, precision, conditional=guidance is not None)
    d = DEFAULTS.get(dev.type, DEFAULTS["cpu"])
    steps = steps or d["steps"]
    warmup = d["warmup"] if warmup is None else warmup
    repeats = repeats or d["repeats"]
    sample_steps = sample_steps or d["sample_steps"]
    sample_bs = sample_batch_size or d["sample_batch_size"] or spec.train.batch_size
    compile_mode = spec.train.compile if compile is None else compile
    from ddpmctl.engine import compile_wanted
    from ddpmctl.unet import build, count_parameters

    with torch.device("meta"):
        n_params = count_parameters(build(spec.model))
    flops = model_flops_per_image(spec)
    out: dict = {
        "device": str(dev), "device_name": describe(dev), "preset": preset, "precision": prec.name,
        "compile": compile_wanted(compile_mode, dev), "batch_size": spec.train.batch_size,
        "parameters": n_params, "torch": torch.__version__, "ddpmctl": __version__,
        "flops_per_image_train": flops["train"], "flops_per_image_forward": flops["forward"],
        "train_images_per_s": None, "train_step_ms": None, "peak_memory_bytes": None, "peak_memory_kind": None,
        "sample_batch_size": sample_bs, "sample_ms_per_step": None, "sample_images_per_s_1000_steps": None,
        "sample_peak_memory_bytes": None, "sample_guidance": guidance, "achieved_tflops": None, "sample_achieved_tflops": None,
        "matmul_peak_tflops": None, "peak_dtype": None, "mfu": None, "sample_mfu": None, "warnings": [],
    }

    def note(e: dict) -> None:
        if e.get("event") == "warning":
            out["warnings"].append(e["message"])
        emit(e)

    with _restore_global_state():
        set_fast_math(dev, spec.train.deterministic or dev.type == "cpu")  # as training does
        if train:
            emit({"event": "bench", "message": f"training {preset} at batch {spec.train.batch_size} on {describe(dev)}"})
            one_step, read, training = ddpmctl_train_step(spec, dev, prec, compile_mode=compile_mode, emit=note)
            r = measure_train(one_step, spec.train.batch_size, dev, steps=steps, warmup=warmup, repeats=repeats,
                              read=read, emit=emit, label="train")
            fell_back = getattr(training.forward, "failed", None)
            out["compile"] = out["compile"] and fell_back is None
            out.update({"train_images_per_s": r["images_per_s"], "train_step_ms": r["step_ms"],
                        "train_repeats_images_per_s": r["repeats"], "train_warmup_s": r["warmup_s"],
                        "peak_memory_bytes": r["peak_memory_bytes"], "peak_memory_kind": r["peak_memory_kind"],
                        "achieved_tflops": r["images_per_s"] * flops["train"] / 1e12})
            del one_step, read, training
            _free(dev)
        if sample:
            emit({"event": "bench", "message": f"sampling {preset} at batch {sample_bs}"})
            run_steps = ddpmctl_sampler(spec, dev, prec, sample_bs, compile_mode=compile_mode, emit=note,
                                        guidance=guidance)
            r = measure_sampling(run_steps, sample_bs, dev, steps=sample_steps, repeats=repeats, emit=emit)
            out.update({"sample_ms_per_step": r["ms_per_step"],
                        "sample_images_per_s_1000_steps": r["images_per_s_1000_steps"],
                        "sample_repeats_ms": r["repeats_ms"], "sample_warmup_s": r["warmup_s"],
                        "sample_peak_memory_bytes": r["peak_memory_bytes"],
                        "sample_guidance": guidance,  # None: unguided; else two network rows per image
                        "sample_achieved_tflops": sample_bs * flops["forward"] * (1 if guidance is None else 2)
                        / (r["ms_per_step"] * 1e-3) / 1e12})
            del run_steps
            _free(dev)
        if peak:
            dtype = prec.autocast_dtype or torch.float32
            out["peak_dtype"] = str(dtype).removeprefix("torch.")
            out["matmul_peak_tflops"] = matmul_peak_tflops(dev, dtype)
            if out["achieved_tflops"] is not None:
                out["mfu"] = out["achieved_tflops"] / out["matmul_peak_tflops"]
            if out["sample_achieved_tflops"] is not None:
                out["sample_mfu"] = out["sample_achieved_tflops"] / out["matmul_peak_tflops"]
    return out


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The estimate of a run's wall time (`train --dry-run` and the start line of `train`)
# ------------------------------------------------------------------------------------------------

ESTIMATE_MIN_STEPS = 50  # runs of at most this many steps get no estimate: the warm-up would be a share of them
ESTIMATE_TIMED_STEPS = 3  # timed steps after one untimed one (allocation, compilation)
ESTIMATE_BUDGET_S = 5.0  # stop timing early once the timed steps took this long (at least one is timed)
ESTIMATE_CPU_BATCH = 32  # CPU images/s hardly depends on the batch: time a smaller one and scale


def estimate_step_seconds(spec: RunSpec, device: torch.device, precision, emit: Event = _ignore) -> dict:
    """Seconds per optimizer step of ``spec`` on ``device``: one untimed then up to
    :data:`ESTIMATE_TIMED_STEPS` timed steps of the real training step (``setup_training``'s, with the
    spec's compile setting) on random uint8 data of the spec's shape, with a throw-away model.

    On the CPU the batch is capped at :data:`ESTIMATE_CPU_BATCH` and the time scaled linearly to the
    spec's batch. The process's global RNG and math flags are left as they were. Returns
    ``{"step_seconds", "timed_steps", "batch", "scaled_to", "method"}``."""
    batch = spec.train.batch_size
    probe = min(batch, ESTIMATE_CPU_BATCH) if device.type == "cpu" else batch
    probe_spec = spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": probe})})
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    with _restore_global_state():
        one_step, read, training = ddpmctl_train_step(probe_spec, device, precision, emit=emit)
        one_step()
        read()
        sync(device)
        timed, t0 = 0, time.perf_counter()
        while timed < ESTIMATE_TIMED_STEPS and (timed == 0 or time.perf_counter() - t0 < ESTIMATE_BUDGET_S):
            one_step()  # the CPU runs it at once; an accelerator's steps are queued, and fast
            timed += 1
        read()
        sync(device)
        elapsed = time.perf_counter() - t0
        del one_step, read, training
    _free(device)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    step_s = elapsed / timed * batch / probe
    method = f"{timed} timed step{'s' if timed > 1 else ''}" + (
        f" at batch {probe}, scaled to {batch}" if probe != batch else "")
    return {"step_seconds": step_s, "timed_steps": timed, "batch": probe, "scaled_to": batch, "method": method}
