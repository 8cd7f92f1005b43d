"""The hot paths, shared by training, sampling and `ddpmctl bench`, so bench measures what runs.

* :func:`make_train_step`: one optimisation step with no host-device sync.
* :func:`setup_training`: model, optimizer, EMA, compiled forward and step, as training builds them.
* :func:`maybe_compile`: torch.compile with an eager fallback that says why.
* :func:`make_sample_fn`: the network as samplers call it: bf16 weights, channels_last, compiled
  and captured in a CUDA graph on CUDA; on the CPU the model as is, or a bf16 copy of it when the
  precision is bf16.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ddpmctl.cond import Cond, cond_key
from ddpmctl.diffusion import Schedule, training_loss
from ddpmctl.ema import EMA
from ddpmctl.spec import RunSpec

Event = Callable[[dict], None]


def _ignore(_event: dict) -> None:
    pass


def uses_channels_last(device: torch.device) -> bool:
    """channels_last (NHWC) memory on CUDA: cuDNN's bf16 tensor-core convolutions and the compiled
    GroupNorm kernels work in NHWC, and the attention's token view is then free. On the CPU,
    oneDNN is as fast either way for these sizes, so the CPU keeps the default layout."""
    return torch.device(device).type == "cuda"


def loss_gamma(spec: RunSpec) -> float | None:
    """The min-SNR gamma that :func:`ddpmctl.diffusion.training_loss` gets from the spec (None: L_simple)."""
    d = spec.diffusion
    return d.min_snr_gamma if d.loss_weighting == "min-snr" else None


def make_train_step(forward, model, opt, ema: EMA, schedule: Schedule, spec: RunSpec, precision, device,
                    scaler=None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable:
    """One optimisation step: (x0, t, noise, lr, cond=None) -> (loss, grad_norm, finite), all device tensors.

    Forward under autocast, backward, clip, AdamW (fused: a non-finite loss or gradient norm sets
    the optimizer's found_inf so the update is skipped on the device), then EMA. No host sync.
    Shared by the training loop and `ddpmctl bench`.

    Distributed (``forward`` is a DistributedDataParallel model): the gradients arrive averaged over
    ranks, so the gradient norm and the update are the same on every rank; ``reduce`` averages the
    loss over ranks (NaN on any rank gives NaN on all), so every rank skips the same steps.
    """
    op, prediction = spec.optim, spec.diffusion.prediction
    gamma = loss_gamma(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    channels_last = uses_channels_last(device)

    def step(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, lr: float, cond: Cond | None = None):
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr
        with precision.autocast(device):
            loss = training_loss(forward, schedule, x0, t, noise, prediction, cond, gamma).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, op.grad_clip)
        loss = loss.detach() if reduce is None else reduce(loss)
        finite = torch.isfinite(loss) & torch.isfinite(gnorm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.found_inf = (~finite).float()
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, weight_scale=finite.float())
        return loss, gnorm.detach(), finite

    return step


def compile_wanted(mode: str | bool | None, device: torch.device) -> bool:
    """auto (or None): on for CUDA; on/True and off/False as said."""
    if isinstance(mode, bool):
        return mode
    if mode in (None, "auto"):
        return torch.device(device).type == "cuda"
    return mode == "on"


class _CompiledOrEager:
    """Calls the torch.compile'd function; if compiling fails (it happens lazily, at the first call),
    reports why once and runs the eager function from then on."""

    def __init__(self, eager: Callable, emit: Event, what: str, **compile_kwargs):
        self.eager = eager
        self.emit = emit
        self.what = what
        self.compiled: Callable | None = torch.compile(eager, **compile_kwargs)
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self.compiled = None
                self.failed = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                self.emit({"event": "warning", "message": f"torch.compile failed ({self.failed[:300]}); "
                                                         f"{self.what} without compilation"})
        return self.eager(*args, **kwargs)


def maybe_compile(model, mode: str, device: torch.device, emit: Event):
    """``model`` itself (eager) or a compiled callable that falls back to ``model`` if compiling fails.

    GroupNorm + scale/shift + SiLU (and the rest of each block's elementwise work) become one fused
    kernel per block under inductor, which is most of the win on CUDA.
    """
    if not compile_wanted(mode, device):
        return model
    try:
        return _CompiledOrEager(model, emit, "training")
    except Exception as exc:  # noqa: BLE001 - torch.compile itself unavailable
        emit({"event": "warning", "message": f"torch.compile unavailable ({exc.__class__.__name__}: {exc}); "
                                             "training without compilation"})
        return model


def optimizer_for(step: int, spec: RunSpec) -> str:
    """The optimizer that takes optimizer step ``step`` (zero-based): ``optim.name``, except that
    with ``optim.warm_start_steps`` = N the first N steps are SGD with momentum, then AdamW."""
    op = spec.optim
    return "sgd" if op.name == "sgd" or step < op.warm_start_steps else "adamw"


def make_optimizer(name: str, model: nn.Module, spec: RunSpec, device: torch.device) -> torch.optim.Optimizer:
    """Fused AdamW or fused SGD with momentum (fused: a step whose ``found_inf`` is set is skipped on
    the device), with the spec's learning rate, weight decay, betas / momentum."""
    op = spec.optim
    fused = device.type in ("cuda", "cpu")
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=op.lr, momentum=op.momentum, weight_decay=op.weight_decay,
                               fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=op.lr, betas=(op.beta1, op.beta2),
                             weight_decay=op.weight_decay, fused=fused)


@dataclass
class Training:
    """What one training step needs, built the way the training loop builds it."""

    model: nn.Module
    forward: Callable
    opt: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler | None
    schedule: Schedule
    step: Callable
    spec: RunSpec
    device: torch.device
    precision: object
    reduce: Callable | None
    opt_name: str = "adamw"

    def use_optimizer(self, name: str) -> bool:
        """Switch to a fresh optimizer ``name`` (new state, a new step around it); False if already."""
        if name == self.opt_name:
            return False
        self.opt = make_optimizer(name, self.model, self.spec, self.device)
        self.opt_name = name
        self.step = make_train_step(self.forward, self.model, self.opt, self.ema, self.schedule, self.spec,
                                    self.precision, self.device, self.scaler, self.reduce)
        return True


def setup_training(spec: RunSpec, device: torch.device, precision, emit: Event = _ignore,
                   compile_mode: str | bool | None = None, dist=None) -> Training:
    """Model (channels_last on CUDA), the optimizer of step 0 (:func:`optimizer_for`: fused AdamW, or
    fused SGD with momentum), EMA, optional compile and the train step.

    ``compile_mode`` defaults to ``spec.train.compile``. Seeds are the caller's business.
    ``dist`` (a :class:`ddpmctl.dist.Dist` with more than one rank): the forward runs through
    DistributedDataParallel (compiled around it, so DDP's buckets stay overlapped with backward).
    """
    op = spec.optim
    model = build_model(spec, device)
    schedule = Schedule.create(spec.diffusion.schedule, spec.diffusion.timesteps, spec.diffusion.beta_range).to(device)
    opt_name = optimizer_for(0, spec)
    opt = make_optimizer(opt_name, model, spec, device)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    ema = EMA(model, op.ema_decay, op.ema_warmup)
    net, reduce = model, None
    if dist is not None and dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True)  # the U-Net has no buffers to keep in sync
        reduce = dist.mean
    forward = maybe_compile(net, spec.train.compile if compile_mode is None else compile_mode, device, emit)
    step = make_train_step(forward, model, opt, ema, schedule, spec, precision, device, scaler, reduce)
    return Training(model, forward, opt, ema, scaler, schedule, step, spec, device, precision, reduce, opt_name)


