"""The training loop. Read it top to bottom: setup, then one loop in commented phases
(data, forward/backward, update, EMA, log, sample, checkpoint, stop).

The library never prints: everything the user sees goes through ``on_event(dict)``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ddpmctl import checkpoint as ck
from ddpmctl import spec as specmod
from ddpmctl.devices import choose_device, choose_precision, describe, set_fast_math
from ddpmctl.diffusion import Schedule
from ddpmctl.ema import EMA
from ddpmctl.errors import DdpmctlError, UsageError
from ddpmctl.images import make_grid, save_png
from ddpmctl.spec import RunSpec
from ddpmctl.step import make_train_step, maybe_compile
from ddpmctl.unet import build, count_parameters

Event = Callable[[dict], None]
GRID_NROW = 8
GRID_PADDING = 2


class Interrupted(DdpmctlError):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        import signal

        name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"{name} at step {step}: checkpoint written; continue with `ddpmctl resume {run_dir}`")


@dataclass
class StopFlag:
    """Set by a signal handler; the loop finishes the current step, checkpoints and stops."""

    signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = signum


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    epochs: float
    final_loss: float | None
    images_per_s: float | None
    checkpoint: str | None
    skipped_steps: int = 0
    samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def get_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to base_lr, then constant (as in Ho et al.)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def make_run_dir(spec: RunSpec, out: Path | None, root: Path = Path("runs")) -> Path:
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a directory for the run")
        if out.is_dir() and any(out.iterdir()):
            if (out / "spec.json").exists():
                raise UsageError(f"--out {out} already holds a run; continue it with `ddpmctl resume {out}`")
            raise UsageError(f"--out {out} exists and is not empty; choose a new or empty directory")
        return out
    name = Path(spec.data.source.rstrip("/")).name.split("@")[0] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    return path


def _noise_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def run(
    spec: RunSpec,
    run_dir: Path,
    *,
    resume: bool = False,
    on_event: Event | None = None,
    stop: StopFlag | None = None,
    data_root: Path | None = None,
    allow_download: bool = True,
) -> TrainResult:
    """Train (or continue training) the run in `run_dir` according to `spec`."""
    emit = on_event or (lambda e: None)
    stop = stop or StopFlag()
    tr, op = spec.train, spec.optim

    # ---- device and precision
    device = choose_device(tr.device)
    precision = choose_precision(tr.precision, device)
    deterministic = tr.deterministic or device.type == "cpu"
    set_fast_math(device, deterministic)

    # ---- data: the whole uint8 array on the device, batches are a function of (seed, epoch, index)
    from ddpmctl.data import load_images
    from ddpmctl.data.loader import DeviceLoader

    data = load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                       root=data_root, allow_download=allow_download, on_event=emit)
    loader = DeviceLoader(data.images, tr.batch_size, device, seed=tr.seed, flip=spec.data.flip)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = tr.max_steps or tr.epochs * steps_per_epoch

    # ---- model, schedule, optimizer, EMA
    torch.manual_seed(tr.seed)
    model = build(spec.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    schedule = Schedule.create(spec.diffusion.schedule, spec.diffusion.timesteps).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=op.lr, betas=(op.beta1, op.beta2),
                            weight_decay=op.weight_decay, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    ema = EMA(model, op.ema_decay, op.ema_warmup)
    gen = _noise_generator(device, tr.seed + 1)
    forward = maybe_compile(model, tr.compile, device, emit)
    train_step = make_train_step(forward, model, opt, ema, schedule, spec, precision, device, scaler)

    # ---- run dir and state
    step, images_seen, skipped, lr_scale = 0, 0, 0, 1.0
    run_dir = Path(run_dir)
    if resume:
        ckpt = ck.find_newest(run_dir, on_warning=lambda m: emit({"event": "warning", "message": m}))
        st = ckpt.state
        model.load_state_dict(ckpt.tensors("model", device))
        ema.load_state_dict(ckpt.tensors("ema", device))
        ck.optimizer_from_tensors(opt, ckpt.tensors("optim", device), st["optimizer"])
        rng = ckpt.tensors("rng")
        torch.set_rng_state(rng["cpu"])
        gen.set_state(rng["noise"].to(gen.device) if device.type != "cuda" else rng["noise"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if scaler is not None and "scaler" in st:
            scaler.load_state_dict(st["scaler"])
        ema.num_updates = st["ema_updates"]
        step, images_seen, skipped = st["step"], st["images_seen"], st.get("skipped_steps", 0)
        lr_scale = st.get("lr_scale", 1.0)
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        emit({"event": "resume", "checkpoint": str(ckpt.path), "step": step})
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        specmod.save(spec, run_dir / "spec.json")

    n_params = count_parameters(model)
    emit({"event": "start", "run_dir": str(run_dir), "device": describe(device), "precision": precision.name,
          "parameters": n_params, "images": int(data.images.shape[0]), "steps_per_epoch": steps_per_epoch,
          "total_steps": total_steps, "start_step": step, "compile": forward is not model})

    def save(at_step: int) -> Path:
        opt_tensors, opt_meta = ck.optimizer_to_tensors(opt)
        rng = {"cpu": torch.get_rng_state(), "noise": gen.get_state().cpu()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"epoch": at_step / steps_per_epoch, "images_seen": images_seen, "ema_updates": ema.num_updates,
                 "optimizer": opt_meta, "skipped_steps": skipped, "lr_scale": lr_scale,
                 "last_loss": last_loss, "total_steps": total_steps,
                 "steps_per_epoch": steps_per_epoch}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        path = ck.save_checkpoint(run_dir, at_step, {"model": model.state_dict(), "ema": ema.state_dict(),
                                                     "optim": opt_tensors, "rng": rng}, state, tr.keep_last)
        emit({"event": "checkpoint", "path": str(path), "step": at_step})
        return path

    # ---- the loop
    T = spec.diffusion.timesteps
    loss_sum = torch.zeros((), device=device)
    gnorm_sum = torch.zeros((), device=device)
    bad_count = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    last_loss: float | None = None
    images_per_s: float | None = None
    last_ckpt: Path | None = None
    samples: list[str] = []
    model.train()
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)

        # data
        x0 = loader.batch(epoch, index)
        t = torch.randint(0, T, (x0.shape[0],), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)

        # forward / backward / update / EMA (no host sync; a non-finite step is skipped on the device)
        lr = get_lr(step, op.lr, op.warmup_steps) * lr_scale
        loss, gnorm, finite = train_step(x0, t, noise, lr)

        loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        gnorm_sum += torch.where(finite, gnorm.detach().float(), 0.0)
        bad_count += (~finite).float()
        step += 1
        window_steps += 1
        images_seen += x0.shape[0]
        emit({"event": "tick", "step": step, "epoch": step / steps_per_epoch})

        # log: the only host-device sync, every log_every steps
        epoch_end = step % steps_per_epoch == 0
        if step % tr.log_every == 0 or epoch_end or step == total_steps:
            bad = int(bad_count.item())
            good = max(window_steps - bad, 1)
            last_loss = loss_sum.item() / good if bad < window_steps else float("nan")
            elapsed = time.perf_counter() - window_start
            images_per_s = window_steps * tr.batch_size / max(elapsed, 1e-9)
            skipped += bad
            rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss,
                   "grad_norm": gnorm_sum.item() / good, "lr": lr, "images_per_s": round(images_per_s, 2),
                   "skipped": bad, "time": time.time()}
            _append_metrics(run_dir / "metrics.jsonl", rec)
            emit({"event": "log", **rec})
            loss_sum.zero_(), gnorm_sum.zero_(), bad_count.zero_()
            window_steps, window_start = 0, time.perf_counter()

        # sample: a fixed-seed grid every sample_every epochs and at the end
        done = step >= total_steps
        if (epoch_end and (step // steps_per_epoch) % tr.sample_every == 0) or done:
            samples.append(str(_sample_grid(spec, run_dir, ema, device, precision, step // steps_per_epoch
                                            if epoch_end else math.ceil(step / steps_per_epoch), emit)))

        # checkpoint
        if step % tr.checkpoint_every == 0 or epoch_end or done or stop.signum is not None:
            last_ckpt = save(step)

        # stop on a signal, after the checkpoint
        if stop.signum is not None and not done:
            raise Interrupted(stop.signum, run_dir, step)

    if last_ckpt is None and step > 0:  # resumed a finished run: nothing to do
        last_ckpt = ck.find_newest(run_dir).path
    return TrainResult(str(run_dir), step, round(step / steps_per_epoch, 4), last_loss, images_per_s,
                       str(last_ckpt) if last_ckpt else None, skipped, samples)


def _sample_grid(spec: RunSpec, run_dir: Path, ema: EMA, device, precision, epoch: int, emit: Event) -> Path:
    """Draw the fixed-seed grid with the EMA weights and save samples/epoch_NNNN.png."""
    from ddpmctl.generate import Denoiser, generate

    net = build(spec.model).to(device)
    ema.copy_to(net)
    net.eval()
    den = Denoiser(net, spec, str(run_dir), None, "ema")
    sp = spec.sample
    seeds = [sp.seed + i for i in range(sp.grid_size)]
    imgs = torch.cat([b for _, b, _ in generate(den, seeds, sampler=sp.sampler, steps=sp.steps, eta=sp.eta,
                                                batch_size=256, device=device, precision=precision)])
    out_dir = run_dir / "samples"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"epoch_{epoch:04d}.png"
    save_png(path, make_grid(imgs, nrow=GRID_NROW, padding=GRID_PADDING))
    index_path = out_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"grids": []}
    index["grids"] = [g for g in index["grids"] if g["epoch"] != epoch] + [
        {"epoch": epoch, "file": path.name, "n": len(seeds), "nrow": GRID_NROW, "padding": GRID_PADDING,
         "seed": sp.seed, "sampler": sp.sampler, "steps": sp.steps}]
    ck.atomic_write_text(index_path, json.dumps(index, indent=1))
    emit({"event": "sample", "epoch": epoch, "path": str(path)})
    del net
    return path


def _append_metrics(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed process
    ck.atomic_write_text(path, "".join(k + "\n" for k in keep))
