"""`ddpmctl export`: a run's newest checkpoint -> a model folder (:mod:`ddpmctl.modelfolder`).

It writes the weights, config.json (the spec sections that rebuild the network and the schedule,
how the model was trained, the run's evaluation rows), the sample grid drawn from the exported
weights exactly as `ddpmctl sample` would load them, the model card (:mod:`ddpmctl.card`) and,
when asked, model.onnx (:mod:`ddpmctl.onnxexport`). The folder appears whole or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from ddpmctl import __version__
from ddpmctl import checkpoint as ck
from ddpmctl import rundir
from ddpmctl.card import eval_rows, render_card
from ddpmctl.devices import choose_precision
from ddpmctl.errors import UsageError
from ddpmctl.generate import generate
from ddpmctl.hub import HF_PREFIX
from ddpmctl.images import make_grid, save_png
from ddpmctl.modelfolder import (CARD_FILE, CONFIG_FILE, DTYPES, FORMAT, FORMAT_VERSION, GRID_FILE, MODEL_FILE,
                                 ONNX_FILE, Denoiser, Warn, load_model_folder)
from ddpmctl.onnxexport import ONNX_ATOL, export_onnx, onnx_opset, require_onnx
from ddpmctl.outdir import check_out_dir, staged_dir
from ddpmctl.sampler_registry import get_sampler
from ddpmctl.spec import RunSpec
from ddpmctl.unet import build
from ddpmctl.writes import writing

GRID_N, GRID_NROW, GRID_SEED = 16, 4, 0  # samples.png: images 0..15, 4 per row
# Datasets the card can link on the Hub, by ddpmctl name.
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10"}


@dataclass
class ExportResult:
    out: str
    files: dict[str, int]  # name -> bytes
    dtype: str
    weights: str  # ema | model
    step: int
    onnx_max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def export_model_folder(
    run_dir: Path,
    out: Path,
    *,
    dtype: str = "fp32",
    use_ema: bool = True,
    repo_id: str | None = None,
    license: str = "mit",
    onnx: bool = False,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    on_warning: Warn | None = None,
) -> ExportResult:
    """Write RUN_DIR's newest checkpoint as a model folder at `out` (whole or not at all).

    `repo_id`, when known, makes the card's sample command `ddpmctl sample hf:REPO_ID ...`;
    otherwise it names `out`.
    """
    _check_request(out, overwrite, [run_dir], dtype, onnx)
    run_dir = ck.check_run_dir(Path(run_dir))
    spec = rundir.load_spec(run_dir)
    ckpt, kind, tensors = _checked_tensors(run_dir, spec, use_ema, on_warning)
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    config = _make_config(spec, run_dir, ckpt, kind, dtype, sum(v.numel() for v in tensors.values()))

    meta = {"format": "pt", "ddpmctl": __version__, "dtype": dtype, "weights": kind, "step": str(ckpt.step)}
    files, diff = _write_model_folder(Path(out), overwrite, [run_dir], tensors, meta, config, spec, onnx=onnx,
                                      device=device, repo_id=repo_id, license=license)
    return ExportResult(str(out), files, dtype, kind, ckpt.step, diff)


def export_converted_folder(
    source: str,
    out: Path,
    *,
    dtype: str = "fp32",
    license: str = "mit",
    onnx: bool = False,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    on_warning: Warn | None = None,
) -> ExportResult:
    """Write a diffusers folder or hf: repo (SOURCE, :func:`ddpmctl.modelfolder.load_source`) as a ddpmctl
    model folder at `out`, optionally with model.onnx. Its `ddpmctl sample` default (and the card's grid) is
    DDIM at 50 steps (at most T) where the source's scheduler is DDPM's (all T steps)."""
    from ddpmctl.hub import HF_PREFIX as HF
    from ddpmctl.modelfolder import load_source

    reading = [] if source.startswith(HF) else [source]
    _check_request(out, overwrite, reading, dtype, onnx)
    den = load_source(source, device="cpu", on_warning=on_warning)
    if den.weights != "diffusers":
        raise UsageError(f"{source} is not a diffusers folder; export takes a run directory or a diffusers folder "
                         "(a ddpmctl model folder is one already)")
    spec = den.spec
    if spec.sample.sampler == "ddpm":
        steps = min(50, spec.diffusion.timesteps)
        spec = spec.model_copy(update={"sample": spec.sample.model_copy(update={"sampler": "ddim", "steps": steps})})
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in den.model.state_dict().items()}
    config = _base_config(spec, "diffusers", dtype, sum(v.numel() for v in tensors.values()))
    config["training"] = {"converted_from": source, "dataset": f"see {source}", "checkpoint": den.checkpoint}
    config["evaluation"] = []
    meta = {"format": "pt", "ddpmctl": __version__, "dtype": dtype, "weights": "diffusers", "source": source}
    files, diff = _write_model_folder(Path(out), overwrite, reading, tensors, meta, config, spec, onnx=onnx,
                                      device=device, repo_id=None, license=license)
    return ExportResult(str(out), files, dtype, "diffusers", 0, diff)


def _check_request(out: Path, overwrite: bool, reading: list, dtype: str, onnx: bool) -> None:
    """The refusals before any work: --out, --dtype, the ONNX extra."""
    check_out_dir(Path(out), overwrite, reading=reading, model_folder=True)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if onnx:
        require_onnx()


def _write_model_folder(out: Path, overwrite: bool, reading: list, tensors: dict[str, torch.Tensor], meta: dict,
                        config: dict, spec: RunSpec, *, onnx: bool, device, repo_id: str | None,
                        license: str) -> tuple[dict[str, int], float | None]:
    """Stage and write the model folder's files (whole or not at all): (file sizes, ONNX difference)."""
    with writing(out, kept=f"{out} is as it was before this command (the partial folder was removed)"), \
            staged_dir(out, overwrite, reading=reading, model_folder=True) as tmp:
        (tmp / MODEL_FILE).write_bytes(save_safetensors(tensors, metadata=meta))
        _write_json(tmp / CONFIG_FILE, config)
        # Load the folder back exactly as `ddpmctl sample` will, and draw the card's grid with it.
        den = load_model_folder(tmp, device=device)
        _draw_grid(den, config["grid"], tmp / GRID_FILE, device)
        diff = None
        if onnx:
            diff = export_onnx(den.model, spec, tmp / ONNX_FILE)
            config["onnx"] = {"file": ONNX_FILE, "dtype": "fp32", "opset": onnx_opset(tmp / ONNX_FILE),
                              "max_abs_diff": diff, "tolerance": ONNX_ATOL}
            _write_json(tmp / CONFIG_FILE, config)
        source = f"{HF_PREFIX}{repo_id}" if repo_id else str(out)
        (tmp / CARD_FILE).write_text(render_card(config, source, license=license), encoding="utf-8")
        return file_sizes(tmp), diff


def _checked_tensors(run_dir: Path, spec: RunSpec, use_ema: bool,
                     on_warning: Warn | None) -> tuple[ck.Checkpoint, str, dict[str, torch.Tensor]]:
    """(newest checkpoint, "ema" | "model", its weights checked against the spec's network)."""
    ckpt = ck.find_newest(run_dir, on_warning=on_warning)
    kind = "ema" if use_ema else "model"
    tensors = ckpt.tensors(kind)
    with torch.device("meta"):
        expected = ck.tensor_specs(build(spec.model).state_dict())
    ck.check_fits_spec(ckpt, kind, tensors, expected)  # the check `sample` and `resume` make
    return ckpt, kind, tensors


def export_diffusers_folder(
    run_dir: Path,
    out: Path,
    *,
    use_ema: bool = True,
    repo_id: str | None = None,
    license: str = "mit",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    on_warning: Warn | None = None,
) -> ExportResult:
    """Write RUN_DIR's newest checkpoint as a diffusers DDPMPipeline folder (whole or not at all):
    model_index.json, unet/config.json + unet/diffusion_pytorch_model.safetensors (fp32),
    scheduler/scheduler_config.json (DDPMScheduler), README.md (the card, library_name: diffusers) and
    samples.png, drawn from the folder as ddpmctl loads it back. A network diffusers cannot express is
    refused before anything is written (:func:`ddpmctl.diffusersfmt.unet_config_from_spec`)."""
    from ddpmctl import diffusersfmt as dfm
    from ddpmctl.modelfolder import load_diffusers_folder

    check_out_dir(Path(out), overwrite, reading=[run_dir], model_folder=True)
    run_dir = ck.check_run_dir(Path(run_dir))
    spec = rundir.load_spec(run_dir)
    unet_config = dfm.unet_config_from_spec(spec.model, num_classes=getattr(spec.model, "num_classes", None))
    ckpt, kind, tensors = _checked_tensors(run_dir, spec, use_ema, on_warning)
    tensors = {k: v.float() for k, v in tensors.items()}
    theirs = dfm.state_dict_to_diffusers(tensors, spec.model)
    config = _make_config(spec, run_dir, ckpt, kind, "fp32", sum(v.numel() for v in tensors.values()))
    config["weights"]["file"] = f"{dfm.UNET_DIR}/{dfm.UNET_WEIGHTS}"

    out = Path(out)
    with writing(out, kept=f"{out} is as it was before this command (the partial folder was removed)"), \
            staged_dir(out, overwrite, reading=[run_dir], model_folder=True) as tmp:
        (tmp / dfm.UNET_DIR).mkdir()
        (tmp / dfm.SCHEDULER_DIR).mkdir()
        _write_json(tmp / dfm.INDEX_FILE, dfm.index_config())
        _write_json(tmp / dfm.UNET_DIR / dfm.UNET_CONFIG, unet_config)
        (tmp / dfm.UNET_DIR / dfm.UNET_WEIGHTS).write_bytes(save_safetensors(theirs, metadata={"format": "pt"}))
        _write_json(tmp / dfm.SCHEDULER_DIR / dfm.SCHEDULER_CONFIG, dfm.scheduler_config_from_spec(spec.diffusion))
        # Load the folder back as `ddpmctl sample` will: the same network, to float32 rounding.
        den = load_diffusers_folder(tmp)
        diff = _max_abs_diff(den, spec, tensors)  # on the CPU, in float32
        den.model.to(device)
        if diff > 1e-4:
            raise RuntimeError(f"the diffusers folder does not reproduce the run's network (max |diff| {diff:.3g}); "
                               "please report this")
        _draw_grid(den, config["grid"], tmp / GRID_FILE, device)
        source = f"{HF_PREFIX}{repo_id}" if repo_id else str(out)
        (tmp / CARD_FILE).write_text(render_card(config, source, license=license, fmt="diffusers"), encoding="utf-8")
        files = file_sizes(tmp)
    return ExportResult(str(out), files, "fp32", kind, ckpt.step)


def _max_abs_diff(den: Denoiser, spec: RunSpec, tensors: dict[str, torch.Tensor]) -> float:
    """max |den.model - the run's network| on a fixed random batch at three timesteps (CPU, float32)."""
    ours = build(spec.model)
    ours.load_state_dict(tensors)
    ours.eval()
    m = spec.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, m.channels, m.image_size, m.image_size, generator=g)
    t = torch.tensor([0, spec.diffusion.timesteps // 2, spec.diffusion.timesteps - 1])
    with torch.no_grad():
        return float((den.model(x, t) - ours(x, t)).abs().max())


def _dataset_info(source: str) -> tuple[str, list[str]]:
    """(description for the card, Hub dataset ids). Local paths are named, never spelled out."""
    if source.startswith("hf://datasets/"):
        repo = source.removeprefix("hf://datasets/").split("@")[0].strip("/")
        repo = "/".join(repo.split("/")[:2])
        return repo, [repo]
    if "://" in source:
        return f"images from {source.split('://', 1)[1].split('/')[0]}", []
    if source.startswith("/") or source.startswith(".") or "/" in source or os.sep in source:
        return f"a local image collection (`{Path(source).name}`)", []
    if source == "shapes":
        return "shapes: ddpmctl's built-in procedural circles, squares and triangles", []
    hub = HUB_DATASETS.get(source)
    return source, [hub] if hub else []


def _base_config(spec: RunSpec, kind: str, dtype: str, n_params: int) -> dict:
    """config.json without the training and evaluation sections: what rebuilds the network and the grid."""
    s = spec.sample
    how = get_sampler(s.sampler)
    steps = None if how.all_steps else s.steps
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ddpmctl_version": __version__,
        "spec_version": spec.version,
        "preset": spec.preset,
        "model": spec.model.model_dump(mode="json"),
        "diffusion": spec.diffusion.model_dump(mode="json"),
        "sample": s.model_dump(mode="json"),
        "weights": {"file": MODEL_FILE, "dtype": dtype, "kind": kind, "parameters": n_params},
        "grid": {"file": GRID_FILE, "n": GRID_N, "nrow": GRID_NROW, "seed": GRID_SEED, "sampler": s.sampler,
                 "steps": steps, "eta": how.eta_or_none(s.eta)},
    }


def _make_config(spec: RunSpec, run_dir: Path, ckpt: ck.Checkpoint, kind: str, dtype: str, n_params: int) -> dict:
    st = ckpt.state
    desc, hub_ids = _dataset_info(spec.data.source)
    return {
        **_base_config(spec, kind, dtype, n_params),
        "training": {
            "run": run_dir.resolve().name,
            "checkpoint": ckpt.path.name,
            "dataset": desc,
            "hub_datasets": hub_ids,
            "flip": spec.data.flip,
            "steps": ckpt.step,
            "epochs": st.get("epoch"),
            "images_seen": st.get("images_seen"),
            "final_loss": st.get("last_loss"),
            "skipped_steps": st.get("skipped_steps", 0),
            "batch_size": spec.train.batch_size,
            "optimizer": ("SGD (momentum {:g})".format(spec.optim.momentum) if spec.optim.name == "sgd" else
                          "AdamW" + (f" after {spec.optim.warm_start_steps} steps of SGD (momentum "
                                     f"{spec.optim.momentum:g})" if spec.optim.warm_start_steps else "")),
            "lr": spec.optim.lr,
            "warmup_steps": spec.optim.warmup_steps,
            "weight_decay": spec.optim.weight_decay,
            "grad_clip": spec.optim.grad_clip,
            "ema_decay": spec.optim.ema_decay,
            "precision": spec.train.precision,
            "seed": spec.train.seed,
        },
        "evaluation": eval_rows(rundir.read_eval_log(run_dir)),
    }


def _draw_grid(den: Denoiser, grid: dict, path: Path, device) -> None:
    device = torch.device(device)
    seeds = list(range(grid["seed"], grid["seed"] + grid["n"]))
    imgs = torch.cat([b for _, b, _ in generate(den, seeds, sampler=grid["sampler"], steps=grid["steps"],
                                                eta=grid["eta"] or 0.0, batch_size=grid["n"], device=device,
                                                precision=choose_precision("fp32", device))])
    save_png(path, make_grid(imgs, nrow=grid["nrow"]))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def file_sizes(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file in ``folder`` (a diffusers folder has unet/ and scheduler/)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
