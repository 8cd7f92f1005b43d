"""The training loop. Read it top to bottom: setup, then one loop in commented phases
(data, forward/backward, update, EMA, log + divergence guard, sample, checkpoint, stop).

The library never prints: everything the user sees goes through ``on_event(dict)``.

Reliability (docs/reliability.md): every piece of state that the next step depends on is in a
checkpoint (model, EMA, optimizer, grad scaler, counters, the device-side metric window, every RNG
stream; the data order is a function of (seed, epoch, index)), so in deterministic mode a run
resumed after a crash is bitwise identical to one never interrupted. Non-finite steps are skipped
on the device; a streak of them rolls back to the last good checkpoint with a smaller learning rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddpmctl import checkpoint as ck
from ddpmctl import spec as specmod
from ddpmctl.bench import ESTIMATE_MIN_STEPS, estimate_step_seconds
from ddpmctl.devices import choose_precision, describe, resolve, set_fast_math
from ddpmctl.dist import SINGLE, Dist, DistError, check_batch, fingerprint, rank_device
from ddpmctl.ema import EMA
from ddpmctl.errors import CheckpointError, DdpmctlError, NonFiniteError, RunDirError, UsageError
from ddpmctl.images import make_grid, save_png
from ddpmctl.lock import RunLock
from ddpmctl.safefile import open_owned, open_update, refuse_symlink
from ddpmctl.memory import check_fits
from ddpmctl.spec import RunSpec
from ddpmctl.engine import optimizer_for, setup_training
from ddpmctl.unet import build, count_parameters
from ddpmctl.writes import append_bytes

Event = Callable[[dict], None]
PROCESS_START = time.monotonic()  # train.time_limit counts this process's wall time from here
_TIME_LIMIT_FLAG = 1 << 8  # above any signal number: the stop flags of all ranks agree in one max_int
GRID_NROW = 8
GRID_PADDING = 2


class Interrupted(DdpmctlError):
    """Training stopped on a signal, after writing a checkpoint of the step it had finished."""

    def __init__(self, signum: int, run_dir: Path, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        saved = f"checkpoint {checkpoint.name} written" if checkpoint else "no step taken, nothing new to save"
        super().__init__(f"{signal.Signals(signum).name} at step {step}: {saved}; "
                         f"continue with `ddpmctl resume {run_dir}`")


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
    rollbacks: int = 0
    lr_scale: float = 1.0
    stopped: str | None = None  # "time_limit": stopped early at train.time_limit, with a checkpoint
    total_steps: int | None = None

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
        blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise UsageError(f"--out {out}: cannot create the run directory, {blocked} is a file")
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


@dataclass
class Counters:
    """Host-side training state; all of it goes into state.json."""

    step: int = 0
    images_seen: int = 0
    skipped: int = 0  # non-finite steps skipped, whole run (abandoned trajectories included)
    rollbacks: int = 0
    lr_scale: float = 1.0  # multiplied by optim.lr_backoff at each rollback
    last_loss: float | None = None
    window_steps: int = 0  # steps since the last log record
    metrics_bytes: int = 0  # length of metrics.jsonl after the last record
    retreat: tuple[int, int] | None = None  # (step rolled back to, step that tripped) until past that trip


class DeviceStats:
    """The metric window and the non-finite streak, accumulated on the device so a step never syncs.

    `streak` counts non-finite steps in a row; `trip` is the step at which a streak first reached
    `rollback_after` (-1: none). Both are read at log points only.
    """

    def __init__(self, device: torch.device, rollback_after: int):
        self.rollback_after = rollback_after
        self.loss_sum = torch.zeros((), device=device)
        self.gnorm_sum = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.trip = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, gnorm: torch.Tensor, finite: torch.Tensor, step: int) -> None:
        self.loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self.gnorm_sum += torch.where(finite, gnorm.detach().float(), 0.0)
        self.bad += (~finite).float()
        self.streak.add_(1).mul_(~finite)
        if self.rollback_after:
            tripped = (self.trip < 0) & (self.streak >= self.rollback_after)
            self.trip.copy_(torch.where(tripped, step, self.trip))

    def read(self) -> tuple[float, float, int, int, int]:
        """(loss_sum, gnorm_sum, bad, streak, trip) in one host-device sync (two after a trip)."""
        loss_sum, gnorm_sum, bad, streak, tripped = torch.stack(
            [self.loss_sum, self.gnorm_sum, self.bad, self.streak.float(), (self.trip >= 0).float()]).tolist()
        return loss_sum, gnorm_sum, int(bad), int(streak), int(self.trip.item()) if tripped else -1

    def reset_window(self) -> None:
        self.loss_sum.zero_(), self.gnorm_sum.zero_(), self.bad.zero_()

    def reset_health(self) -> None:
        self.streak.zero_(), self.trip.fill_(-1)

    def state_dict(self) -> dict:
        loss_sum, gnorm_sum, bad, streak, trip = self.read()
        return {"loss_sum": loss_sum, "gnorm_sum": gnorm_sum, "bad": bad, "streak": streak, "trip": trip}

    def load_state_dict(self, st: dict) -> None:
        self.loss_sum.fill_(st.get("loss_sum", 0.0)), self.gnorm_sum.fill_(st.get("gnorm_sum", 0.0))
        self.bad.fill_(st.get("bad", 0)), self.streak.fill_(st.get("streak", 0)), self.trip.fill_(st.get("trip", -1))


def run(
    spec: RunSpec,
    run_dir: Path,
    *,
    resume: bool = False,
    on_event: Event | None = None,
    stop: StopFlag | None = None,
    data_root: Path | None = None,
    allow_download: bool = True,
    dist: Dist = SINGLE,
    device: torch.device | None = None,
) -> TrainResult:
    """Train (or continue training) the run in `run_dir` according to `spec`.

    Holds RUN_DIR/.lock for the whole run: a second train/resume of the same run dir is refused.

    ``dist`` (:func:`ddpmctl.dist.from_env`): this process is one rank of a torchrun job. Every rank
    runs this function; the spec's batch size is the global batch, each rank computes on its slice
    of it, and only rank 0 writes to the run dir (which must be on a filesystem all ranks see).

    ``device``: the device the CLI resolved (on CUDA each rank takes ``cuda:LOCAL_RANK``); None
    resolves ``spec.train.device``, which stays what spec.json records. The backend flags
    (:func:`ddpmctl.devices.set_fast_math`) are set here, from ``train.deterministic``.
    """
    emit = on_event or (lambda e: None)
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as held:
        if resume:
            ck.check_run_dir(run_dir)
            if dist.is_main:
                held.enter_context(RunLock(run_dir, on_warning=lambda m: emit({"event": "warning", "message": m})))
        return _run(spec, run_dir, resume, emit, stop or StopFlag(), data_root, allow_download, held, dist,
                    resolve(device if device is not None else spec.train.device))


def _run(spec: RunSpec, run_dir: Path, resume: bool, emit: Event, stop: StopFlag, data_root: Path | None,
         allow_download: bool, held: contextlib.ExitStack, dist: Dist, asked: torch.device) -> TrainResult:
    tr, op = spec.train, spec.optim
    warn = lambda m: emit({"event": "warning", "message": m})  # noqa: E731
    main = dist.is_main  # the one rank that writes

    # ---- device and precision
    device = rank_device(asked, dist)
    precision = choose_precision(tr.precision, device)
    deterministic = tr.deterministic or device.type == "cpu"
    set_fast_math(device, deterministic)

    # ---- data: the whole uint8 array on the device, batches are a function of (seed, epoch, index);
    #      one process per machine prepares (downloads) it, the others then read the prepared copy
    from ddpmctl.data import load_images
    from ddpmctl.data.loader import DeviceLoader

    def load(**kw):
        return load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                           root=data_root, on_event=emit, **kw)

    data = load(allow_download=allow_download) if dist.local_rank == 0 else None
    dist.barrier()
    data = data if data is not None else load(allow_download=False)
    global_batch = min(tr.batch_size, int(data.images.shape[0]))
    check_batch(global_batch, dist.world_size)
    # before the model is allocated: a spec that cannot fit the device is refused with the estimate
    check_fits(spec, device, precision.name, math.ceil(global_batch / dist.world_size))
    loader = DeviceLoader(data.images, tr.batch_size, device, seed=tr.seed, flip=spec.data.flip,
                          shard=(dist.rank, dist.world_size))
    steps_per_epoch = loader.steps_per_epoch
    total_steps = tr.max_steps or tr.epochs * steps_per_epoch
    rows = dist.shard(global_batch)  # this rank's rows of the global t and noise

    # ---- the estimate of the run's wall time: a few real steps on random data with a throw-away
    #      model (before the run's own seeding, so it changes nothing); skipped for tiny runs
    estimate = None
    if total_steps > ESTIMATE_MIN_STEPS and not dist.distributed:
        estimate = estimate_step_seconds(spec, device, precision)

    # ---- model, schedule, optimizer, EMA (identical on every rank: same seed; DDP checks it)
    torch.manual_seed(tr.seed)
    training = setup_training(spec, device, precision, emit, dist=dist)  # the same setup `ddpmctl bench` measures
    model, ema, scaler = training.model, training.ema, training.scaler  # training.opt/.step: see warm start
    forward = training.forward
    gen = _noise_generator(device, tr.seed + 1)

    c = Counters()
    stats = DeviceStats(device, tr.rollback_after)
    metrics_path = run_dir / "metrics.jsonl"

    def restore(ckpt: ck.Checkpoint, *, everything: bool) -> None:
        """Load a checkpoint into the live objects. A rollback keeps the run-wide counters.

        Everything is checked before torch sees it: state.json's field types, and every tensor's name,
        dtype and shape against the live model, EMA, optimizer and RNG streams (a forged optimizer
        moment of the wrong shape would crash fused AdamW; a wrong dtype would be cast silently)."""
        name = ckpt.state.get("optimizer_name", "adamw")  # the one that wrote it (older checkpoints: AdamW)
        if name not in ("adamw", "sgd"):
            raise CheckpointError(f"{ckpt.path / 'state.json'}: field 'optimizer_name': expected 'adamw' or 'sgd', "
                                  f"found {str(name)[:40]!r}")
        training.use_optimizer(name)
        opt = training.opt
        st = _checked_state(ckpt, opt, scaler)
        tensors = {name: ckpt.tensors(name, device) for name in ("model", "ema", "optim")}
        ck.check_fits_spec(ckpt, "model", tensors["model"], ck.tensor_specs(model.state_dict()))
        ck.check_fits_spec(ckpt, "ema", tensors["ema"], ck.tensor_specs(ema.state_dict()))
        ck.check_fits_spec(ckpt, "optim", tensors["optim"], ck.optimizer_tensor_specs(opt))
        rng = ckpt.tensors("rng")
        live_rng = {"cpu": torch.get_rng_state(), "noise": gen.get_state()}
        if device.type == "cuda":
            live_rng["cuda"] = torch.cuda.get_rng_state(device)
        ck.check_tensors(rng, ck.tensor_specs(live_rng), str(ckpt.path / "rng.safetensors"),
                         optional=frozenset({"cuda"}))
        try:
            model.load_state_dict(tensors["model"])
            ema.load_state_dict(tensors["ema"])
            ck.optimizer_from_tensors(opt, tensors["optim"], st["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path} does not fit spec.json ({str(exc).splitlines()[0][:200]}); "
                                  "was spec.json edited?") from None
        torch.set_rng_state(rng["cpu"])
        gen.set_state(rng["noise"].to(gen.device) if device.type != "cuda" else rng["noise"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if scaler is not None and st.get("scaler") is not None:
            scaler.load_state_dict(st["scaler"])
        ema.num_updates = st["ema_updates"]
        c.step, c.images_seen, c.window_steps = st["step"], st["images_seen"], st.get("window_steps", 0)
        if everything:
            c.skipped, c.rollbacks = st.get("skipped_steps", 0), st.get("rollbacks", 0)
            c.lr_scale, c.last_loss = st.get("lr_scale", 1.0), st.get("last_loss")
            c.retreat = tuple(st["retreat"]) if st.get("retreat") else None
            stats.load_state_dict(st.get("window", {}))
        else:
            c.window_steps = 0
            stats.reset_window(), stats.reset_health()

    def agree_on(found: ck.Checkpoint | None, what: str) -> None:
        """Every rank read the checkpoint itself; they must have found the same one."""
        steps = dist.gather_floats([found.step if found is not None else -1])
        if len({s[0] for s in steps}) > 1:
            raise DistError(f"ranks found different checkpoints to {what} (steps {[int(s[0]) for s in steps]}): "
                            f"{run_dir} must be on a filesystem every rank sees, unchanged while the job starts")

    # ---- run dir and state: a fresh run (the directory is made only now that the setup worked),
    #      or everything back from the newest valid checkpoint
    ckpt = None
    if not resume:
        if main:
            made = _create_run_dir(run_dir)
            lock = held.enter_context(RunLock(run_dir, on_warning=warn))
            if (run_dir / "spec.json").exists():
                raise UsageError(f"{run_dir} already holds a run; continue it with `ddpmctl resume {run_dir}`")
            made += [] if (run_dir / ck.CKPT_DIR).exists() else [run_dir / ck.CKPT_DIR]
            try:  # ---- pre-flight: before spec.json, the run dir must take two checkpoints
                _preflight(run_dir, _checkpoint_bytes(model, ema))
            except DdpmctlError:  # a refused start leaves nothing behind: the same command can run again
                lock.release()
                for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only when empty
                raise
            specmod.save(spec, run_dir / "spec.json")  # from here on `ddpmctl resume` can continue the run
    else:
        try:
            ckpt = ck.find_newest(run_dir, on_warning=warn)
        except CheckpointError:
            if ck.has_checkpoints(run_dir):
                raise
            warn(f"{run_dir} has no complete checkpoint yet; starting again from step 0")
        agree_on(ckpt, "resume from")
        if ckpt is not None:
            restore(ckpt, everything=True)
            dist.barrier()  # every rank has read it: rank 0 may now clean up
            removed = ck.discard_after(run_dir, ckpt) if main else []
            if removed:
                warn(f"removed {', '.join(removed)}: newer than {ckpt.path.name} (broken, or written after it by "
                     "the interrupted process); training writes them again")
            if ckpt.state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
                warn(f"the data now gives {steps_per_epoch} steps per epoch, {ckpt.state['steps_per_epoch']} when "
                     "the checkpoint was written: the data order differs from an uninterrupted run")
            was = ckpt.state.get("precision")
            if was is not None and was != precision.name:
                warn(f"trained in {was} until step {c.step}, continuing in {precision.name} (--precision "
                     f"{tr.precision} on {describe(device)}): not bitwise an uninterrupted run; "
                     f"`ddpmctl resume {run_dir} --precision {was}` keeps it")
            emit({"event": "resume", "checkpoint": str(ckpt.path), "step": c.step})
        if main:
            c.metrics_bytes = _truncate_metrics(metrics_path,
                                                ckpt.state if ckpt else {"step": 0, "metrics_bytes": 0})
    start_step = c.step

    # ---- pre-flight: before the first step, the run dir must take two checkpoints (a new run: above)
    if main and resume:
        _preflight(run_dir, _checkpoint_bytes(model, ema))

    n_params = count_parameters(model)
    emit({"event": "start", "run_dir": str(run_dir), "device": describe(device), "precision": precision.name,
          "parameters": n_params, "images": int(data.images.shape[0]), "steps_per_epoch": steps_per_epoch,
          "total_steps": total_steps, "start_step": c.step, "compile": forward is not model,
          "deterministic": deterministic, "world_size": dist.world_size, "global_batch": global_batch,
          "estimate": None if estimate is None else
          {**estimate, "steps": total_steps - c.step, "seconds": estimate["step_seconds"] * (total_steps - c.step)}})

    def append_metrics(rec: dict) -> None:
        if main:
            c.metrics_bytes = _append_metrics(metrics_path, rec)

    def check_replicas() -> dict:
        """All ranks must hold the same weights (DDP's promise); checked at every checkpoint."""
        prints = dist.gather_floats(fingerprint(list(model.parameters())))
        if any(p != prints[0] for p in prints):
            raise DistError(f"step {c.step}: the ranks' weights differ (fingerprints {prints}); "
                            "the checkpoint is not written. Report this with the command line")
        return {"world_size": dist.world_size, "fingerprints": prints}

    def save() -> Path:
        if c.retreat is not None and c.step > c.retreat[1]:
            c.retreat = None  # got past the step that diverged last time
        opt_tensors, opt_meta = ck.optimizer_to_tensors(training.opt)
        rng = {"cpu": torch.get_rng_state(), "noise": gen.get_state().cpu()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"epoch": c.step / steps_per_epoch, "images_seen": c.images_seen, "ema_updates": ema.num_updates,
                 "optimizer": opt_meta, "optimizer_name": training.opt_name, "skipped_steps": c.skipped,
                 "rollbacks": c.rollbacks,
                 "lr_scale": c.lr_scale, "last_loss": c.last_loss, "total_steps": total_steps,
                 "steps_per_epoch": steps_per_epoch, "window_steps": c.window_steps, "window": stats.state_dict(),
                 "metrics_bytes": c.metrics_bytes, "retreat": c.retreat, "seed": tr.seed,
                 "precision": precision.name}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        replicas = check_replicas() if dist.distributed else None
        if not main:
            return run_dir / ck.CKPT_DIR / ck.checkpoint_name(c.step)
        if replicas is not None:
            state["ranks"] = replicas
        path = ck.save_checkpoint(run_dir, c.step, {"model": model.state_dict(), "ema": ema.state_dict(),
                                                    "optim": opt_tensors, "rng": rng}, state, tr.keep_last)
        emit({"event": "checkpoint", "path": str(path), "step": c.step})
        return path

    def rollback(trip: int, lr: float) -> ck.Checkpoint:
        """`rollback_after` non-finite steps in a row: back to the newest checkpoint whose weights came
        before the streak (the weights do not change during it), with a smaller learning rate. Until
        the run gets past the step that diverged, a new divergence goes back further than the last."""
        k = tr.rollback_after
        if c.rollbacks >= tr.max_rollbacks:
            raise NonFiniteError(
                f"training diverged: {k} non-finite steps in a row at step {trip}, after {c.rollbacks} rollback(s) "
                f"(learning rate now {lr:.3g}); lower optim.lr or raise optim.warmup_steps, then resume")
        before = trip - k if c.retreat is None else min(trip - k, c.retreat[0])
        try:
            target = ck.find_newest(run_dir, on_warning=warn, before_step=before)
        except CheckpointError:
            raise NonFiniteError(
                f"training diverged: {k} non-finite steps in a row at step {trip}, and no checkpoint from before "
                f"step {before} to roll back to; lower optim.lr (now {lr:.3g}) or raise optim.warmup_steps"
            ) from None
        agree_on(target, "roll back to")
        at = c.step
        restore(target, everything=False)
        c.lr_scale *= op.lr_backoff
        c.rollbacks += 1
        c.retreat = (target.step, max(trip, c.retreat[1]) if c.retreat else trip)
        dist.barrier()  # every rank has read the target before rank 0 removes what came after it
        if main:
            ck.discard_after(run_dir, target)
        rec = {"event": "rollback", "step": at, "to_step": target.step, "streak_from": trip - k + 1,
               "lr_scale": c.lr_scale, "rollbacks": c.rollbacks, "time": time.time()}
        append_metrics(rec)
        emit(rec)
        return target

    # ---- the loop
    T = spec.diffusion.timesteps
    window_start = time.perf_counter()
    images_per_s: float | None = None
    last_ckpt: Path | None = ckpt.path if ckpt else None
    samples: list[str] = []
    model.train()
    while c.step < total_steps:
        if c.step == start_step:  # a signal before the first step
            early = dist.max_int(stop.signum or 0)
            if early:
                raise Interrupted(early, run_dir, c.step, None)
        epoch, index = divmod(c.step, steps_per_epoch)

        # data: this rank's rows of the global batch; t and noise drawn for the whole global batch
        # on every rank (same generator state everywhere), so they do not depend on the rank count
        x0 = loader.batch(epoch, index)
        t = torch.randint(0, T, (global_batch,), device=device, generator=gen)[rows]
        noise = torch.randn((global_batch, *x0.shape[1:]), device=device, generator=gen)[rows]

        # warm start (optim.warm_start_steps): SGD with momentum until then, AdamW with a fresh state after
        if training.use_optimizer(optimizer_for(c.step, spec)):
            emit({"event": "optimizer", "step": c.step, "name": training.opt_name,
                  "message": f"step {c.step}: SGD warm start over, switching to AdamW with a fresh state"})

        # forward / backward / update / EMA (no host sync; a non-finite step is skipped on the device)
        lr = get_lr(c.step, op.lr, op.warmup_steps) * c.lr_scale
        with dist.guard():  # a rank that died shows up here first, as a failed all-reduce
            loss, gnorm, finite = training.step(x0, t, noise, lr)
        c.step += 1
        c.images_seen += global_batch
        c.window_steps += 1
        stats.update(loss, gnorm, finite, c.step)
        emit({"event": "tick", "step": c.step, "epoch": c.step / steps_per_epoch})
        # read once (a signal from here on is handled next step), and agreed by every rank; the time
        # limit is a host clock check, so it costs no device sync
        out_of_time = tr.time_limit is not None and time.monotonic() - PROCESS_START >= tr.time_limit
        flags = dist.max_int((stop.signum or 0) | (_TIME_LIMIT_FLAG if out_of_time else 0))
        signum, out_of_time = flags & (_TIME_LIMIT_FLAG - 1), bool(flags & _TIME_LIMIT_FLAG)
        stopping = signum != 0 or out_of_time
        epoch_end = c.step % steps_per_epoch == 0
        done = c.step >= total_steps

        # log: the only host-device sync, every log_every steps; then the divergence guard
        if c.step % tr.log_every == 0 or epoch_end or done:
            loss_sum, gnorm_sum, bad, _streak, trip = stats.read()
            good = max(c.window_steps - bad, 1)
            c.last_loss = loss_sum / good if bad < c.window_steps else float("nan")
            elapsed = time.perf_counter() - window_start
            images_per_s = c.window_steps * global_batch / max(elapsed, 1e-9)
            c.skipped += bad
            rec = {"step": c.step, "epoch": round(c.step / steps_per_epoch, 4), "loss": c.last_loss,
                   "grad_norm": gnorm_sum / good, "lr": lr, "images_per_s": round(images_per_s, 2),
                   "skipped": bad, "time": time.time()}
            append_metrics(rec)
            emit({"event": "log", **rec})
            stats.reset_window()
            c.window_steps, window_start = 0, time.perf_counter()
            if trip >= 0:
                target = rollback(trip, lr)
                if signum:
                    raise Interrupted(signum, run_dir, c.step, target.path)
                continue  # out of time: stops after the next step, with a checkpoint of it

        # sample: a fixed-seed grid every sample_every epochs and at the end (+ an EMA milestone)
        side_start = time.perf_counter()  # sampling and checkpoints are kept out of images/s
        sample_epoch = epoch_end and (c.step // steps_per_epoch) % tr.sample_every == 0
        if (sample_epoch or done) and main:  # the other ranks go on and wait at the next all-reduce
            n = c.step // steps_per_epoch if epoch_end else math.ceil(c.step / steps_per_epoch)
            samples.append(str(_sample_grid(spec, run_dir, ema, device, precision, n, c.step, emit)))
            if sample_epoch and tr.milestones:
                ck.save_milestone(run_dir, n, c.step, ema.state_dict(), {"ema_updates": ema.num_updates})

        # checkpoint: scheduled ones wait while steps are non-finite (they would hold suspect weights)
        scheduled = c.step % tr.checkpoint_every == 0 or epoch_end
        if stopping or done or (scheduled and int(stats.streak.item()) == 0):
            last_ckpt = save()
        elif scheduled:
            warn(f"step {c.step}: checkpoint postponed while training steps are non-finite")
        window_start += time.perf_counter() - side_start

        # stop on a signal or at the time limit, after the checkpoint
        if signum and not done:
            raise Interrupted(signum, run_dir, c.step, last_ckpt)
        if out_of_time and not done:
            return TrainResult(str(run_dir), c.step, round(c.step / steps_per_epoch, 4), c.last_loss, images_per_s,
                               str(last_ckpt), c.skipped, samples, c.rollbacks, c.lr_scale, "time_limit",
                               total_steps)

    if last_ckpt is None and c.step > 0:  # resumed a finished run: nothing to do
        last_ckpt = ck.find_newest(run_dir).path
    return TrainResult(str(run_dir), c.step, round(c.step / steps_per_epoch, 4), c.last_loss, images_per_s,
                       str(last_ckpt) if last_ckpt else None, c.skipped, samples, c.rollbacks, c.lr_scale,
                       None, total_steps)


class _Window(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    loss_sum: float = 0.0
    gnorm_sum: float = 0.0
    bad: int = Field(0, ge=0)
    streak: int = Field(0, ge=0)
    trip: int = Field(-1, ge=-1)


class _OptimState(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    param_groups: list[dict]
    scalars: dict[str, dict[str, float]] = {}


class TrainState(BaseModel):
    """The types of the state.json fields `resume` reads back (what ``save()`` in :func:`run` writes);
    fields of older checkpoints that lack one take its default."""

    model_config = ConfigDict(strict=True, extra="allow")
    step: int = Field(ge=0)
    images_seen: int = Field(ge=0)
    ema_updates: int = Field(ge=0)
    optimizer: _OptimState
    skipped_steps: int = Field(0, ge=0)
    rollbacks: int = Field(0, ge=0)
    lr_scale: float = Field(1.0, gt=0, le=1)
    last_loss: float | None = None
    window_steps: int = Field(0, ge=0)
    window: _Window = _Window()
    metrics_bytes: int | None = Field(None, ge=0)
    retreat: list[int] | None = Field(None, min_length=2, max_length=2)
    steps_per_epoch: int | None = Field(None, ge=1)
    precision: str | None = None
    scaler: dict | None = None


def _checked_state(ckpt: ck.Checkpoint, opt: torch.optim.Optimizer, scaler) -> dict:
    """ckpt.state with every field resume uses checked for its type (CheckpointError naming the field),
    the optimizer's param groups and the grad scaler's state against what the live ones would write."""
    where = str(ckpt.path / "state.json")
    try:
        st = TrainState.model_validate(ckpt.state).model_dump()
    except ValidationError as exc:
        e = exc.errors()[0]
        field_name = ".".join(str(p) for p in e["loc"])
        raise CheckpointError(f"{where}: field {field_name!r}: {e['msg']} (found {str(e.get('input'))[:40]!r})"
                              f"{'' if len(exc.errors()) == 1 else f' (and {len(exc.errors()) - 1} more)'}") from None
    live = json.loads(json.dumps(opt.state_dict()["param_groups"]))
    ck.check_json_like(st["optimizer"]["param_groups"], live, where, at="optimizer.param_groups")
    for i, (found, want) in enumerate(zip(st["optimizer"]["param_groups"], live)):
        if found.get("params") != want["params"]:  # torch maps saved state to parameters by these indices
            raise CheckpointError(f"{where}: optimizer.param_groups[{i}].params does not list the parameters "
                                  f"0..{len(want['params']) - 1} of spec.json's network in order")
    n_params = sum(len(g["params"]) for g in live)
    bad = [k for k in st["optimizer"]["scalars"] if not k.isdigit() or int(k) >= n_params]
    if bad:
        raise CheckpointError(f"{where}: optimizer.scalars names parameter {bad[0]!r}, expected 0..{n_params - 1}")
    if scaler is not None and st.get("scaler") is not None:
        ck.check_json_like(st["scaler"], scaler.state_dict(), where, at="scaler")
    return st


def _create_run_dir(run_dir: Path) -> list[Path]:
    """Make the run dir (and its missing parents); return the folders it made."""
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists() and not p.is_symlink()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return made
    except FileExistsError:
        raise UsageError(f"{run_dir} is a file; give a directory for the run") from None
    except NotADirectoryError:
        raise UsageError(f"cannot create the run directory {run_dir}: a parent of it is a file") from None
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None


def _checkpoint_bytes(model: torch.nn.Module, ema: EMA) -> int:
    """About what one checkpoint takes: weights, EMA, AdamW's two moments, RNG and JSON."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    shadow = sum(t.numel() * t.element_size() for t in ema.state_dict().values())
    moments = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights + shadow + moments + (1 << 20)


def _preflight(run_dir: Path, checkpoint_bytes: int) -> None:
    """The run dir is writable and has room for two checkpoints (the new one is complete before the
    oldest is pruned)."""
    ckdir = run_dir / ck.CKPT_DIR
    probe = ckdir / f".tmp-probe-{os.getpid()}"
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        probe.unlink(missing_ok=True)
        with os.fdopen(open_owned(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            f.write(b"ddpmctl")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"the run directory {run_dir} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(ckdir).free
    if free < 2 * checkpoint_bytes:
        raise CheckpointError(
            f"not enough free space for checkpoints in {run_dir}: {_human(free)} free, two checkpoints need "
            f"{_human(2 * checkpoint_bytes)} ({_human(checkpoint_bytes)} each); free some space or use --out "
            "on another disk")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _sample_grid(spec: RunSpec, run_dir: Path, ema: EMA, device, precision, epoch: int, step: int,
                 emit: Event) -> Path:
    """Draw the fixed-seed grid with the EMA weights and save samples/epoch_NNNN.png.

    Runs under fork_rng: building the throw-away network must not move the training RNG streams."""
    from ddpmctl.generate import generate
    from ddpmctl.modelfolder import Denoiser

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        net = build(spec.model).to(device)
    ema.copy_to(net)
    net.eval()
    den = Denoiser(net, spec, str(run_dir), None, "ema")
    sp = spec.sample
    seeds = [sp.seed + i for i in range(sp.grid_size)]
    try:
        imgs = torch.cat([b for _, b, _ in generate(den, seeds, sampler=sp.sampler, steps=sp.steps, eta=sp.eta,
                                                    batch_size=256, device=device, precision=precision)])
    except NonFiniteError as exc:
        raise NonFiniteError(f"the sample grid at training step {step} (epoch {epoch}): {exc}") from None
    out_dir = run_dir / "samples"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"epoch_{epoch:04d}.png"
    save_png(path, make_grid(imgs, nrow=GRID_NROW, padding=GRID_PADDING))
    index_path = run_dir / ck.SAMPLE_INDEX
    try:
        grids = ck.read_sample_index(run_dir)
    except RunDirError as exc:  # never lose the training step to it: keep the damaged file aside, start anew
        aside = index_path.with_name(f"index.json.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(index_path, aside)
        emit({"event": "warning", "message": f"{exc}; moved it to {aside} and started a new index "
                                             "(the grid images are kept)"})
        grids = []
    index = {"grids": [g for g in grids if g["epoch"] != epoch] + [
        {"epoch": epoch, "file": path.name, "n": len(seeds), "nrow": GRID_NROW, "padding": GRID_PADDING,
         "seed": sp.seed, "sampler": sp.sampler, "steps": sp.steps}]}
    ck.atomic_write_text(index_path, json.dumps(index, indent=1))
    emit({"event": "sample", "epoch": epoch, "path": str(path)})
    del net
    return path


def _append_metrics(path: Path, rec: dict) -> int:
    """Append one record; return the file's length (saved in checkpoints to truncate on resume)."""
    try:
        return append_bytes(path, (json.dumps(rec) + "\n").encode("utf-8"), kept=lambda: (
            f"{path.name} keeps its earlier records; {ck.still_newest(path.parent / ck.CKPT_DIR)}"))
    except OSError as exc:
        raise DdpmctlError(f"cannot write {path}: {exc.strerror or exc}") from None


def _truncate_metrics(path: Path, state: dict) -> int:
    """Drop what was logged after the checkpoint we resume from (it will be logged again, identically
    in deterministic mode); return the new length. The file is cut to the length the checkpoint
    recorded, and then to its last complete line: a line torn by a crash (even one the checkpoint
    counted, when the file lost its unsynced tail) never has the next record glued onto it."""
    refuse_symlink(path)  # before anything is read or trained: the log is appended to in place
    if not path.exists():
        return 0
    keep_bytes = state.get("metrics_bytes")
    if keep_bytes is not None:
        size = path.stat().st_size
        keep = _complete_lines_length(path, min(size, keep_bytes))
        if size > keep:
            with open_update(path) as f:  # never through a symlink (ddpmctl.safefile)
                f.truncate(keep)
        return path.stat().st_size
    keep = []  # checkpoints of older versions: truncate by step
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), (int, float)) and rec.get("step", 0) <= state["step"]:
            keep.append(line)
    ck.atomic_write_text(path, "".join(k + "\n" for k in keep))
    return path.stat().st_size


def _complete_lines_length(path: Path, limit: int) -> int:
    """The length of the longest prefix of ``path``, at most ``limit`` bytes, that ends with a newline."""
    with open(path, "rb") as f:
        end = limit
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0
