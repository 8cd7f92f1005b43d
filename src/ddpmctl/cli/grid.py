"""`ddpmctl grid`: image grids, the training-evolution table and the denoising trajectory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import DeviceOpt, SamplerOpt, app, command_device, info, parse_classes, warn


@app.command(epilog="Examples:\n\n  ddpmctl grid faces/ --out faces.png\n\n"
                    "  ddpmctl grid runs/shapes-20261126-101500 --evolution --out evolution.png\n\n"
                    "  ddpmctl grid runs/shapes-20261126-101500 --trajectory --out denoise.png --gif denoise.gif\n\n"
                    "  ddpmctl grid runs/shapes-cond --per-class --n 8 --guidance 2 --out classes.png")
def grid(
    source: Annotated[Path, typer.Argument(help="A folder of images, or a run directory with --evolution/--trajectory.")],
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("grid.png"),
    nrow: Annotated[Optional[int], typer.Option(min=1, help="Images per row (default: square).")] = None,
    evolution: Annotated[bool, typer.Option("--evolution", help="One column per saved epoch, same seeds, "
                                                                "labelled with its epoch number.")] = False,
    trajectory: Annotated[bool, typer.Option("--trajectory", help="Rows are samples, columns moments of the "
                                                                  "reverse process.")] = False,
    gif: Annotated[Optional[Path], typer.Option(help="With --trajectory: also write an animated GIF.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=256, help="Rows (samples) for --evolution/--trajectory; "
                                                               "images per class for --per-class.")] = 8,
    frames: Annotated[int, typer.Option(min=2, max=100, help="Columns for --trajectory.")] = 10,
    sampler: SamplerOpt = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="--trajectory steps.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="--trajectory, --per-class: image i uses seed SEED + i.")] = 0,
    per_class: Annotated[bool, typer.Option("--per-class", help="Conditional models: one row per class, --n images "
                                            "each, the same seeds in every row.")] = False,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="--per-class: classifier-free guidance weight "
                                                      "(default: the run's sample.guidance).")] = None,
    device: DeviceOpt = None,
) -> None:
    """Write a grid PNG: of a folder's images, of a run's saved epochs, or of the denoising process."""
    from ddpmctl.errors import UsageError
    from ddpmctl.images import list_images, make_grid, read_image, save_png, stack_same_size
    from ddpmctl.outdir import RUN_MARKER

    if evolution + trajectory + per_class > 1:
        raise UsageError("choose one of --evolution, --trajectory and --per-class")
    if guidance is not None and not per_class:
        raise UsageError("--guidance needs --per-class")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a .png file path")
    for flag, path, suffix in (("--out", out, ".png"), ("--gif", gif, ".gif")):  # never replaces e.g. a spec.json
        if path is not None and path.suffix.lower() != suffix:
            raise UsageError(f"{flag} {path}: expected a {suffix} file name")
    if gif is not None and not trajectory:
        raise UsageError("--gif needs --trajectory")
    if not source.exists():
        raise UsageError(f"{source} does not exist")
    if evolution:
        img = _evolution(source, n)
    elif trajectory:
        img = _trajectory(source, n, frames, sampler, steps, seed, device, gif)
    elif per_class:
        img = _per_class(source, n, sampler, steps, seed, guidance, device)
    else:
        if not source.is_dir():
            raise UsageError(f"{source} is not a folder of images")
        files = list_images(source)
        if not files and (source / RUN_MARKER).is_file():
            raise UsageError(f"{source} is a run directory: add --evolution (one column per saved epoch) or "
                             "--trajectory (the denoising process); a plain grid needs a folder of images")
        if not files:
            raise UsageError(f"{source} holds no .png/.jpg/.jpeg/.webp images")
        img = make_grid(stack_same_size([read_image(f) for f in files]), nrow=nrow)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, img)
    info(f"wrote {out}")
    print(out)


def _evolution(run_dir: Path, n: int):
    import torch

    from ddpmctl import checkpoint as ck
    from ddpmctl import rundir
    from ddpmctl.errors import UsageError
    from ddpmctl.images import label_columns, make_grid, read_image, split_grid

    run_dir = ck.check_run_dir(run_dir)
    size = rundir.load_spec(run_dir).model.image_size
    grids = rundir.read_sample_index(run_dir)
    if not grids:
        raise UsageError(f"{run_dir} has no saved sample grids yet (samples/index.json); train for an epoch first")
    grids = sorted(grids, key=lambda g: g["epoch"])
    rows = min(n, min(g["n"] for g in grids))
    cols = [split_grid(read_image(run_dir / rundir.SAMPLES_DIR / g["file"]), rows, g["nrow"], size, g["padding"])
            for g in grids]
    # rows = seeds, columns = epochs
    table = torch.stack(cols, dim=1).flatten(0, 1)
    info("columns: epochs " + ", ".join(str(g["epoch"]) for g in grids))
    return label_columns(make_grid(table, nrow=len(grids)), [str(g["epoch"]) for g in grids], size)


def _per_class(source: Path, n: int, sampler: str, steps, seed: int, guidance, device):
    import torch

    from ddpmctl.generate import per_class
    from ddpmctl.images import make_grid

    den, sampler, steps, eta, dev = _sampling(source, sampler, steps, device)
    classes = parse_classes(den.spec, "all")
    guidance = den.spec.sample.guidance if guidance is None else guidance
    seeds, labels = per_class(classes, n, seed)
    info(f"rows: {', '.join(den.spec.model.classes)} (guidance {guidance:g}, {sampler} {steps} steps)")
    imgs = torch.cat([b for _, b, _ in _generate(den, seeds, sampler, steps, eta, dev, labels=labels,
                                                 guidance=guidance)])
    return make_grid(imgs, nrow=n)


def _sampling(source: Path, sampler: str, steps, device):
    """(model, sampler, steps, eta, device) as `ddpmctl sample` draws from ``source``."""
    from ddpmctl.generate import run_defaults
    from ddpmctl.modelfolder import load_source
    from ddpmctl.sampler_registry import get_sampler

    dev = command_device(device)
    den = load_source(source, device=dev, on_warning=info)
    sampler, run_steps, eta = run_defaults(den.spec, sampler)
    steps = get_sampler(sampler).lenient_steps(den.spec.diffusion.timesteps, steps or run_steps, warn)
    return den, sampler, steps, eta, dev


def _generate(den, seeds, sampler, steps, eta, dev, **kw):
    from ddpmctl.generate import generate

    return generate(den, seeds, sampler=sampler, steps=steps, eta=eta, batch_size=len(seeds), device=dev, **kw)


def _trajectory(run_dir: Path, n: int, frames: int, sampler: str, steps, seed: int, device, gif: Path | None):
    import torch

    from ddpmctl.images import make_grid, save_gif, to_uint8

    den, sampler, steps, eta, dev = _sampling(run_dir, sampler, steps, device)  # as `ddpmctl sample` draws
    captured: list[torch.Tensor] = []  # every step's x_t
    final_step = [0]

    def factory(start):
        def cb(i, total, x_t, x0_pred):
            captured.append(to_uint8(x_t))
            final_step[0] = total
        return cb

    _, imgs, _ = next(_generate(den, list(range(seed, seed + n)), sampler, steps, eta, dev, callback_factory=factory))
    seq = captured + [imgs]
    pick = sorted({round(i * (len(seq) - 1) / (frames - 1)) for i in range(frames)})
    table = torch.stack([seq[i] for i in pick], dim=1).flatten(0, 1)
    if gif is not None:
        stride = max(1, len(seq) // 60)
        save_gif(gif, [make_grid(seq[i]) for i in list(range(0, len(seq), stride)) + [len(seq) - 1]])
        info(f"wrote {gif}")
    return make_grid(table, nrow=len(pick))
