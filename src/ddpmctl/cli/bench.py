"""`ddpmctl bench`: training and sampling speed of a preset on synthetic data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import PRECISION_HELP, DeviceOpt, JsonOpt, app, command_device, info, print_json, warn
from ddpmctl.spec import PRESETS
from ddpmctl.units import human_bytes


def sig3(x: float) -> str:
    """``x`` with 3 significant digits and no exponent: 4.00, 0.0123, 123, 1234."""
    import math

    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def flop_rate(tflops: float | None) -> str:
    """A FLOP rate to 3 significant digits: TFLOP/s from 1 TFLOP/s up, GFLOP/s below (a CPU's
    0.02 TFLOP/s reads 20.0 GFLOP/s, never 0.0 TFLOP/s next to a non-zero utilisation)."""
    if tflops is None:
        return "n/a"
    return f"{sig3(tflops)} TFLOP/s" if tflops >= 1 else f"{sig3(tflops * 1e3)} GFLOP/s"


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{sig3(100 * fraction)}%"


@app.command(epilog="Examples:\n\n  ddpmctl bench\n\n  ddpmctl bench --preset celeba --batch-size 64 --json\n\n"
                    "  ddpmctl bench --preset mnist --device cpu --batch-size 16 --steps 2 --only train")
def bench(
    preset: Annotated[str, typer.Option(help=f"Preset to measure: {', '.join(PRESETS)}.")] = "cifar10",
    device: DeviceOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Training batch size (default: the preset's).")]
    = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Timed training steps per repeat "
                                                             "(default: 20 on CUDA, 3 on CPU).")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Timed repeats; the median is reported.")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Untimed warm-up training steps "
                                                              "(compilation happens here).")] = None,
    sample_batch_size: Annotated[Optional[int], typer.Option(min=1, help="Sampling batch (default: 256 on CUDA, "
                                                                         "32 on CPU).")] = None,
    sample_steps: Annotated[Optional[int], typer.Option(min=2, help="Timed denoising steps per repeat.")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                    help="torch.compile (default: on for CUDA).")] = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    only: Annotated[Optional[str], typer.Option(help="Measure only 'train' or only 'sample'.")] = None,
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="Measure a class-conditional version of the "
                                                      "preset (10 classes) sampling with classifier-free guidance "
                                                      "W: each step runs the conditional and unconditional branch "
                                                      "as one forward pass of twice the batch.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure training images/s, sampling ms per step, FLOPs, memory and utilisation on synthetic data.

    Runs the same training step and sampler as `train` and `sample`; warm-up (compilation) is not timed,
    the median of repeats is reported. Utilisation is against a matrix-multiply peak measured here.
    """
    from ddpmctl import bench as benchmod
    from ddpmctl.errors import UsageError

    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if only not in (None, "train", "sample"):
        raise UsageError(f"--only expects 'train' or 'sample', got {only!r}")

    def on_event(e: dict) -> None:
        if e.get("event") == "warning":
            warn(e["message"])
        elif e.get("message"):
            info(e["message"])

    r = benchmod.run(preset, device=command_device(device, backend=False), batch_size=batch_size, steps=steps,
                     warmup=warmup, repeats=repeats, sample_batch_size=sample_batch_size, sample_steps=sample_steps,
                     compile=compile, precision=precision, train=only != "sample", sample=only != "train",
                     guidance=guidance, emit=on_event)
    if as_json:
        print_json(r)
        return
    print("\n".join(report_lines(r)))


def report_lines(r: dict) -> list[str]:
    """The readable report of :func:`ddpmctl.bench.run`'s result."""
    gf = 1e-9
    peak = r["peak_memory_bytes"]
    lines = [
        f"device            {r['device_name']}  (torch {r['torch']}, {r['precision']}, "
        f"compile {'on' if r['compile'] else 'off'})",
        f"preset            {r['preset']}  ({r['parameters'] / 1e6:.1f}M parameters)",
        f"FLOPs per image   {sig3(r['flops_per_image_train'] * gf)} GFLOP train (fwd+bwd), "
        f"{sig3(r['flops_per_image_forward'] * gf)} GFLOP forward",
    ]
    if r["train_images_per_s"] is not None:
        lines += [
            f"training          {r['train_images_per_s']:.1f} images/s at batch {r['batch_size']} "
            f"({r['train_step_ms']:.1f} ms/step), {flop_rate(r['achieved_tflops'])}, "
            f"utilisation {percent(r['mfu'])}",
            f"peak memory       {'n/a' if peak is None else human_bytes(peak)} ({r['peak_memory_kind']})",
        ]
    if r["sample_ms_per_step"] is not None:
        lines += [
            f"sampling          {r['sample_ms_per_step']:.2f} ms per step at batch {r['sample_batch_size']}"
            + ("" if r.get("sample_guidance") is None else f" (guided, W = {r['sample_guidance']:g}: two branches)")
            + f": {r['sample_images_per_s_1000_steps']:.2f} images/s for 1000-step DDPM, "
            f"{flop_rate(r.get('sample_achieved_tflops'))}, utilisation {percent(r['sample_mfu'])}",
        ]
    if r["matmul_peak_tflops"] is not None:
        lines.append(f"matmul peak       {flop_rate(r['matmul_peak_tflops'])} ({r['peak_dtype']}, measured)")
    return lines
