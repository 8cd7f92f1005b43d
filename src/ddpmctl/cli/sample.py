"""`ddpmctl sample`: draw images from a trained model."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import typer

from ddpmctl.cli.common import (PRECISION_HELP, DeviceOpt, JsonOpt, QuietOpt, SamplerOpt, app, command_device, info,
                                parse_classes, print_json, warn)
from ddpmctl.cli.train import NprocOpt

@app.command(epilog="Examples:\n\n  ddpmctl sample --n 100 --out faces/\n\n"
                    "  ddpmctl sample runs/shapes-20261126-101500 --n 16 --sampler ddpm --out ddpm/\n\n"
                    "  ddpmctl sample --n 64 --sampler ddim --steps 25 --seed 7 --out quick/ --json\n\n"
                    "  ddpmctl sample runs/shapes-cond --class circle --guidance 2 --n 16 --out circles/")
def sample(
    source: Annotated[Optional[str], typer.Argument(help="Run directory, model folder (ddpmctl export), diffusers folder (DDPMPipeline) or hf:OWNER/NAME[@REV] (default: the newest run under ./runs).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=1_000_000, help="Number of images.")] = 16,
    out: Annotated[Path, typer.Option(help="Output directory (created; must be new or empty).")] = Path("samples"),
    sampler: SamplerOpt = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps (default: the run's sample.steps "
                                                             "for its sampler, else the sampler's usual number).")] = None,
    eta: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="ddim / dpm-solver++ eta: 0 deterministic "
                                                 "(ODE), 1 stochastic like DDPM (default: the run's sample.eta for "
                                                 "its sampler, else 0).")] = None,
    variance: Annotated[Literal["beta_tilde", "beta"], typer.Option(help="DDPM sigma^2: beta_tilde or beta.")]
    = "beta_tilde",
    seed: Annotated[int, typer.Option(min=0, help="Image i uses seed SEED + i (of each class, with --class).")] = 0,
    class_: Annotated[Optional[str], typer.Option("--class", help="Conditional models: the class to draw, by name "
                                                  "or index; several comma-separated, or all: N images of each "
                                                  "(samples.json lists each image's class).")] = None,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="Classifier-free guidance weight W with "
                                                      "--class: (1+W) pred(class) - W pred(unconditional); 0 none, "
                                                      "higher: more typical of the class, less varied (default: "
                                                      "the run's sample.guidance).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch (does not change the images).")] = 64,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (an earlier output; never "
                                            "a run dir, model folder, the source, the current directory or a parent "
                                            "of one).")] = False,
    nproc: NprocOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample N images into OUT/000000.png ... plus OUT/samples.json.

    --nproc N shares the batches between N processes (one per GPU); the images are the same."""
    from ddpmctl import __version__
    from ddpmctl.cli.progress import ProgressView
    from ddpmctl.cli.train import join_job, launch_workers
    from ddpmctl.devices import choose_precision, describe
    from ddpmctl.dist import rank_device
    from ddpmctl.errors import UsageError
    from ddpmctl.generate import compile_pays_off, generate, per_class, run_defaults
    from ddpmctl.hub import HF_PREFIX
    from ddpmctl.modelfolder import load_source
    from ddpmctl.images import save_png
    from ddpmctl.outdir import check_out_dir, staged_dir
    from ddpmctl.sampler_registry import get_sampler
    from ddpmctl.writes import writing

    reading = [source] if source and not source.startswith(HF_PREFIX) else []  # never replaced by --overwrite
    check_out_dir(out, overwrite, reading=reading)
    if nproc is not None and nproc > 1:
        add = []
        if source is None:  # every worker must sample the same run, even if a newer one appears
            from ddpmctl.checkpoint import newest_run

            add = [str(newest_run().resolve())]
        load_source(add[0] if add else source, use_ema=not no_ema, device="cpu")  # a bad SOURCE: one message
        launch_workers(nproc, command_device(device), add)  # exits with the workers' code
    asked = command_device(device)  # (with --nproc: in each worker)
    job = join_job(asked)
    say = info if job.is_main else (lambda _m: None)
    dev = rank_device(asked, job)
    prec = choose_precision(precision, dev)
    den = load_source(source, use_ema=not no_ema, device=dev, on_warning=say)
    sampler, run_steps, run_eta = run_defaults(den.spec, sampler)  # the run's spec.sample, else the usual
    how = get_sampler(sampler)
    steps = how.lenient_steps(den.spec.diffusion.timesteps, steps or run_steps, warn)
    eta = run_eta if eta is None else eta
    seeds, labels = list(range(seed, seed + n)), None
    if class_ is not None:
        seeds, labels = per_class(parse_classes(den.spec, class_), n, seed)
        guidance = den.spec.sample.guidance if guidance is None else guidance
    elif guidance is not None:
        raise UsageError("--guidance needs --class (guidance pulls images towards a class)")
    total = len(seeds)
    where = f" on {job.world_size} processes" if job.distributed else ""
    say(f"sampling {total} image(s){_of_classes(den.spec, labels, guidance)} from {den.source} ({den.checkpoint}, {den.weights} weights) with {sampler}, "
        f"{steps} steps on {describe(dev)}{where}")
    # rank r draws batches r, r + W, r + 2W, ... of the batches one process would draw, so every
    # batch, and so every image, is computed exactly as one process computes it
    starts = list(range(0, total, batch_size))[job.rank::job.world_size]
    mine = [s for b in starts for s in seeds[b:b + batch_size]]
    my_labels = None if labels is None else [c for b in starts for c in labels[b:b + batch_size]]
    compile = compile_pays_off(den.spec, total, sampler, steps, dev)  # decided on the whole job's n
    t0 = time.perf_counter()
    nfe = 0
    if not job.distributed:
        stage = staged_dir(out, overwrite, reading=reading)
    else:  # rank 0 stages the folder and publishes it after every rank has written its images
        stage = _shared_stage(job, out, overwrite, reading)
    kept = f"{out} is as it was before this command (the partial images were removed)"
    with writing(out, kept=kept), stage as tmp, ProgressView(quiet, silent=not job.is_main) as view:
        view.meter("sampling", "sampling", len(mine))
        done = 0

        def count_steps(start: int):  # within a batch, whole images are counted as fractions of the loop
            size = min(batch_size, len(mine) - start)
            return lambda i, n, _x, _x0: view.update("sampling", done + size * (i + 1) / n)

        with job.guard():
            for start, imgs, nfe in generate(den, mine, sampler=sampler, steps=steps, eta=eta,
                                             batch_size=batch_size, device=dev, precision=prec, variance=variance,
                                             compile=compile, callback_factory=count_steps, labels=my_labels,
                                             guidance=guidance or 0.0):
                first = (job.rank + (start // batch_size) * job.world_size) * batch_size
                for i, img in enumerate(imgs):
                    save_png(tmp / f"{first + i:06d}.png", img)
                done += len(imgs)
                view.update("sampling", done)
        job.barrier()
        if not job.is_main:
            job.close()
            return
        meta = {"source": den.source, "checkpoint": den.checkpoint, "weights": den.weights, "sampler": sampler,
                "steps": steps, "network_evaluations": nfe, "eta": how.eta_or_none(eta),
                "variance": how.variance_or_none(variance), "seeds": seeds, "n": total,
                "device": str(dev), "precision": prec.name, "ddpmctl": __version__,
                "seconds": round(time.perf_counter() - t0, 3)}
        if labels is not None:
            meta.update(guidance=guidance, classes=list(den.spec.model.classes), labels=labels)
        if job.distributed:
            meta["processes"] = job.world_size
        (tmp / "samples.json").write_text(json.dumps(meta, indent=1))
    job.close()
    info(f"wrote {total} image(s) to {out}/ in {meta['seconds']:.1f}s")
    if as_json:
        print_json({**{k: v for k, v in meta.items() if k not in ("seeds", "labels")}, "out": str(out), "seed": seed})
    else:
        print(out)


def _of_classes(spec, labels: Optional[list[int]], guidance: Optional[float]) -> str:
    if labels is None:
        return ""
    names = [spec.model.classes[c] for c in dict.fromkeys(labels)]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f" of class {shown} (guidance {guidance:g})"


@contextmanager
def _shared_stage(job, out: Path, overwrite: bool, reading: list[str]) -> Iterator[Path]:
    """staged_dir for a distributed job: rank 0 makes it and tells the others where it is; only
    rank 0 moves it into place (after the barrier in the caller) or removes it on failure."""
    from ddpmctl.outdir import staged_dir

    if job.is_main:
        with staged_dir(out, overwrite, reading=reading) as tmp:
            job.broadcast(str(tmp))
            yield tmp
    else:
        yield Path(job.broadcast(None))
