"""`ddpmctl resume RUN_DIR`: continue a run from its newest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import PRECISION_HELP, DeviceOpt, JsonOpt, QuietOpt, app, command_device
from ddpmctl.cli.train import NprocOpt, TimeLimitOpt, join_job, launch_workers, parse_time_limit, run_training


@app.command(epilog="Examples:\n\n  ddpmctl resume runs/shapes-20261126-101500\n\n"
                    "  ddpmctl resume runs/shapes-20261126-101500 --epochs 50\n\n"
                    "  ddpmctl resume runs/shapes-20261126-101500 --time-limit 30m")
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ddpmctl train`.")],
    epochs: Annotated[Optional[int], typer.Option(help="New total number of epochs for the run.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="New total number of optimizer steps.")] = None,
    device: DeviceOpt = None,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP + " Default: the run's.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Prepared-data root.")] = None,
    time_limit: TimeLimitOpt = None,
    nproc: NprocOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue RUN_DIR from its newest valid checkpoint with the same spec, optimizer, EMA and counters.

    --epochs/--max-steps set the run's new total (not an increment), so resuming twice is harmless.
    The number of processes may differ from the run's earlier ones (docs/distributed.md).
    """
    from ddpmctl import checkpoint as ck
    from ddpmctl import rundir
    from ddpmctl import spec as specmod
    from ddpmctl.cli.common import warn
    from ddpmctl.errors import CheckpointError, UsageError
    from ddpmctl.lock import RunLock

    limit = parse_time_limit(time_limit)
    run_dir = ck.check_run_dir(run_dir)
    dev = command_device(device or rundir.load_spec(run_dir).train.device, backend=False)  # set by training
    job = join_job(dev)
    if not job.is_main:  # rank 0 checks and updates spec.json; the others read what it wrote
        job.barrier()
        run_training(rundir.load_spec(run_dir), run_dir, dev, resume=True, as_json=as_json,
                     data_root=data_root, job=job, quiet=quiet)
        return
    with RunLock(run_dir, on_warning=warn):  # before spec.json may be rewritten; run() re-enters it
        spec = rundir.load_spec(run_dir)
        data = spec.model_dump()
        if epochs is not None:
            data["train"]["epochs"] = epochs
            data["train"]["max_steps"] = None
        if max_steps is not None:
            data["train"]["max_steps"] = max_steps
        if device is not None:
            data["train"]["device"] = device
        if precision is not None:
            data["train"]["precision"] = precision
        if limit is not None:
            data["train"]["time_limit"] = None if limit == "off" else limit
        new = specmod.validate(data)
        if new != spec:
            if epochs is not None or max_steps is not None:
                try:
                    state = ck.find_newest(run_dir).state
                except CheckpointError:
                    state = None  # no checkpoint yet: the run starts again from step 0
                if state is not None:
                    total = state.get("total_steps")
                    target = new.train.max_steps or new.train.epochs * state["steps_per_epoch"]
                    if target <= state["step"]:
                        raise UsageError(
                            f"the run is already at step {state['step']} (epoch {state['epoch']:g}); "
                            f"--epochs/--max-steps give the new total and must exceed that (was {total} steps)"
                        )
            rundir.save_spec(new, run_dir)
        if nproc is None or nproc == 1:
            job.barrier()
            run_training(new, run_dir, dev, resume=True, as_json=as_json, data_root=data_root, job=job, quiet=quiet)
            return
    launch_workers(nproc, dev, [], new.train.batch_size)  # lock released: rank 0 takes it
