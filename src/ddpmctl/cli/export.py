"""`ddpmctl export`: a run's weights as a self-describing model folder (optionally with ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ddpmctl.cli.common import DeviceOpt, JsonOpt, QuietOpt, app, command_device, info, print_json
from ddpmctl.units import human_bytes

Dtype = Literal["fp32", "fp16", "bf16"]
Format = Literal["safetensors", "onnx", "diffusers"]


@app.command(epilog="Examples:\n\n  ddpmctl export\n\n"
                    "  ddpmctl export runs/shapes-20261126-101500 --out shapes-ddpm/ --dtype fp16\n\n"
                    "  ddpmctl export runs/shapes-20261126-101500 --format onnx --json\n\n"
                    "  ddpmctl export runs/shapes-20261126-101500 --format diffusers --out shapes-diffusers/\n\n"
                    "  ddpmctl export hf:google/ddpm-cifar10-32 --out ddpm-cifar10/ --format onnx\n\n"
                    "  ddpmctl sample shapes-ddpm/ --n 16 --out samples/")
def export(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run directory (default: the newest under ./runs), or a "
                                                          "diffusers folder / hf:OWNER/NAME to convert (needs --out).")]
    = None,
    out: Annotated[Optional[Path], typer.Option(help="Model folder to write (default: RUN_DIR/export).")] = None,
    dtype: Annotated[Dtype, typer.Option(help="Weight dtype in model.safetensors.")] = "fp32",
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Export the raw weights instead of the EMA.")] = False,
    format: Annotated[Format, typer.Option("--format", help="onnx: also write model.onnx (the denoiser, checked "
                                                            "with onnxruntime; needs the optional [onnx] extra: pip install '.[onnx]'). "
                                                            "diffusers: a diffusers DDPMPipeline folder instead "
                                                            "(model_index.json, unet/, scheduler/; fp32; docs/hub.md).")]
    = "safetensors",
    license: Annotated[str, typer.Option(help="License in the model card's front matter.")] = "mit",
    device: DeviceOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out (an earlier export; never "
                                            "a run dir, the run read, the current directory or a parent of "
                                            "one).")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a model folder: model.safetensors, config.json, README.md (model card), samples.png.

    `ddpmctl sample FOLDER` and `ddpmctl hub-push FOLDER` take the folder; it needs nothing else.
    With --format diffusers, a folder that diffusers' DDPMPipeline.from_pretrained loads (and ddpmctl too).
    """
    from ddpmctl import checkpoint as ck
    from ddpmctl.cli.progress import ProgressView
    from ddpmctl.errors import UsageError
    from ddpmctl.export import export_diffusers_folder, export_model_folder
    from ddpmctl.outdir import check_out_dir

    if run_dir is not None and _is_diffusers_source(str(run_dir)):
        _export_converted(str(run_dir), out, dtype, format, license, command_device(device), overwrite, quiet,
                          as_json, no_ema)
        return
    if run_dir is None:
        run_dir = ck.newest_run()
        info(f"using the newest run: {run_dir}")
    out = out if out is not None else Path(run_dir) / "export"
    ck.check_run_dir(Path(run_dir))  # both refusals before the message that announces the work
    if format == "diffusers" and dtype != "fp32":
        raise UsageError(f"--format diffusers writes float32 weights; drop --dtype {dtype}")
    check_out_dir(out, overwrite, reading=[run_dir], model_folder=True)
    dev = command_device(device)
    kind = "a diffusers folder" if format == "diffusers" else dtype
    info(f"exporting {run_dir} to {out} ({kind}, {'raw' if no_ema else 'EMA'} weights); drawing samples.png")
    with ProgressView(quiet) as view, view.phase("export"):
        if format == "diffusers":
            res = export_diffusers_folder(Path(run_dir), out, use_ema=not no_ema, license=license, device=dev,
                                          overwrite=overwrite, on_warning=info)
        else:
            res = export_model_folder(Path(run_dir), out, dtype=dtype, use_ema=not no_ema, license=license,
                                      onnx=format == "onnx", device=dev, overwrite=overwrite, on_warning=info)
    _report(res, as_json)


def _report(res, as_json: bool) -> None:
    if res.onnx_max_abs_diff is not None:
        info(f"model.onnx matches PyTorch within {res.onnx_max_abs_diff:.2g} (onnxruntime)")
    info(", ".join(f"{k} ({human_bytes(v)})" for k, v in res.files.items()))
    if as_json:
        print_json(res.to_dict())
    else:
        print(res.out)


def _is_diffusers_source(source: str) -> bool:
    from ddpmctl.diffusersfmt import is_diffusers_folder
    from ddpmctl.hub import HF_PREFIX
    from ddpmctl.rundir import spec_path

    path = Path(source)
    return source.startswith(HF_PREFIX) or (path.is_dir() and not spec_path(path).exists()
                                            and is_diffusers_folder(path))


def _export_converted(source: str, out: Optional[Path], dtype: str, format: str, license: str, dev, overwrite: bool,
                      quiet: bool, as_json: bool, no_ema: bool) -> None:
    """A diffusers folder or hf: repo -> a ddpmctl model folder (optionally with model.onnx)."""
    from ddpmctl.cli.progress import ProgressView
    from ddpmctl.errors import UsageError
    from ddpmctl.export import export_converted_folder

    if out is None:
        raise UsageError(f"exporting {source} needs --out FOLDER (the model folder to write)")
    if format == "diffusers":
        raise UsageError(f"{source} is a diffusers source already; --format diffusers exports run directories")
    if no_ema:
        info(f"{source} holds one set of weights; --no-ema has no effect")
    info(f"converting {source} to a ddpmctl model folder {out} ({dtype}); drawing samples.png")
    with ProgressView(quiet) as view, view.phase("export"):
        res = export_converted_folder(source, out, dtype=dtype, license=license, onnx=format == "onnx", device=dev,
                                      overwrite=overwrite, on_warning=info)
    _report(res, as_json)
