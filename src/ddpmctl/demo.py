"""`ddpmctl demo`: a local web page that draws images from a model and shows the reverse process.

The page (a gradio Blocks app, the optional ``demo`` extra) asks for a sampler, a number of steps,
a seed and a number of images; Generate streams the current x̂_0 every few steps and ends on the
final images. Generation goes through :func:`ddpmctl.generate.generate` exactly as ``ddpmctl sample``
does, so image i of a request with seed S is pixel for pixel ``ddpmctl sample --seed S`` image i
(on the same device and precision). Requests wait in a bounded queue and run one at a time; one
over ``max_work`` image-steps (images × steps) is refused with a message on the page.

gradio is imported only inside the functions that need it, so this module (its limits, the
refusal rules, :func:`stream`) imports without the extra; :func:`require_gradio` names the install
command when it is missing. Like the rest of the library it never prints and never imports typer
or rich.
"""

from __future__ import annotations

import math
import queue
import random
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ddpmctl.devices import Precision, describe
from ddpmctl.errors import DdpmctlError
from ddpmctl.generate import generate, run_defaults
from ddpmctl.extras import install_hint
from ddpmctl.modelfolder import Denoiser
from ddpmctl.images import png_bytes, to_uint8
from ddpmctl.sampler_registry import SAMPLERS, get_sampler

EXTRA_INSTALL = install_hint("demo")
EXTRA_HINT = f"ddpmctl demo needs the optional 'demo' extra (gradio): {EXTRA_INSTALL}"

ANY_CLASS = "(none: unconditional)"  # the class picker's entry for the null class
MAX_GUIDANCE = 10.0
DEFAULT_MAX_WORK = 4000  # images × steps per request: 16 images × 250 steps, or 4 images of full DDPM
DEFAULT_MAX_IMAGES = 16
DEFAULT_QUEUE_SIZE = 8  # requests waiting beyond the one running; more are told the queue is full
PREVIEWS = 10  # x̂_0 frames streamed per request (every ceil(steps / PREVIEWS) steps)
SEED_MAX = 2**31 - 1
GENERATE_ID = "generate"  # elem_id of the Generate button, for tests and scripts
GALLERY_ID = "gallery"
STATUS_ID = "status"

# 32×32 images shown large stay sharp instead of blurred.
CSS = f"#{GALLERY_ID} img {{ image-rendering: pixelated; }}"


def require_gradio() -> Any:
    """The gradio module, or a DdpmctlError (exit 1) naming the install command."""
    try:
        import gradio
    except ImportError as exc:
        raise DdpmctlError(f"{EXTRA_HINT} ({exc})") from None
    return gradio


@dataclass(frozen=True)
class Limits:
    max_work: int = DEFAULT_MAX_WORK
    max_images: int = DEFAULT_MAX_IMAGES
    queue_size: int = DEFAULT_QUEUE_SIZE


@dataclass(frozen=True)
class Request:
    """One validated Generate request: image i uses seed ``seed + i``."""

    sampler: str
    steps: int
    seed: int
    n: int
    label: int | None = None  # conditional models: the class index (None: unconditional)
    guidance: float = 0.0

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n))

    @property
    def work(self) -> int:
        return self.n * self.steps


class Refused(ValueError):
    """A request the page declines, with the reason to show."""


