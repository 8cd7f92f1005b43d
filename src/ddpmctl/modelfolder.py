"""The model-folder format, and loading a denoiser from any source `ddpmctl sample` takes.

A model folder describes itself; nothing else is needed to sample from it:

    model.safetensors   the weights (EMA by default) in fp32, fp16 or bf16; the safetensors metadata
                        records the dtype, the kind of weights and the ddpmctl version
    config.json         the model, diffusion and sample sections of the spec (enough to rebuild the
                        network and the schedule) and how the model was trained
    README.md           a model card (:mod:`ddpmctl.card`)
    samples.png         the card's sample grid, drawn from the exported weights
    model.onnx          (optional) the denoiser (x_t, t) -> prediction (:mod:`ddpmctl.onnxexport`)

`ddpmctl export` (:mod:`ddpmctl.export`) writes them. This module reads config.json, checks the
weights against the network it describes, and turns a run directory, a model folder, a diffusers
folder (mapped onto ddpmctl's network by :mod:`ddpmctl.diffusersfmt`) or hf:OWNER/NAME[@REV]
(downloaded through :mod:`ddpmctl.hub`) into a :class:`Denoiser`. Nothing
here unpickles: pickled weights (*.bin, *.pt, *.pth, *.ckpt) are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddpmctl import __version__
from ddpmctl import checkpoint as ck
from ddpmctl import hub, rundir
from ddpmctl.diffusersfmt import is_diffusers_folder
from ddpmctl import spec as specmod
from ddpmctl.errors import SpecError, UsageError
from ddpmctl.smallfiles import read_object
from ddpmctl.spec import RunSpec
from ddpmctl.unet import UNet, build

Warn = Callable[[str], None]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
GRID_FILE = "samples.png"
ONNX_FILE = "model.onnx"
FORMAT = "ddpmctl-model"
FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class Denoiser:
    """A network ready for sampling plus everything needed to interpret it."""

    model: UNet
    spec: RunSpec
    source: str  # where it came from (run dir / checkpoint), for samples.json
    checkpoint: str | None
    weights: str  # "ema" | "model"


def load_run(run_dir: Path, *, use_ema: bool = True, device: torch.device | str = "cpu",
             on_warning: Callable[[str], None] | None = None) -> Denoiser:
    run_dir = ck.check_run_dir(Path(run_dir))
    spec = rundir.load_spec(run_dir)
    ckpt = ck.find_newest(run_dir, on_warning=on_warning)
    model = build(spec.model)
    kind = "ema" if use_ema else "model"
    weights = ckpt.tensors(kind)
    expected = ck.tensor_specs(model.state_dict())
    params = set(dict(model.named_parameters()))
    ck.check_fits_spec(ckpt, kind, weights, expected, optional=frozenset(k for k in expected if k not in params))
    model.load_state_dict(weights, strict=False)
    model.to(device).eval()
    return Denoiser(model, spec, str(run_dir), ckpt.path.name, "ema" if use_ema else "model")


def _checked_weights(tensors: dict[str, torch.Tensor], spec: RunSpec, where: str) -> dict[str, torch.Tensor]:
    """The network's parameters from `tensors`, checked (names, shapes, a floating-point dtype: weights
    are stored in fp32, fp16 or bf16) against the spec's architecture."""
    with torch.device("meta"):
        shapes = {k: (None, tuple(v.shape)) for k, v in build(spec.model).state_dict().items()}
    ck.check_tensors(tensors, shapes, where, error=UsageError, hint=": the weights do not fit the network the spec describes")
    return {k: tensors[k] for k in shapes}