def build_model(spec: RunSpec, device: torch.device) -> nn.Module:
    from ddpmctl.unet import build

    model = build(spec.model).to(device)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


class _Graphed:
    """Replays a CUDA graph of ``fn`` per input shape: one launch per network evaluation.

    Inputs are copied into static buffers, the output is cloned out, so callers see an ordinary
    function. Graphs share one memory pool. If capture fails, says why once and calls ``fn``.
    """

    def __init__(self, fn: Callable, emit: Event):
        self.fn = fn
        self.emit = emit
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.failed: str | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        if self.failed is not None:
            return self.fn(x, t, cond)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, x.device, cond_key(cond))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x, t, cond)
            except Exception as exc:  # noqa: BLE001 - fall back to plain calls
                self.failed = f"{exc.__class__.__name__}: {exc}"
                self.graphs.clear()
                self.emit({"event": "warning", "message": f"CUDA graph capture failed ({self.failed[:300]}); "
                                                         "sampling without graphs"})
                return self.fn(x, t, cond)
            self.graphs[key] = entry
        graph, static, out = entry
        for buf, value in zip(static, (x, t, *(cond.tensors() if cond is not None else ()))):
            buf.copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None):
        static = tuple(v.clone() for v in (x, t, *(cond.tensors() if cond is not None else ())))
        sx, st = static[:2]
        scond = cond.with_tensors(static[2:]) if cond is not None else None
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation, cuDNN autotuning, lazy initialisation
                self.fn(sx, st, scond)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(sx, st, scond)
        return graph, static, out