def make_request(sampler: str, steps: Any, seed: Any, n: Any, *, timesteps: int, limits: Limits,
                 cls: str | None = None, guidance: Any = 0.0, classes: Sequence[str] = ()) -> Request:
    """Validate the page's values; raise :class:`Refused` with a message for the user.

    ``cls``: a class name of ``classes`` (a conditional model's), or None / :data:`ANY_CLASS` for none.

    A sampler that runs all T steps (ddpm) does so whatever ``steps`` says, as ``ddpmctl sample`` does. A seed left
    empty is drawn at random (and shown, like every seed).
    """
    if sampler not in available_samplers(timesteps, limits):
        raise Refused(f"sampler {sampler!r} is not offered here; choose one of "
                      f"{', '.join(available_samplers(timesteps, limits))}")
    if seed is None or seed == "":
        seed = random_seed()
    try:
        steps_i, seed_i, n_i = int(steps), int(seed), int(n)
    except (TypeError, ValueError):
        raise Refused(f"steps, seed and number of images must be whole numbers (got {steps!r}, {seed!r}, {n!r})") \
            from None
    if get_sampler(sampler).all_steps:
        steps_i = timesteps
    if not 1 <= steps_i <= timesteps:
        raise Refused(f"steps must be between 1 and T = {timesteps}, got {steps_i}")
    if not 0 <= seed_i <= SEED_MAX:
        raise Refused(f"seed must be between 0 and {SEED_MAX}, got {seed_i}")
    if not 1 <= n_i <= limits.max_images:
        raise Refused(f"number of images must be between 1 and {limits.max_images}, got {n_i}")
    label = None
    if cls not in (None, "", ANY_CLASS):
        if cls not in classes:
            raise Refused(f"class {cls!r} is not one of this model's: {', '.join(classes[:20]) or 'none'}")
        label = list(classes).index(cls)
    try:
        w = float(guidance or 0.0)
    except (TypeError, ValueError):
        raise Refused(f"guidance must be a number >= 0, got {guidance!r}") from None
    if not 0.0 <= w <= MAX_GUIDANCE:
        raise Refused(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {w:g}")
    req = Request(sampler, steps_i, seed_i, n_i, label, w if label is not None else 0.0)
    if req.work > limits.max_work:
        raise Refused(f"{n_i} image(s) × {steps_i} steps = {req.work} image-steps is over this demo's limit of "
                      f"{limits.max_work}; use fewer images or steps (or `ddpmctl sample` for big jobs)")
    return req


def available_samplers(timesteps: int, limits: Limits) -> list[str]:
    """Every sampler; one that runs all T steps (ddpm) where one image of all T steps fits the work limit."""
    return [s for s in SAMPLERS if not get_sampler(s).all_steps or timesteps <= limits.max_work]


def random_seed() -> int:
    return random.SystemRandom().randint(0, SEED_MAX)


@dataclass
class Frame:
    """What the page shows at one moment: uint8 images (one per requested image that has started)."""

    step: int  # steps done in the current batch
    steps: int
    images: torch.Tensor  # uint8 (k, C, H, W), k <= n
    final: bool
    network_evaluations: int = 0


class _Stop(Exception):
    """Raised inside the sampler callback when the consumer went away."""


def stream(den: Denoiser, req: Request, *, device: torch.device, precision: Precision | None,
           every: int | None = None, batch_size: int = 64) -> Iterator[Frame]:
    """Run :func:`generate` in a worker thread; yield a preview Frame every ``every`` steps, then the final one.

    Previews are the current x̂_0 of the batch being drawn (earlier batches show their final
    images). Closing the iterator (the request was cancelled) stops the sampler at its next step.
    """
    every = every or max(1, math.ceil(req.steps / PREVIEWS))
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = torch.empty(0, dtype=torch.uint8)

    def factory(start: int):
        def cb(i: int, total: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
            if stop.is_set():
                raise _Stop
            if (i + 1) % every == 0 and i + 1 < total:
                events.put(("preview", start, i + 1, total, to_uint8(x0_pred)))
        return cb

    def work() -> None:
        try:
            eta = run_defaults(den.spec, req.sampler)[2]  # as `ddpmctl sample` without --eta
            labels = None if req.label is None else [req.label] * req.n
            for start, imgs, nfe in generate(den, req.seeds, sampler=req.sampler, steps=req.steps, eta=eta,
                                             batch_size=batch_size, device=device, precision=precision,
                                             callback_factory=factory, labels=labels, guidance=req.guidance):
                events.put(("batch", start, nfe, imgs))
            events.put(("end",))
        except _Stop:
            pass
        except BaseException as exc:  # handed to the consumer, which re-raises it
            events.put(("error", exc))

    worker = threading.Thread(target=work, name="ddpmctl-demo-sampler", daemon=True)
    worker.start()
    try:
        nfe = 0
        while True:
            ev = events.get()
            if ev[0] == "preview":
                _, start, step, total, x0 = ev
                yield Frame(step, total, torch.cat([done[:start], x0]) if start else x0, final=False)
            elif ev[0] == "batch":
                _, start, nfe, imgs = ev
                done = torch.cat([done, imgs]) if done.numel() else imgs
            elif ev[0] == "error":
                raise ev[1]
            else:
                yield Frame(req.steps, req.steps, done, final=True, network_evaluations=nfe)
                return
    finally:
        stop.set()
        worker.join()


def reproduce_command(source: str, req: Request, *, extra: Sequence[str] = (), classes: Sequence[str] = ()) -> str:
    """The `ddpmctl sample` command that writes these images (image i -> OUT/00000i.png)."""
    args = ["ddpmctl", "sample", source, "--sampler", req.sampler]
    if not get_sampler(req.sampler).all_steps:
        args += ["--steps", str(req.steps)]
    if req.label is not None:
        args += ["--class", classes[req.label], "--guidance", f"{req.guidance:g}"]
    args += ["--seed", str(req.seed), "--n", str(req.n), *extra, "--out", "samples/"]
    return shlex.join(args)


def _write_frame(folder: Path, images: torch.Tensor, seed: int) -> list[tuple[str, str]]:
    """uint8 (k, C, H, W) -> [(FOLDER/seed-S.png, "seed S")], written as `ddpmctl sample` writes PNGs."""
    folder.mkdir()
    items = []
    for i, img in enumerate(images):
        path = folder / f"seed-{seed + i}.png"
        path.write_bytes(png_bytes(img))
        items.append((str(path), f"seed {seed + i}"))
    return items


def build_app(den: Denoiser, *, device: torch.device, precision: Precision | None, source: str | None = None,
              sample_args: Sequence[str] = (), limits: Limits = Limits(), batch_size: int = 64):
    """The gradio Blocks app for ``den``; call :func:`launch` (or ``.launch()``) to serve it.

    ``source`` and ``sample_args`` (e.g. ``--no-ema``, ``--device cuda``) go into the `ddpmctl sample`
    command shown under the images. The one endpoint, ``/generate(sampler, steps, seed, n)`` (plus ``cls,
    guidance`` for a conditional model: a class picker and a guidance slider), streams
    ``(gallery, status markdown, seed)``.
    """
    gr = require_gradio()
    spec = den.spec
    T = spec.diffusion.timesteps
    size = spec.model.image_size
    samplers = available_samplers(T, limits)
    source = source or den.source
    where = describe(device) + (f", {precision.name}" if precision is not None else "")

    classes = list(spec.model.classes) if spec.model.num_classes else []

    def on_generate(sampler: str, steps: float, seed: float | None, n: float, cls: str | None = None,
                    guidance: float = 0.0):
        try:
            req = make_request(sampler, steps, seed, n, timesteps=T, limits=limits, cls=cls, guidance=guidance,
                               classes=classes)
        except Refused as exc:
            yield [], f"**Refused:** {exc}", seed
            return
        last = req.seed + req.n - 1
        seeds = f"seed {req.seed}" if req.n == 1 else f"seeds {req.seed}–{last} (image i: {req.seed} + i)"
        t0 = time.perf_counter()
        # Each frame's images go to files written here by ddpmctl's PNG writer; gradio copies them into its
        # cache (race-free, unlike handing it PIL images, which it rewrites in place when two frames match).
        with tempfile.TemporaryDirectory(prefix="ddpmctl-demo-") as tmp:
            try:
                for k, fr in enumerate(stream(den, req, device=device, precision=precision, batch_size=batch_size)):
                    gallery = _write_frame(Path(tmp) / f"{k:04d}", fr.images, req.seed)
                    if not fr.final:
                        yield gallery, f"Step {fr.step}/{fr.steps}: the current x̂₀ · {seeds}", req.seed
                        continue
                    yield gallery, (
                        f"**Done:** {req.n} image(s), {req.sampler}, {req.steps} steps "
                        f"({fr.network_evaluations} network evaluations each) in {time.perf_counter() - t0:.1f} s "
                        f"on {where} · **{seeds}**\n\n"
                        f"Same images from the command line:\n\n"
                        f"`{reproduce_command(source, req, extra=sample_args, classes=classes)}`"
                    ), req.seed
            except DdpmctlError as exc:
                yield [], f"**Error:** {exc}", req.seed

    def on_sampler(sampler: str):
        return gr.update(value=run_defaults(den.spec, sampler)[1], interactive=not get_sampler(sampler).all_steps)

    first, first_steps, _ = run_defaults(den.spec, None)  # the run's spec.sample, as `ddpmctl sample` draws
    if first not in samplers:
        first, first_steps, _ = run_defaults(den.spec, samplers[0])
    fixed = [s for s in samplers if get_sampler(s).all_steps]

    # A local demo does not phone home (no gradio telemetry or version check); a long-running one does not
    # fill the disk (gradio's cached images older than an hour are deleted every hour).
    with gr.Blocks(title="ddpmctl demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## ddpmctl demo\n{size}×{size} images from `{source}` "
                    f"({den.checkpoint or 'weights'}, {den.weights} weights) on {where}.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                sampler = gr.Dropdown(samplers, value=first, label="Sampler",
                                      info=f"{' and '.join(fixed)} always run(s) all {T} steps" if fixed else None)
                steps = gr.Slider(1, T, value=first_steps, step=1, label="Steps", interactive=not get_sampler(first).all_steps,
                                  info=f"images × steps ≤ {limits.max_work} per request")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed",
                                     info="image i uses seed + i", scale=3)
                    dice = gr.Button("Random", scale=1, min_width=80)
                n = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1, label="Images")
                picks = []
                if classes:  # a conditional model: which class, how strongly guided
                    picks = [gr.Dropdown([ANY_CLASS, *classes], value=classes[0], label="Class"),
                             gr.Slider(0, MAX_GUIDANCE, value=spec.sample.guidance, step=0.25,
                                       label="Guidance", info="0: none; higher: more typical, less varied")]
                go = gr.Button("Generate", variant="primary", elem_id=GENERATE_ID)
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", format="png", columns=4, height="auto", object_fit="contain",
                                     elem_id=GALLERY_ID, interactive=False)
                status = gr.Markdown("Press Generate.", elem_id=STATUS_ID)
        sampler.change(on_sampler, sampler, steps, api_visibility="private", queue=False)
        dice.click(random_seed, None, seed, api_visibility="private", queue=False)
        go.click(on_generate, [sampler, steps, seed, n, *picks], [gallery, status, seed], api_name="generate",
                 show_progress="minimal")
    app.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> str:
    """Start serving ``app`` in the background and return its local URL.

    Block with ``app.block_thread()`` (until Ctrl-C) or stop with ``app.close()``.
    """
    gr = require_gradio()
    try:
        app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                   inbrowser=False, show_error=True, quiet=True, ssr_mode=False, css=CSS,
                   theme=gr.themes.Default())
    except OSError as exc:  # the port is taken
        raise DdpmctlError(f"cannot serve on {host}:{port} ({exc}); choose another --port") from None
    return app.local_url