def read_model_config(folder: Path, where: str | None = None) -> dict:
    """FOLDER/config.json of a model folder, with the fields ddpmctl reads checked for their types."""
    where = where or str(folder)
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{where} is not a ddpmctl model folder: no {CONFIG_FILE}")
    expect = f'a ddpmctl model config ("format": "{FORMAT}", written by `ddpmctl export`)'
    config = read_object(path, expect=expect)
    if config.get("format") != FORMAT:
        raise UsageError(f"{where}/{CONFIG_FILE} is not a ddpmctl model config (expected \"format\": \"{FORMAT}\"; "
                         "export one with `ddpmctl export`)")
    fields = {"format_version": int, "spec_version": int, "ddpmctl_version": str, "training": dict, "weights": dict}
    for key, typ in fields.items():
        v = config.get(key)
        if key in config and (not isinstance(v, typ) or isinstance(v, bool)):
            raise UsageError(f"{where}/{CONFIG_FILE}: \"{key}\" is {json.dumps(v)[:40]}, expected "
                             f"{'a whole number' if typ is int else 'a string' if typ is str else 'an object'}")
    for section, key in (("training", "checkpoint"), ("training", "run"), ("weights", "kind")):
        v = config.get(section, {}).get(key)
        if v is not None and not isinstance(v, str):
            raise UsageError(f"{where}/{CONFIG_FILE}: \"{section}.{key}\" is {json.dumps(v)[:40]}, expected a string")
    if config.get("format_version", 1) > FORMAT_VERSION:
        raise UsageError(f"{where} was exported by a newer ddpmctl ({config.get('ddpmctl_version')}); "
                         f"this is {__version__}: upgrade ddpmctl")
    return config


def load_model_folder(folder: Path, *, device: torch.device | str = "cpu", source: str | None = None,
                      use_ema: bool = True, on_warning: Warn | None = None) -> Denoiser:
    """A model folder -> Denoiser (float32 network, full RunSpec: missing sections take defaults)."""
    folder = Path(folder)
    where = source or str(folder)
    if not folder.is_dir():
        raise UsageError(f"{where} does not exist or is not a folder")
    weights = folder / MODEL_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(
                f"{where} holds only pickled weights ({', '.join(pickles[:4])}); ddpmctl never loads pickle files "
                f"(unpickling can run arbitrary code): it needs {MODEL_FILE} (re-export with `ddpmctl export`)")
        raise UsageError(f"{where} is not a ddpmctl model folder: no {MODEL_FILE} (ddpmctl loads safetensors "
                         "weights only, never pickled *.bin/*.pt/*.pth/*.ckpt)")
    config = read_model_config(folder, where)
    spec_data = {k: config[k] for k in ("preset", "model", "diffusion", "sample") if k in config}
    if "spec_version" in config:
        spec_data["version"] = config["spec_version"]
    try:
        spec = specmod.validate(spec_data)
    except SpecError as exc:
        raise SpecError(f"{where}/{CONFIG_FILE}: {exc}") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        raise UsageError(f"{where}/{MODEL_FILE} is not a readable safetensors file ({exc})") from None
    tensors = _checked_weights(tensors, spec, f"{where}/{MODEL_FILE}")
    kind = meta.get("weights") or config.get("weights", {}).get("kind", "ema")
    if not use_ema and kind == "ema" and on_warning:
        on_warning(f"{where} holds only EMA weights; --no-ema has no effect")
    model = build(spec.model)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device).eval()
    return Denoiser(model, spec, where, config.get("training", {}).get("checkpoint"), kind)


