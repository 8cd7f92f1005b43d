"""The training loop. Read :func:`_run` and then :class:`_Trainer` top to bottom: setup (device,
data, estimate, model), a fresh run dir or resume, the loop (data, forward/backward/update/EMA,
log + divergence guard, sample, checkpoint, stop), rollback and checkpoint writing.

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
from ddpmctl import rundir
from ddpmctl.bench import ESTIMATE_MIN_STEPS, estimate_step_seconds
from ddpmctl.cond import Cond
from ddpmctl.devices import choose_precision, describe, resolve, set_fast_math
from ddpmctl.dist import SINGLE, Dist, DistError, check_batch, fingerprint, rank_device
from ddpmctl.ema import EMA
from ddpmctl.errors import CheckpointError, DdpmctlError, NonFiniteError, RunDirError, UsageError
from ddpmctl.images import make_grid, save_png
from ddpmctl.lock import RunLock
from ddpmctl.safefile import open_owned
from ddpmctl.memory import check_fits
from ddpmctl.spec import RunSpec
from ddpmctl.engine import optimizer_for, setup_training
from ddpmctl.unet import build, count_parameters
from ddpmctl.units import human_bytes

Event = Callable[[dict], None]
PROCESS_START = time.monotonic()  # train.time_limit counts this process's wall time from here
_TIME_LIMIT_FLAG = 1 << 8  # above any signal number: the stop flags of all ranks agree in one max_int
GRID_NROW = 8
GRID_PADDING = 2
GRID_MAX_CLASS_ROWS = 16  # a conditional run's grids show its first 16 classes, a row each


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
            if rundir.spec_path(out).exists():
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
    """The phases in order: setup (device, data, estimate, model), then a fresh run dir or the state
    of the newest checkpoint, the start event, and the loop."""
    run = _Trainer(spec, run_dir, emit, stop, dist)
    run.setup(asked, data_root, allow_download)
    ckpt = run.resume_state() if resume else None
    if ckpt is None and spec.train.init is not None:
        run.init_from(spec.train.init)  # before a fresh run dir is made: a bad source leaves nothing behind
    if not resume:
        run.create(held)
    run.announce()
    return run.loop(ckpt.path if ckpt else None)


class _Trainer:
    """One run's live objects (model, optimizer, EMA, data, RNG streams, :class:`Counters`,
    :class:`DeviceStats`) and the phases of :func:`_run` as methods, in the order they run."""

    def __init__(self, spec: RunSpec, run_dir: Path, emit: Event, stop: StopFlag, dist: Dist):
        self.spec, self.tr, self.op = spec, spec.train, spec.optim
        self.run_dir, self.emit, self.stop, self.dist = run_dir, emit, stop, dist
        self.main = dist.is_main  # the one rank that writes
        self.c = Counters()
        self.samples: list[str] = []
        self.images_per_s: float | None = None
        self.last_ckpt: Path | None = None

    def warn(self, message: str) -> None:
        self.emit({"event": "warning", "message": message})

    # ---------------------------------------------------------------------------------------------
    # setup: device and precision, data, the wall-time estimate, model/optimizer/EMA
    # ---------------------------------------------------------------------------------------------

    def setup(self, asked: torch.device, data_root: Path | None, allow_download: bool) -> None:
        tr = self.tr
        self.device = rank_device(asked, self.dist)
        self.precision = choose_precision(tr.precision, self.device)
        self.deterministic = tr.deterministic or self.device.type == "cpu"
        set_fast_math(self.device, self.deterministic)
        self.load_data(data_root, allow_download)
        # the estimate of the run's wall time: a few real steps on random data with a throw-away
        # model (before the run's own seeding, so it changes nothing); skipped for tiny runs
        self.estimate = None
        if self.total_steps > ESTIMATE_MIN_STEPS and not self.dist.distributed:
            self.estimate = estimate_step_seconds(self.spec, self.device, self.precision)
        self.build()

    def load_data(self, data_root: Path | None, allow_download: bool) -> None:
        """The whole uint8 array on the device, batches a function of (seed, epoch, index); one
        process per machine prepares (downloads) it, the others then read the prepared copy."""
        from ddpmctl.data import load_images
        from ddpmctl.data.loader import DeviceLoader

        spec, tr, dist = self.spec, self.tr, self.dist

        def load(**kw):
            return load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                               root=data_root, on_event=self.emit, **kw)

        data = load(allow_download=allow_download) if dist.local_rank == 0 else None
        dist.barrier()
        data = data if data is not None else load(allow_download=False)
        labels = self.use_classes(data) if spec.model.conditional else None
        self.n_images = int(data.images.shape[0])
        self.global_batch = min(tr.batch_size, self.n_images)
        check_batch(self.global_batch, dist.world_size)
        # before the model is allocated: a spec that cannot fit the device is refused with the estimate
        check_fits(spec, self.device, self.precision.name, math.ceil(self.global_batch / dist.world_size))
        self.loader = DeviceLoader(data.images, tr.batch_size, self.device, seed=tr.seed, flip=spec.data.flip,
                                   shard=(dist.rank, dist.world_size), labels=labels)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total_steps = tr.max_steps or tr.epochs * self.steps_per_epoch
        self.rows = dist.shard(self.global_batch)  # this rank's rows of the global t and noise

    def use_classes(self, data) -> torch.Tensor:
        """A conditional run takes the data's labels; its class names go into spec.model.classes (and so
        into spec.json) when the spec has none, and must equal them when it has (resume, --set)."""
        from ddpmctl.data.labels import why_unlabelled

        model = self.spec.model
        if data.labels is None:
            raise UsageError(why_unlabelled(data.info))
        if not model.classes:
            model.classes = tuple(data.classes)
        elif list(model.classes) != list(data.classes):
            raise UsageError(f"the spec's classes {list(model.classes)[:10]} differ from the data's "
                             f"{list(data.classes)[:10]} ({data.name}); train on the data the model was made for")
        return data.labels

    def build(self) -> None:
        """Model, schedule, optimizer, EMA (identical on every rank: same seed; DDP checks it), the
        noise generator and the device-side metric window."""
        torch.manual_seed(self.tr.seed)
        # the same setup `ddpmctl bench` measures; .opt/.step change at the warm-start switch
        self.training = setup_training(self.spec, self.device, self.precision, self.emit, dist=self.dist)
        self.model, self.ema, self.scaler = self.training.model, self.training.ema, self.training.scaler
        self.gen = _noise_generator(self.device, self.tr.seed + 1)
        self.stats = DeviceStats(self.device, self.tr.rollback_after)

    def init_from(self, source: str) -> None:
        """`train --init SOURCE`: the network's weights and the EMA from SOURCE (a run dir gives both
        its raw and its EMA weights; a folder has one set, used for both). The optimizer starts fresh."""
        from ddpmctl.modelfolder import load_source

        ema_den = load_source(source, use_ema=True, device="cpu")
        if ema_den.spec.model != self.spec.model:
            raise UsageError(f"--init {source}: its network differs from this run's model section "
                             "(spec.json must take the source's model section)")
        raw = ema_den
        if ema_den.weights == "ema" and rundir.spec_path(Path(source)).exists():
            raw = load_source(source, use_ema=False, device="cpu")
        self.model.load_state_dict(raw.model.state_dict())
        self.ema.load_state_dict(ema_den.model.state_dict())
        self.emit({"event": "message", "message": f"starting from the weights of {source} ({ema_den.weights})"})

    # ---------------------------------------------------------------------------------------------
    # a fresh run dir, or resume: everything back from the newest valid checkpoint
    # ---------------------------------------------------------------------------------------------

    def create(self, held: contextlib.ExitStack) -> None:
        """A fresh run: the directory is made only now that the setup worked, and it must take two
        checkpoints (pre-flight) before spec.json is written; a refused start leaves nothing behind."""
        run_dir = self.run_dir
        if not self.main:
            return None
        made = _create_run_dir(run_dir)
        lock = held.enter_context(RunLock(run_dir, on_warning=self.warn))
        if rundir.spec_path(run_dir).exists():
            raise UsageError(f"{run_dir} already holds a run; continue it with `ddpmctl resume {run_dir}`")
        made += [] if (run_dir / ck.CKPT_DIR).exists() else [run_dir / ck.CKPT_DIR]
        try:
            _preflight(run_dir, _checkpoint_bytes(self.model, self.ema))
        except DdpmctlError:  # the same command can run again
            lock.release()
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
            raise
        rundir.save_spec(self.spec, run_dir)  # from here on `ddpmctl resume` can continue the run
        return None

    def resume_state(self) -> ck.Checkpoint | None:
        """The newest valid checkpoint's state (None: none yet, start again from step 0); metrics.jsonl
        cut back to it; then the pre-flight for the checkpoints to come."""
        run_dir, c = self.run_dir, self.c
        ckpt = None
        try:
            ckpt = ck.find_newest(run_dir, on_warning=self.warn)
        except CheckpointError:
            if ck.has_checkpoints(run_dir):
                raise
            self.warn(f"{run_dir} has no complete checkpoint yet; starting again from step 0")
        self.agree_on(ckpt, "resume from")
        if ckpt is not None:
            self.restore(ckpt, everything=True)
            self.dist.barrier()  # every rank has read it: rank 0 may now clean up
            removed = ck.discard_after(run_dir, ckpt) if self.main else []
            if removed:
                self.warn(f"removed {', '.join(removed)}: newer than {ckpt.path.name} (broken, or written after "
                          "it by the interrupted process); training writes them again")
            self.warn_changed(ckpt)
            self.emit({"event": "resume", "checkpoint": str(ckpt.path), "step": c.step})
        if self.main:
            c.metrics_bytes = rundir.truncate_metrics(run_dir,
                                                      ckpt.state if ckpt else {"step": 0, "metrics_bytes": 0})
            _preflight(run_dir, _checkpoint_bytes(self.model, self.ema))
        return ckpt

    def warn_changed(self, ckpt: ck.Checkpoint) -> None:
        """What makes the resumed run differ from an uninterrupted one: the data, the precision."""
        spe = self.steps_per_epoch
        if ckpt.state.get("steps_per_epoch", spe) != spe:
            self.warn(f"the data now gives {spe} steps per epoch, {ckpt.state['steps_per_epoch']} when "
                      "the checkpoint was written: the data order differs from an uninterrupted run")
        was, now = ckpt.state.get("precision"), self.precision.name
        if was is not None and was != now:
            self.warn(f"trained in {was} until step {self.c.step}, continuing in {now} (--precision "
                      f"{self.tr.precision} on {describe(self.device)}): not bitwise an uninterrupted run; "
                      f"`ddpmctl resume {self.run_dir} --precision {was}` keeps it")

    def restore(self, ckpt: ck.Checkpoint, *, everything: bool) -> None:
        """Load a checkpoint into the live objects. A rollback keeps the run-wide counters.

        Everything is checked before torch sees it: state.json's field types, and every tensor's name,
        dtype and shape against the live model, EMA, optimizer and RNG streams (a forged optimizer
        moment of the wrong shape would crash fused AdamW; a wrong dtype would be cast silently)."""
        model, ema, gen, device, c = self.model, self.ema, self.gen, self.device, self.c
        name = ckpt.state.get("optimizer_name", "adamw")  # the one that wrote it (older checkpoints: AdamW)
        if name not in ("adamw", "sgd"):
            raise CheckpointError(f"{ckpt.path / 'state.json'}: field 'optimizer_name': expected 'adamw' or 'sgd', "
                                  f"found {str(name)[:40]!r}")
        self.training.use_optimizer(name)
        opt = self.training.opt
        st = _checked_state(ckpt, opt, self.scaler)
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
        if self.scaler is not None and st.get("scaler") is not None:
            self.scaler.load_state_dict(st["scaler"])
        ema.num_updates = st["ema_updates"]
        c.step, c.images_seen, c.window_steps = st["step"], st["images_seen"], st.get("window_steps", 0)
        if everything:
            c.skipped, c.rollbacks = st.get("skipped_steps", 0), st.get("rollbacks", 0)
            c.lr_scale, c.last_loss = st.get("lr_scale", 1.0), st.get("last_loss")
            c.retreat = tuple(st["retreat"]) if st.get("retreat") else None
            self.stats.load_state_dict(st.get("window", {}))
        else:
            c.window_steps = 0
            self.stats.reset_window(), self.stats.reset_health()

    def agree_on(self, found: ck.Checkpoint | None, what: str) -> None:
        """Every rank read the checkpoint itself; they must have found the same one."""
        steps = self.dist.gather_floats([found.step if found is not None else -1])
        if len({s[0] for s in steps}) > 1:
            raise DistError(f"ranks found different checkpoints to {what} (steps {[int(s[0]) for s in steps]}): "
                            f"{self.run_dir} must be on a filesystem every rank sees, unchanged while the job starts")

    def announce(self) -> None:
        """The start event: where, how, how long."""
        c, total = self.c, self.total_steps
        est = self.estimate
        self.emit({"event": "start", "run_dir": str(self.run_dir), "device": describe(self.device),
                   "precision": self.precision.name, "parameters": count_parameters(self.model),
                   "images": self.n_images, "steps_per_epoch": self.steps_per_epoch, "total_steps": total,
                   "start_step": c.step, "compile": self.training.forward is not self.model,
                   "deterministic": self.deterministic, "world_size": self.dist.world_size,
                   "global_batch": self.global_batch, "estimate": None if est is None else
                   {**est, "steps": total - c.step, "seconds": est["step_seconds"] * (total - c.step)}})

    # ---------------------------------------------------------------------------------------------
    # the loop: data, forward/backward/update/EMA, log + divergence guard, sample, checkpoint, stop
    # ---------------------------------------------------------------------------------------------

    def loop(self, last_ckpt: Path | None) -> TrainResult:
        c, tr, spe = self.c, self.tr, self.steps_per_epoch
        start_step, self.last_ckpt = c.step, last_ckpt
        self.window_start = time.perf_counter()
        self.model.train()
        while c.step < self.total_steps:
            if c.step == start_step:  # a signal before the first step
                early = self.dist.max_int(self.stop.signum or 0)
                if early:
                    raise Interrupted(early, self.run_dir, c.step, None)
            lr = self.train_step(*self.batch())
            signum, out_of_time = self.stop_flags()
            epoch_end = c.step % spe == 0
            done = c.step >= self.total_steps

            if c.step % tr.log_every == 0 or epoch_end or done:
                trip = self.log(lr)
                if trip >= 0:  # the divergence guard
                    target = self.rollback(trip, lr)
                    if signum:
                        raise Interrupted(signum, self.run_dir, c.step, target.path)
                    continue  # out of time: stops after the next step, with a checkpoint of it

            side_start = time.perf_counter()  # sampling and checkpoints are kept out of images/s
            self.sample(epoch_end, done)
            self.checkpoint(signum != 0 or out_of_time, epoch_end, done)
            self.window_start += time.perf_counter() - side_start

            # stop on a signal or at the time limit, after the checkpoint
            if signum and not done:
                raise Interrupted(signum, self.run_dir, c.step, self.last_ckpt)
            if out_of_time and not done:
                return self.result("time_limit")
        if self.last_ckpt is None and c.step > 0:  # resumed a finished run: nothing to do
            self.last_ckpt = ck.find_newest(self.run_dir).path
        return self.result(None)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond | None]:
        """(x0, t, noise, cond): this rank's rows of the global batch; t and noise drawn for the whole global
        batch on every rank (same generator state everywhere), so they do not depend on the rank count."""
        epoch, index = divmod(self.c.step, self.steps_per_epoch)
        x0 = self.loader.batch(epoch, index)
        gb, device = self.global_batch, self.device
        t = torch.randint(0, self.spec.diffusion.timesteps, (gb,), device=device, generator=self.gen)[self.rows]
        noise = torch.randn((gb, *x0.shape[1:]), device=device, generator=self.gen)[self.rows]
        cond = None
        if self.spec.model.conditional:  # label dropout: the null class trains the unguided prediction
            labels = self.loader.batch_labels(epoch, index)
            drop = torch.rand(gb, device=device, generator=self.gen)[self.rows] < self.tr.label_dropout
            cond = Cond(labels=labels.masked_fill(drop, self.spec.model.num_classes))
        return x0, t, noise, cond

    def train_step(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Cond | None) -> float:
        """Forward / backward / update / EMA (no host sync; a non-finite step is skipped on the
        device); returns the learning rate it took."""
        c, op, training = self.c, self.op, self.training
        # warm start (optim.warm_start_steps): SGD with momentum until then, AdamW with a fresh state after
        if training.use_optimizer(optimizer_for(c.step, self.spec)):
            self.emit({"event": "optimizer", "step": c.step, "name": training.opt_name,
                       "message": f"step {c.step}: SGD warm start over, switching to AdamW with a fresh state"})
        lr = get_lr(c.step, op.lr, op.warmup_steps) * c.lr_scale
        with self.dist.guard():  # a rank that died shows up here first, as a failed all-reduce
            loss, gnorm, finite = training.step(x0, t, noise, lr, cond)
        c.step += 1
        c.images_seen += self.global_batch
        c.window_steps += 1
        self.stats.update(loss, gnorm, finite, c.step)
        self.emit({"event": "tick", "step": c.step, "epoch": c.step / self.steps_per_epoch})
        return lr

    def stop_flags(self) -> tuple[int, bool]:
        """(signal number or 0, out of time): read once (a signal from here on is handled next step),
        and agreed by every rank; the time limit is a host clock check, so it costs no device sync."""
        tr = self.tr
        out_of_time = tr.time_limit is not None and time.monotonic() - PROCESS_START >= tr.time_limit
        flags = self.dist.max_int((self.stop.signum or 0) | (_TIME_LIMIT_FLAG if out_of_time else 0))
        return flags & (_TIME_LIMIT_FLAG - 1), bool(flags & _TIME_LIMIT_FLAG)

    def log(self, lr: float) -> int:
        """One metrics record: the only host-device sync, every log_every steps. Returns the step at
        which a non-finite streak reached rollback_after, or -1."""
        c = self.c
        loss_sum, gnorm_sum, bad, _streak, trip = self.stats.read()
        good = max(c.window_steps - bad, 1)
        c.last_loss = loss_sum / good if bad < c.window_steps else float("nan")
        elapsed = time.perf_counter() - self.window_start
        self.images_per_s = c.window_steps * self.global_batch / max(elapsed, 1e-9)
        c.skipped += bad
        rec = {"step": c.step, "epoch": round(c.step / self.steps_per_epoch, 4), "loss": c.last_loss,
               "grad_norm": gnorm_sum / good, "lr": lr, "images_per_s": round(self.images_per_s, 2),
               "skipped": bad, "time": time.time()}
        self.append_metrics(rec)
        self.emit({"event": "log", **rec})
        self.stats.reset_window()
        c.window_steps, self.window_start = 0, time.perf_counter()
        return trip

    def sample(self, epoch_end: bool, done: bool) -> None:
        """A fixed-seed grid every sample_every epochs and at the end (+ an EMA milestone)."""
        c, tr, spe = self.c, self.tr, self.steps_per_epoch
        sample_epoch = epoch_end and (c.step // spe) % tr.sample_every == 0
        if (sample_epoch or done) and self.main:  # the other ranks go on and wait at the next all-reduce
            n = c.step // spe if epoch_end else math.ceil(c.step / spe)
            self.samples.append(str(_sample_grid(self.spec, self.run_dir, self.ema, self.device, self.precision, n,
                                                 c.step, self.emit)))
            if sample_epoch and tr.milestones:
                ck.save_milestone(self.run_dir, n, c.step, self.ema.state_dict(), {"ema_updates": self.ema.num_updates})

    def checkpoint(self, stopping: bool, epoch_end: bool, done: bool) -> None:
        """Scheduled checkpoints wait while steps are non-finite (they would hold suspect weights);
        stopping and the end always write one."""
        c, tr = self.c, self.tr
        scheduled = c.step % tr.checkpoint_every == 0 or epoch_end
        if stopping or done or (scheduled and int(self.stats.streak.item()) == 0):
            self.last_ckpt = self.save()
        elif scheduled:
            self.warn(f"step {c.step}: checkpoint postponed while training steps are non-finite")

    def result(self, stopped: str | None) -> TrainResult:
        c = self.c
        return TrainResult(str(self.run_dir), c.step, round(c.step / self.steps_per_epoch, 4), c.last_loss,
                           self.images_per_s, str(self.last_ckpt) if self.last_ckpt else None, c.skipped,
                           self.samples, c.rollbacks, c.lr_scale, stopped, self.total_steps)

    # ---------------------------------------------------------------------------------------------
    # rollback and checkpoint writing
    # ---------------------------------------------------------------------------------------------

    def rollback(self, trip: int, lr: float) -> ck.Checkpoint:
        """`rollback_after` non-finite steps in a row: back to the newest checkpoint whose weights came
        before the streak (the weights do not change during it), with a smaller learning rate. Until
        the run gets past the step that diverged, a new divergence goes back further than the last."""
        c, tr, run_dir = self.c, self.tr, self.run_dir
        k = tr.rollback_after
        if c.rollbacks >= tr.max_rollbacks:
            raise NonFiniteError(
                f"training diverged: {k} non-finite steps in a row at step {trip}, after {c.rollbacks} rollback(s) "
                f"(learning rate now {lr:.3g}); lower optim.lr or raise optim.warmup_steps, then resume")
        before = trip - k if c.retreat is None else min(trip - k, c.retreat[0])
        try:
            target = ck.find_newest(run_dir, on_warning=self.warn, before_step=before)
        except CheckpointError:
            raise NonFiniteError(
                f"training diverged: {k} non-finite steps in a row at step {trip}, and no checkpoint from before "
                f"step {before} to roll back to; lower optim.lr (now {lr:.3g}) or raise optim.warmup_steps"
            ) from None
        self.agree_on(target, "roll back to")
        at = c.step
        self.restore(target, everything=False)
        c.lr_scale *= self.op.lr_backoff
        c.rollbacks += 1
        c.retreat = (target.step, max(trip, c.retreat[1]) if c.retreat else trip)
        self.dist.barrier()  # every rank has read the target before rank 0 removes what came after it
        if self.main:
            ck.discard_after(run_dir, target)
        rec = {"event": "rollback", "step": at, "to_step": target.step, "streak_from": trip - k + 1,
               "lr_scale": c.lr_scale, "rollbacks": c.rollbacks, "time": time.time()}
        self.append_metrics(rec)
        self.emit(rec)
        return target

    def append_metrics(self, rec: dict) -> None:
        if self.main:
            self.c.metrics_bytes = rundir.append_metrics(self.run_dir, rec)

    def check_replicas(self) -> dict:
        """All ranks must hold the same weights (DDP's promise); checked at every checkpoint."""
        prints = self.dist.gather_floats(fingerprint(list(self.model.parameters())))
        if any(p != prints[0] for p in prints):
            raise DistError(f"step {self.c.step}: the ranks' weights differ (fingerprints {prints}); "
                            "the checkpoint is not written. Report this with the command line")
        return {"world_size": self.dist.world_size, "fingerprints": prints}

    def save(self) -> Path:
        """A checkpoint of everything the next step depends on (rank 0 writes it; on the other
        ranks: its path)."""
        c, tr, device, training = self.c, self.tr, self.device, self.training
        if c.retreat is not None and c.step > c.retreat[1]:
            c.retreat = None  # got past the step that diverged last time
        opt_tensors, opt_meta = ck.optimizer_to_tensors(training.opt)
        rng = {"cpu": torch.get_rng_state(), "noise": self.gen.get_state().cpu()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"epoch": c.step / self.steps_per_epoch, "images_seen": c.images_seen,
                 "ema_updates": self.ema.num_updates, "optimizer": opt_meta, "optimizer_name": training.opt_name,
                 "skipped_steps": c.skipped, "rollbacks": c.rollbacks, "lr_scale": c.lr_scale,
                 "last_loss": c.last_loss, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                 "window_steps": c.window_steps, "window": self.stats.state_dict(), "metrics_bytes": c.metrics_bytes,
                 "retreat": c.retreat, "seed": tr.seed, "precision": self.precision.name}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        replicas = self.check_replicas() if self.dist.distributed else None
        if not self.main:
            return self.run_dir / ck.CKPT_DIR / ck.checkpoint_name(c.step)
        if replicas is not None:
            state["ranks"] = replicas
        path = ck.save_checkpoint(self.run_dir, c.step, {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                                                         "optim": opt_tensors, "rng": rng}, state, tr.keep_last)
        self.emit({"event": "checkpoint", "path": str(path), "step": c.step})
        return path


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
    """The types of the state.json fields `resume` reads back (what :meth:`_Trainer.save` writes);
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
            f"not enough free space for checkpoints in {run_dir}: {human_bytes(free)} free, two checkpoints need "
            f"{human_bytes(2 * checkpoint_bytes)} ({human_bytes(checkpoint_bytes)} each); free some space or use --out "
            "on another disk")


def _sample_grid(spec: RunSpec, run_dir: Path, ema: EMA, device, precision, epoch: int, step: int,
                 emit: Event) -> Path:
    """Draw the fixed-seed grid with the EMA weights and save samples/epoch_NNNN.png.

    Runs under fork_rng: building the throw-away network must not move the training RNG streams."""
    from ddpmctl.generate import generate, per_class
    from ddpmctl.modelfolder import Denoiser

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        net = build(spec.model).to(device)
    ema.copy_to(net)
    net.eval()
    den = Denoiser(net, spec, str(run_dir), None, "ema")
    sp = spec.sample
    seeds, labels, nrow = [sp.seed + i for i in range(sp.grid_size)], None, GRID_NROW
    if spec.model.num_classes:  # one row per class (the first GRID_MAX_CLASS_ROWS), same noise per column
        seeds, labels = per_class(range(min(spec.model.num_classes, GRID_MAX_CLASS_ROWS)), GRID_NROW, sp.seed)
    try:
        imgs = torch.cat([b for _, b, _ in generate(den, seeds, sampler=sp.sampler, steps=sp.steps, eta=sp.eta,
                                                    batch_size=256, device=device, precision=precision,
                                                    labels=labels, guidance=sp.guidance)])
    except NonFiniteError as exc:
        raise NonFiniteError(f"the sample grid at training step {step} (epoch {epoch}): {exc}") from None
    out_dir = run_dir / rundir.SAMPLES_DIR
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"epoch_{epoch:04d}.png"
    save_png(path, make_grid(imgs, nrow=nrow, padding=GRID_PADDING))
    entry = {"epoch": epoch, "file": path.name, "n": len(seeds), "nrow": nrow, "padding": GRID_PADDING,
             "seed": sp.seed, "sampler": sp.sampler, "steps": sp.steps}
    if labels is not None:
        entry.update(rows="class", classes=list(spec.model.classes[:GRID_MAX_CLASS_ROWS]), guidance=sp.guidance)
    rundir.add_sample_grid(run_dir, entry,
                           on_warning=lambda message: emit({"event": "warning", "message": message}))
    emit({"event": "sample", "epoch": epoch, "path": str(path)})
    del net
    return path
