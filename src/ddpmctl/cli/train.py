"""`ddpmctl train` and the helpers `resume` shares with it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import PRECISION_HELP, DeviceOpt, JsonOpt, QuietOpt, app, command_device, info, print_json
from ddpmctl.errors import UsageError
from ddpmctl.spec import PRESETS, RECIPES

# Datasets whose natural preset differs from their name.
PRESET_FOR_DATA = {"fashion-mnist": "mnist", "celeba-hq": "celeba"}
DEFAULT_PRESET = "cifar10"


def preset_for(data: str) -> tuple[str, bool]:
    """(preset, guessed): the preset named like the data, else cifar10 (32x32 RGB)."""
    if data in PRESETS:
        return data, False
    if data in PRESET_FOR_DATA:
        return PRESET_FOR_DATA[data], False
    return DEFAULT_PRESET, True


def data_source(data: str) -> str:
    """Local paths become absolute so the run dir works from any directory."""
    p = Path(data).expanduser()
    if "://" not in data and (p.exists() or data.startswith((".", "/", "~"))):
        return str(p.resolve())
    return data


TimeLimitOpt = Annotated[Optional[str], typer.Option(
    "--time-limit", metavar="DURATION", help="Stop at the first step boundary after DURATION of this process's "
    "wall time (90s, 30m, 2h, 1d, 1h30m), write a checkpoint and exit 0; `ddpmctl resume RUN --time-limit ...` "
    "continues (chunked training for clusters and CI). Saved as train.time_limit; `off` clears it.")]


def parse_time_limit(text: Optional[str]) -> Optional[float] | str:
    """--time-limit: seconds, ``"off"`` (clear the run's saved limit) or None (not given)."""
    from ddpmctl.durations import parse_duration

    if text is None:
        return None
    if text.strip().lower() in ("off", "none"):
        return "off"
    return parse_duration(text, "--time-limit")


NprocOpt = Annotated[Optional[int], typer.Option(
    "--nproc", min=1, max=1024, help="Worker processes on this machine (torch.distributed; one per GPU). "
    "Across machines: `torchrun ... -m ddpmctl COMMAND ...` (docs/distributed.md).")]


def join_job(device):
    """This process's :class:`ddpmctl.dist.Dist` on ``device`` (resolved by
    :func:`ddpmctl.cli.common.command_device`): a rank of the torchrun job that started it, or the
    single process."""
    from ddpmctl import dist

    if not dist.launched():
        return dist.SINGLE
    return dist.from_env(device)


def launch_workers(nproc: int, dev, add: list[str], global_batch: Optional[int] = None) -> None:
    """Re-run this command line in ``nproc`` workers (without --nproc, plus ``add``) on the resolved
    device ``dev``; exit with their code.

    ``global_batch`` (training): must split evenly over the workers, checked before any starts."""
    from ddpmctl import dist
    from ddpmctl.cli.common import error
    from ddpmctl.launch import launch, worker_argv

    if dist.launched():
        raise UsageError("--nproc starts workers itself; inside torchrun leave it out (torchrun's "
                          "--nproc-per-node says how many)")
    if global_batch is not None:
        dist.check_batch(global_batch, nproc)
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"--nproc runs on CUDA (NCCL) or the CPU (gloo), not {dev.type}; add --device cpu")
    if dev.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); "
                              "use one worker per GPU")
    threads = max(1, (os.cpu_count() or 1) // nproc) if dev.type == "cpu" else None
    result = launch(nproc, worker_argv(sys.argv[1:], add=add), threads_per_worker=threads)
    if result.message:
        error(result.message)
    sys.exit(result.exit_code)


def run_training(spec, run_dir: Path, device, *, resume: bool, as_json: bool, data_root: Optional[Path],
                 job=None, quiet: bool = False) -> None:
    """Run the loop on ``device`` (:func:`ddpmctl.cli.common.command_device`) with a progress display;
    signals stop it cleanly (exit 130/143, one line on how to resume), a second Ctrl-C at once (the
    newest complete checkpoint is never left broken).

    In a distributed job (``job``), every rank runs this; only rank 0 shows progress and prints."""
    from ddpmctl import dist
    from ddpmctl.cli.progress import ProgressView, signals_to
    from ddpmctl.train import Interrupted, StopFlag, run

    job = job or dist.SINGLE
    stop = StopFlag()
    try:
        with signals_to(stop, quiet=not job.is_main), ProgressView(quiet, silent=not job.is_main) as progress:
            result = run(spec, run_dir, resume=resume, on_event=progress, stop=stop, data_root=data_root,
                         dist=job, device=device)
    except Interrupted as exc:
        if not job.is_main:
            sys.exit(exc.exit_code)
        info(str(exc))
        if as_json:
            print_json({"run_dir": str(run_dir), "interrupted": exc.signum, "steps": exc.step,
                        "checkpoint": str(exc.checkpoint) if exc.checkpoint else None})
        sys.exit(exc.exit_code)  # not typer.Exit: main() runs click with standalone_mode=False
    except KeyboardInterrupt:
        if job.is_main:
            info(f"stopped at once; the newest complete checkpoint is intact: continue with "
                 f"`ddpmctl resume {run_dir}`")
        sys.exit(130)
    finally:
        job.close()
    if not job.is_main:
        return
    if result.stopped == "time_limit":
        from ddpmctl.durations import short_duration

        limit = short_duration(spec.train.time_limit)
        info(f"time limit {limit} reached at step {result.steps} of {result.total_steps}: checkpoint "
             f"{Path(result.checkpoint).name} written; continue with "
             f"`ddpmctl resume {run_dir} --time-limit {limit}`")
    if as_json:
        print_json(result.to_dict())
    elif result.stopped == "time_limit":
        print(result.checkpoint)
    else:
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        extra = f", {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""
        if result.rollbacks:
            extra += f", {result.rollbacks} rollback(s) (learning rate x{result.lr_scale:g})"
        info(f"done: {result.steps} steps, {result.epochs:g} epochs, final loss {loss}{extra}")
        print(result.checkpoint or result.run_dir)


@app.command(
    epilog="Examples:\n\n  ddpmctl train shapes\n\n  ddpmctl train ./my_photos --preset celeba --epochs 200\n\n"
    "  ddpmctl train cifar10 --dry-run --json\n\n  ddpmctl train shapes --set optim.lr=1e-3 --max-steps 200\n\n"
    "  ddpmctl train cifar10 --recipe ho2020   (Ho et al. 2020's exact recipe)\n\n"
    "  ddpmctl train mnist --preset mnist-small   (digits in under an hour on a 2-core CPU)\n\n"
    "  ddpmctl train celeba --epochs 200 --nproc 8\n\n"
    "  ddpmctl train ./church_photos --init hf:google/ddpm-church-256 --max-steps 2000\n\n"
    "  ddpmctl train mnist --time-limit 2h   "
    "(then `ddpmctl resume RUN --time-limit 2h` until done)",
)
def train(
    data: Annotated[str, typer.Argument(help="Dataset: shapes, mnist, cifar10, celeba, a prepared name, "
                                             "a folder or archive of images, hf://datasets/..., https://...")],
    preset: Annotated[Optional[str], typer.Option(help=f"Model/training preset: {', '.join(PRESETS)} "
                                                       "(default: named after DATA, else cifar10).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help=f"Published training recipe laid over the preset: "
                                                       f"{', '.join(RECIPES)} (Ho et al. 2020: eps, linear "
                                                       "schedule, L_simple, warm-up 5000, EMA 0.9999, DDPM "
                                                       "1000-step sampling; for paper-comparable FID). Default: "
                                                       "the preset's own (docs/quality.md says why).")] = None,
    spec_file: Annotated[Optional[Path], typer.Option("--spec", help="TOML or JSON spec file (partial).")] = None,
    sets: Annotated[Optional[list[str]], typer.Option("--set", metavar="SECTION.FIELD=VALUE",
                                                                       help="Override one spec field (repeatable).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<data>-<timestamp>).")] = None,
    device: DeviceOpt = None,  # type: ignore[assignment]
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Sample grid every N epochs.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                    help="torch.compile (default: on for CUDA).")] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic", help="Deterministic mode "
                                                          "(always on for CPU).")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Prepared-data root (default $DDPMCTL_DATA or "
                                                           "the per-user data dir).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved spec, parameter count, device "
                                                            "memory estimate (exit 2 if it cannot fit the device) "
                                                            "and estimated wall time (a few timed steps); write "
                                                            "nothing.")] = False,
    conditional: Annotated[Optional[bool], typer.Option(
        "--conditional", help="Class-conditional model with classifier-free guidance: needs labelled data (shapes, "
        "mnist, fashion-mnist, cifar10, a folder with one sub-folder per class); then `ddpmctl sample RUN --class "
        "NAME --guidance W`. Labels are dropped for train.label_dropout of the images (default 0.1).")] = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", metavar="SOURCE", help="Start from SOURCE's weights and EMA (a run dir, a model folder, a "
        "diffusers folder or hf:OWNER/NAME[@REV]): the network and the schedule are SOURCE's, the data is "
        "converted to its image size and channels, the optimizer starts fresh; spec.json records train.init.")]
    = None,
    time_limit: TimeLimitOpt = None,
    nproc: NprocOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a DDPM on DATA. Progress on stderr; the newest checkpoint path (or --json summary) on stdout.

    With --nproc N (or under torchrun) --batch-size is the global batch, split evenly over the ranks."""
    from ddpmctl import spec as specmod
    from ddpmctl.data import check_source
    from ddpmctl.train import make_run_dir

    name, guessed = preset_for(data) if preset is None else (preset, False)
    limit = parse_time_limit(time_limit)
    overrides = {
        # `train mnist-small`: a preset named as DATA trains on that preset's data (mnist)
        "data": {"source": data_source(PRESETS[data]["data"]["source"] if preset is None and data in PRESETS else data)},
        "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "seed": seed,
                  "device": device, "precision": precision, "checkpoint_every": checkpoint_every,
                  "sample_every": sample_every, "deterministic": deterministic,
                  "compile": None if compile is None else ("on" if compile else "off"),
                  "time_limit": limit if limit != "off" else None},
        "optim": {"lr": lr},
        "model": {"conditional": conditional},
    }
    # with --init, the network and schedule are the source's: the preset's are not validated against --set
    own_sets = sets or [] if init is None else specmod.without_network_sets(sets or [])
    spec = specmod.resolve(name, recipe=recipe, spec_file=spec_file, sets=own_sets, overrides=overrides)
    if init is not None:
        from ddpmctl.hub import HF_PREFIX
        from ddpmctl.modelfolder import load_source

        init = init if init.startswith(HF_PREFIX) else data_source(init)
        source = load_source(init, device="cpu", on_warning=info)  # a bad source fails here, before any work
        spec = specmod.with_init(spec, source.spec, init, sets)
    check_source(spec.data.source, root=data_root)  # a typo fails here, dry run or not; nothing is downloaded
    if guessed and not dry_run and os.environ.get("RANK", "0") == "0":  # once per job under torchrun
        info(f"using preset {name} ({spec.model.image_size}x{spec.model.image_size}, "
             f"{spec.model.channels} channel(s)); choose another with --preset")
    if dry_run:
        dry_run_report(spec, as_json, data_root)
        return
    run_dir = make_run_dir(spec, out)
    dev = command_device(spec.train.device, backend=False)  # training's setup sets the backend flags
    if nproc is not None and nproc > 1:
        launch_workers(nproc, dev, ["--out", str(run_dir)], spec.train.batch_size)
    job = join_job(dev)
    run_dir = Path(job.broadcast(str(run_dir)))  # under torchrun without --out: rank 0's timestamped name
    run_training(spec, run_dir, dev, resume=False, as_json=as_json, data_root=data_root, job=job, quiet=quiet)


def run_estimate(spec, dev, data_root: Optional[Path]) -> tuple[Optional[dict], Optional[str]]:
    """(estimate, why not): the whole run's wall time on ``dev`` from a few timed real steps (see
    :func:`ddpmctl.bench.estimate_step_seconds`). The step count needs the image count unless
    --max-steps gives it, so data that is not prepared yet is not downloaded for it."""
    from ddpmctl.bench import ESTIMATE_MIN_STEPS, estimate_step_seconds
    from ddpmctl.devices import choose_precision
    from ddpmctl.errors import DdpmctlError

    tr = spec.train
    total = tr.max_steps
    if total is None:
        from ddpmctl.data import load_images

        try:
            n = int(load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                                root=data_root, allow_download=False).images.shape[0])
        except DdpmctlError as exc:
            return None, f"the step count needs the data ({exc}); or give --max-steps"
        total = tr.epochs * max(1, n // min(tr.batch_size, n))
    if total <= ESTIMATE_MIN_STEPS:
        return None, f"{total} steps: too short a run to be worth timing"
    est = estimate_step_seconds(spec, dev, choose_precision(tr.precision, dev))
    return {**est, "steps": total, "seconds": est["step_seconds"] * total}, None


def data_classes(spec, data_root: Optional[Path]) -> list[str]:
    """The class names a conditional run of ``spec`` will take from its data (read, never downloaded)."""
    from ddpmctl.data import load_images
    from ddpmctl.data.labels import why_unlabelled
    from ddpmctl.errors import UsageError

    data = load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                       root=data_root, allow_download=False)
    if data.classes is None:
        raise UsageError(why_unlabelled(data.info))
    return data.classes


def dry_run_report(spec, as_json: bool, data_root: Optional[Path] = None) -> None:
    """The resolved spec, parameters, device, memory and wall-time estimates; a spec that cannot fit
    the device is refused here as the real run would refuse it (exit 2), assuming the data has
    batch_size images."""
    from ddpmctl.cli.progress import describe_estimate
    from ddpmctl.devices import choose_precision, describe, device_info
    from ddpmctl.memory import check_fits
    from ddpmctl.units import human_bytes

    dev = command_device(spec.train.device, deterministic=spec.train.deterministic)  # as training sets them
    precision = choose_precision(spec.train.precision, dev).name  # "auto" resolved for this device
    if spec.model.conditional and not spec.model.classes:
        spec = spec.model_copy(deep=True)
        spec.model.classes = tuple(data_classes(spec, data_root))
    mem = check_fits(spec, dev, precision)
    n = mem.parameters
    estimate, why_not = run_estimate(spec, dev, data_root)
    report = {"spec": spec.model_dump(mode="json"), "parameters": n, "device": device_info(dev),
              "precision": precision,
              "memory": mem.to_dict(), "estimate": estimate, **({"estimate_skipped": why_not} if why_not else {})}
    if as_json:
        print_json(report)
        return
    import json

    print(json.dumps(report["spec"], indent=2))
    print(f"parameters: {n:,} ({n / 1e6:.2f}M)")
    print(f"device: {describe(dev)}, precision {precision}")
    print(f"memory: at least {human_bytes(mem.total_bytes)} ({human_bytes(mem.parameter_bytes)} for parameters, gradients, "
          f"AdamW and EMA; {human_bytes(mem.activation_bytes)} of activations at batch {mem.batch}, {mem.precision})")
    print(describe_estimate(estimate, dev.type) if estimate else f"no time estimate: {why_not}")