def load_diffusers_folder(folder: Path, *, device: torch.device | str = "cpu", source: str | None = None,
                          use_ema: bool = True, on_warning: Warn | None = None) -> Denoiser:
    """A diffusers folder (DDPMPipeline's model_index.json + unet/ + scheduler/, or a flat UNet2DModel
    folder) -> Denoiser on ddpmctl's own network (:mod:`ddpmctl.diffusersfmt` maps the configs and weights)."""
    from ddpmctl import diffusersfmt as dfm

    folder = Path(folder)
    where = source or str(folder)
    unet_dir, sched_path = dfm.locate(folder, where)
    weights = dfm.weights_file(unet_dir, where)
    unet_cfg_where = f"{where}/{(unet_dir / dfm.UNET_CONFIG).relative_to(folder)}"
    model = dfm.model_spec_from_unet_config(dfm.read_config(unet_dir / dfm.UNET_CONFIG, "UNet2DModel config"),
                                            unet_cfg_where)
    spec_data: dict = {"preset": "diffusers", "model": model}
    if sched_path is None:
        if on_warning:
            on_warning(f"{where} has no scheduler config: assuming diffusers' DDPMScheduler defaults "
                       "(linear betas 1e-4 to 0.02, T = 1000, epsilon)")
        sched_cfg: dict = {}
    else:
        sched_cfg = dfm.read_config(sched_path, "scheduler config")
    spec_data["diffusion"], spec_data["sample"] = dfm.diffusion_from_scheduler_config(
        sched_cfg, f"{where}/{sched_path.relative_to(folder) if sched_path else dfm.SCHEDULER_CONFIG}", on_warning)
    try:
        spec = specmod.validate(spec_data)
    except SpecError as exc:
        raise SpecError(f"{where}: the diffusers config maps to an invalid ddpmctl spec: {exc}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        raise UsageError(f"{where}/{weights.relative_to(folder)} is not a readable safetensors file ({exc})") from None
    where_w = f"{where}/{weights.relative_to(folder)}"
    tensors = _checked_weights(dfm.state_dict_from_diffusers(tensors, spec.model, where_w), spec, where_w)
    if not use_ema and on_warning:
        on_warning(f"{where} holds one set of weights (diffusers folders keep no separate EMA); --no-ema has no effect")
    net = build(spec.model)
    net.load_state_dict(tensors)
    net.to(device).eval()
    return Denoiser(net, spec, where, str(weights.relative_to(folder)), "diffusers")


def _load_folder(folder: Path, **kw) -> Denoiser:
    """A ddpmctl model folder or a diffusers folder, whichever it is."""
    if is_diffusers_folder(folder) and not (Path(folder) / MODEL_FILE).exists():
        return load_diffusers_folder(folder, **kw)
    return load_model_folder(folder, **kw)


def load_source(source: str | Path | None, *, use_ema: bool = True, device: torch.device | str = "cpu",
                on_warning: Callable[[str], None] | None = None) -> Denoiser:
    """SOURCE: a run dir (default: the newest under ./runs), a model folder written by `ddpmctl export`
    (config.json + model.safetensors), a diffusers folder (model_index.json + unet/ + scheduler/), or
    hf:OWNER/NAME[@REV] on the Hugging Face Hub (either kind of folder)."""
    if source is None:
        run = ck.newest_run()
        if on_warning:
            on_warning(f"using the newest run: {run}")
        return load_run(run, use_ema=use_ema, device=device, on_warning=on_warning)
    if isinstance(source, str) and source.startswith(hub.HF_PREFIX):
        return _load_folder(hub.download(source), device=device, source=source, use_ema=use_ema,
                            on_warning=on_warning)
    path = Path(source)
    if path.is_dir() and not rundir.spec_path(path).exists() and (
            (path / CONFIG_FILE).exists() or (path / MODEL_FILE).exists() or is_diffusers_folder(path)
            or any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir())):
        return _load_folder(path, device=device, use_ema=use_ema, on_warning=on_warning)
    return load_run(path, use_ema=use_ema, device=device, on_warning=on_warning)


def resolve_source(source: Path | None) -> tuple[Path, str]:
    """(path, 'run' | 'folder'); None means the newest run under ./runs."""
    if source is None:
        return ck.newest_run(), "run"
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{path} does not exist (expected a run directory or a model folder)")
    if path.is_dir() and rundir.spec_path(path).is_file():
        return path, "run"
    if path.is_dir() and ((path / CONFIG_FILE).is_file() or is_diffusers_folder(path)):
        return path, "folder"  # a ddpmctl model folder or a diffusers folder
    if path.is_dir() and any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir()):
        load_model_folder(path)  # raises the pickle message
    raise UsageError(f"{path} is neither a ddpmctl run directory (spec.json) nor a model folder (config.json + "
                     f"{MODEL_FILE})")