def make_sample_fn(model: nn.Module, precision, device: torch.device, *, compile: str | bool | None = False,
                   cuda_graph: bool | None = None, emit: Event = _ignore) -> Callable:
    """(x_t, t, cond=None) -> float32 prediction, the fast way for ``device``; ``model`` is left untouched.

    With bf16 ``precision`` on CUDA and the CPU, a bf16 copy of the weights (no per-call weight
    casts: 1.86x fp32 for cifar10 on the CPU where autocast gives 1.78x, docs/performance.md); fp16
    keeps autocast. CUDA adds channels_last, optional torch.compile (``compile``: auto/on/off or
    bool; auto = on for CUDA) and a CUDA graph per batch shape (``cuda_graph``, default on for CUDA).
    fp32 elsewhere: the model as is.
    """
    device = torch.device(device)
    dtype = getattr(precision, "autocast_dtype", None)
    net = model
    if device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16):
        net = copy.deepcopy(model).eval()
        if dtype == torch.bfloat16:
            net = net.to(dtype=torch.bfloat16)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    weight_dtype = next(net.parameters()).dtype
    autocast = dtype is not None and weight_dtype != dtype

    def eager(x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        if weight_dtype != x.dtype:
            x = x.to(dtype=weight_dtype)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if autocast:
            with precision.autocast(device):
                return net(x, t, cond).float()
        return net(x, t, cond).float()

    fn: Callable = eager
    if compile_wanted(compile, device):
        # On the CPU with freezing (weights folded in as constants, convolutions prepacked for
        # oneDNN; the weights never change while sampling). Measured on an idle 2-core machine it is
        # no faster than eager (docs/performance.md), so nothing turns it on by default there.
        options = {"freezing": True} if device.type == "cpu" else None
        try:
            fn = _CompiledOrEager(eager, emit, "sampling", dynamic=False, options=options)
        except Exception as exc:  # noqa: BLE001
            emit({"event": "warning", "message": f"torch.compile unavailable ({exc}); sampling without compilation"})
    if device.type == "cuda" and (cuda_graph is None or cuda_graph):
        fn = _Graphed(fn, emit)
    return fn


def auto_sample_batch_size(model: nn.Module, shape: tuple[int, ...], device: torch.device, n: int,
                           precision=None, cap: int = 1024) -> int:
    """Images per sampling batch when none is given: on CUDA, as many as half the free memory holds
    (activation memory per image measured with one small batch), capped at ``cap`` and ``n``; 64
    elsewhere (CPU batches gain little past that)."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(64, n))
    probe = 8
    fn = make_sample_fn(model, precision, device, compile=False, cuda_graph=False)
    x = torch.randn((probe, *shape), device=device)
    t = torch.zeros(probe, dtype=torch.long, device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        fn(x, t, None)
    torch.cuda.synchronize(device)
    per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe)
    free, _total = torch.cuda.mem_get_info(device)
    fit = int(0.5 * free // per_image)
    batch = max(1, min(cap, n, fit))
    if batch >= 16:
        batch -= batch % 16  # friendlier shapes for the kernels
    return batch
