"""`ddpmctl sample`: draw images from a trained model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ddpmctl.cli.common import DeviceOpt, JsonOpt, app, err_console, info, print_json, warn

Sampler = Literal["ddpm", "ddim", "dpm-solver++"]


@app.command(epilog="Examples:\n\n  ddpmctl sample --n 100 --out faces/\n\n"
                    "  ddpmctl sample runs/shapes-20261126-101500 --n 16 --sampler ddpm --out ddpm/\n\n"
                    "  ddpmctl sample --n 64 --sampler ddim --steps 25 --seed 7 --out quick/ --json")
def sample(
    source: Annotated[Optional[str], typer.Argument(help="Run directory, model folder (ddpmctl export) or hf:OWNER/NAME\\[@REV] (default: the newest run under ./runs).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Number of images.")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (created; must be new or empty).")] = Path("samples"),
    sampler: Annotated[Sampler, typer.Option(help="ddpm (ancestral, all T steps) | ddim | dpm-solver++.")] = "ddim",
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps (default: ddpm T, ddim 50, "
                                                             "dpm-solver++ 20).")] = None,
    eta: Annotated[float, typer.Option(min=0.0, max=1.0, help="DDIM eta (0 deterministic, 1 ~ DDPM).")] = 0.0,
    variance: Annotated[Literal["beta_tilde", "beta"], typer.Option(help="DDPM sigma^2: beta_tilde or beta.")]
    = "beta_tilde",
    seed: Annotated[int, typer.Option(min=0, help="Image i uses seed SEED + i.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (does not change the images).")] = 64,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA).")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample N images into OUT/000000.png ... plus OUT/samples.json."""
    from rich.progress import Progress

    from ddpmctl import __version__
    from ddpmctl.devices import choose_device, choose_precision, describe
    from ddpmctl.generate import default_steps, generate, load_source
    from ddpmctl.images import save_png
    from ddpmctl.outdir import check_out_dir, staged_dir

    check_out_dir(out, overwrite)
    dev = choose_device(device or "auto")
    prec = choose_precision(precision, dev)
    den = load_source(source, use_ema=not no_ema, device=dev, on_warning=info)
    steps = steps or default_steps(sampler, den.spec.diffusion.timesteps)
    if sampler == "ddpm" and steps != den.spec.diffusion.timesteps:
        warn(f"ddpm runs all {den.spec.diffusion.timesteps} steps; ignoring --steps {steps}")
        steps = den.spec.diffusion.timesteps
    seeds = list(range(seed, seed + n))
    info(f"sampling {n} image(s) from {den.source} ({den.checkpoint}, {den.weights} weights) with {sampler}, "
         f"{steps} steps on {describe(dev)}")
    t0 = time.perf_counter()
    nfe = 0
    with staged_dir(out, overwrite) as tmp, Progress(console=err_console, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("sampling", total=n)
        for start, imgs, nfe in generate(den, seeds, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                                         device=dev, precision=prec, variance=variance):
            for i, img in enumerate(imgs):
                save_png(tmp / f"{start + i:06d}.png", img)
            bar.update(task, advance=len(imgs))
        meta = {"source": den.source, "checkpoint": den.checkpoint, "weights": den.weights, "sampler": sampler,
                "steps": steps, "network_evaluations": nfe, "eta": eta if sampler == "ddim" else None,
                "variance": variance if sampler == "ddpm" else None, "seeds": seeds, "n": n,
                "device": str(dev), "precision": prec.name, "ddpmctl": __version__,
                "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "samples.json").write_text(json.dumps(meta, indent=1))
    info(f"wrote {n} image(s) to {out}/ in {meta['seconds']:.1f}s")
    if as_json:
        print_json({**{k: v for k, v in meta.items() if k != "seeds"}, "out": str(out), "seed": seed})
    else:
        print(out)
