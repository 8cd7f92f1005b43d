"""Model folders (export), model cards, and the Hugging Face Hub (push and pull).

A model folder describes itself; nothing else is needed to sample from it:

    model.safetensors   the weights (EMA by default) in fp32, fp16 or bf16; the safetensors metadata
                        records the dtype, the kind of weights and the ddpmctl version
    config.json         the model, diffusion and sample sections of the spec (enough to rebuild the
                        network and the schedule) and how the model was trained
    README.md           a model card: YAML front matter for the Hub, training facts, evaluation
                        numbers, the sample grid and the exact `ddpmctl sample` command that draws it
    samples.png         that grid, drawn from the exported weights
    model.onnx          (optional) the denoiser (x_t, t) -> prediction, float32, dynamic batch axis

Nothing here prints or unpickles: pickled weights (*.bin, *.pt, *.pth, *.ckpt) are refused. Every
call into huggingface_hub goes through :func:`_hub_call`, which turns HTTP and network failures
into one :class:`NetworkError` line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ddpmctl import __version__
from ddpmctl import checkpoint as ck
from ddpmctl import spec as specmod
from ddpmctl.errors import DdpmctlError, NetworkError, SpecError, UsageError
from ddpmctl.sampler_registry import SAMPLERS, get_sampler
from ddpmctl.smallfiles import read_jsonl, read_object
from ddpmctl.spec import RunSpec
from ddpmctl.unet import build

Warn = Callable[[str], None]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
GRID_FILE = "samples.png"
ONNX_FILE = "model.onnx"
FORMAT = "ddpmctl-model"
FORMAT_VERSION = 1

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What `ddpmctl sample hf:...` downloads: weights, config, card, grid. Never a pickle, never ONNX.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.md", "*.png"]
# What a model folder may carry to the Hub.
UPLOAD_PATTERNS = DOWNLOAD_PATTERNS + ["*.onnx", "*.onnx.data"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
GRID_N, GRID_NROW, GRID_SEED = 16, 4, 0  # samples.png: images 0..15, 4 per row
ONNX_ATOL = 1e-3  # max |onnxruntime - PyTorch| accepted, relative to max(1, max |PyTorch|)
HF_PREFIX = "hf:"
LOGIN_HELP = ("log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN to a token "
              "with write access from https://huggingface.co/settings/tokens")
# Datasets the card can link on the Hub, by ddpmctl name.
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "cifar10": "uoft-cs/cifar10"}


# ---------------------------------------------------------------- results
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


@dataclass
class PushResult:
    repo_id: str
    url: str | None
    files: dict[str, int]
    card: str
    dry_run: bool
    revision: str | None = None
    commit_url: str | None = None
    owner_resolved: bool = True
    exported_from: str | None = None  # the run dir, when the folder was exported for this push

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- export
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
    from ddpmctl.outdir import check_out_dir, staged_dir
    from ddpmctl.writes import writing

    check_out_dir(Path(out), overwrite, reading=[run_dir], model_folder=True)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if onnx:
        _require_onnx()
    run_dir = ck.check_run_dir(Path(run_dir))
    spec = specmod.load(run_dir / "spec.json")
    ckpt = ck.find_newest(run_dir, on_warning=on_warning)
    kind = "ema" if use_ema else "model"
    tensors = ckpt.tensors(kind)
    with torch.device("meta"):
        expected = ck.tensor_specs(build(spec.model).state_dict())
    ck.check_fits_spec(ckpt, kind, tensors, expected)  # the check `sample` and `resume` make
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    config = _make_config(spec, run_dir, ckpt, kind, dtype, sum(v.numel() for v in tensors.values()))

    out = Path(out)
    with writing(out, kept=f"{out} is as it was before this command (the partial folder was removed)"), \
            staged_dir(out, overwrite, reading=[run_dir], model_folder=True) as tmp:
        (tmp / MODEL_FILE).write_bytes(save_safetensors(tensors, metadata={
            "format": "pt", "ddpmctl": __version__, "dtype": dtype, "weights": kind, "step": str(ckpt.step)}))
        _write_json(tmp / CONFIG_FILE, config)
        # Load the folder back exactly as `ddpmctl sample` will, and draw the card's grid with it.
        den = load_model_folder(tmp, device=device)
        _draw_grid(den, config["grid"], tmp / GRID_FILE, device)
        diff = None
        if onnx:
            diff = export_onnx(den.model, spec, tmp / ONNX_FILE)
            config["onnx"] = {"file": ONNX_FILE, "dtype": "fp32", "opset": _onnx_opset(tmp / ONNX_FILE),
                              "max_abs_diff": diff, "tolerance": ONNX_ATOL}
            _write_json(tmp / CONFIG_FILE, config)
        source = f"{HF_PREFIX}{repo_id}" if repo_id else str(out)
        (tmp / CARD_FILE).write_text(render_card(config, source, license=license), encoding="utf-8")
        files = _sizes(tmp)
    return ExportResult(str(out), files, dtype, kind, ckpt.step, diff)


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


def _read_eval(run_dir: Path) -> list[dict]:
    """RUN_DIR/eval.jsonl (written by `ddpmctl eval`) -> the last 10 rows {metric, value, pm, step, details}."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return []
    rows: list[dict] = []
    for rec in read_jsonl(path):  # a torn or damaged line is skipped
        rows += _eval_rows(rec)
    return rows[-10:]


def _eval_rows(rec: dict) -> list[dict]:
    step, metrics = rec.get("step"), rec.get("metrics")
    if not isinstance(metrics, dict):  # a flat {"metric": ..., "value": ...} record
        ok = "metric" in rec and isinstance(rec.get("value"), (int, float))
        return [{"metric": str(rec["metric"]), "value": rec["value"], "pm": None, "step": step, "details": ""}] if ok else []
    rows = []
    for name, r in metrics.items():
        if isinstance(r, (int, float)):
            rows.append({"metric": name, "value": r, "pm": None, "step": step, "details": ""})
            continue
        if not isinstance(r, dict):
            continue
        value = r.get("bits_per_dim", r.get("value"))
        if not isinstance(value, (int, float)):
            continue
        split = r.get("split") or (r.get("reference") or {}).get("split")
        if name == "bpd":
            details = f"{_fmt(r.get('n'))} held-out images ({split} split), stride {r.get('stride')}"
        else:
            details = (f"{_fmt(r.get('n'))} samples ({rec.get('sampler')}, {rec.get('steps')} steps) "
                       f"vs the {split} split")
            if r.get("biased_upward"):
                details += "; fewer than 50,000 samples: biased upward"
        rows.append({"metric": name, "value": value, "pm": r.get("sem", r.get("std")), "step": step,
                     "details": details})
    return rows


def _make_config(spec: RunSpec, run_dir: Path, ckpt: ck.Checkpoint, kind: str, dtype: str, n_params: int) -> dict:
    st = ckpt.state
    desc, hub_ids = _dataset_info(spec.data.source)
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
            "lr": spec.optim.lr,
            "warmup_steps": spec.optim.warmup_steps,
            "weight_decay": spec.optim.weight_decay,
            "grad_clip": spec.optim.grad_clip,
            "ema_decay": spec.optim.ema_decay,
            "precision": spec.train.precision,
            "seed": spec.train.seed,
        },
        "evaluation": _read_eval(run_dir),
        "grid": {"file": GRID_FILE, "n": GRID_N, "nrow": GRID_NROW, "seed": GRID_SEED, "sampler": s.sampler,
                 "steps": steps, "eta": how.eta_or_none(s.eta)},
    }


def _draw_grid(den, grid: dict, path: Path, device) -> None:
    from ddpmctl.devices import choose_precision
    from ddpmctl.generate import generate
    from ddpmctl.images import make_grid, save_png

    device = torch.device(device)
    seeds = list(range(grid["seed"], grid["seed"] + grid["n"]))
    imgs = torch.cat([b for _, b, _ in generate(den, seeds, sampler=grid["sampler"], steps=grid["steps"],
                                                eta=grid["eta"] or 0.0, batch_size=grid["n"], device=device,
                                                precision=choose_precision("fp32", device))])
    save_png(path, make_grid(imgs, nrow=grid["nrow"]))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ---------------------------------------------------------------- ONNX
def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UsageError(f"--format onnx needs {' and '.join(missing)}: pip install 'ddpmctl[onnx]'")


def _onnx_opset(path: Path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(model: torch.nn.Module, spec: RunSpec, path: Path, *, atol: float = ONNX_ATOL) -> float:
    """Write the denoiser (x_t float32 (N, C, H, W), t int64 (N,)) -> prediction with a dynamic batch
    axis, then run it with onnxruntime on a batch of another size and compare with PyTorch.

    Returns the max absolute difference; raises when it exceeds atol * max(1, max |PyTorch|).
    """
    _require_onnx()
    import onnxruntime as ort

    model = model.float().cpu().eval()
    c, size, T = spec.model.channels, spec.model.image_size, spec.diffusion.timesteps
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(2, c, size, size, generator=gen), torch.randint(0, T, (2,), generator=gen))
    try:
        _torch_onnx_export(model, example, path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one message
        raise DdpmctlError(f"ONNX export failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})") from None
    x = torch.randn(3, c, size, size, generator=gen)
    t = torch.tensor([0, T // 2, T - 1], dtype=torch.int64)
    with torch.no_grad():
        ref = model(x, t)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = torch.from_numpy(sess.run(None, {names[0]: x.numpy(), names[1]: t.numpy()})[0])
    if got.shape != ref.shape:
        raise DdpmctlError(f"ONNX check failed: output shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    bound = atol * max(1.0, float(ref.abs().max()))
    if not diff <= bound:
        raise DdpmctlError(f"ONNX check failed: onnxruntime differs from PyTorch by {diff:.3g} > {bound:.3g}")
    return diff


def _torch_onnx_export(model: torch.nn.Module, example: tuple, path: Path) -> None:
    """TorchScript exporter first (about 1 s), the dynamo exporter (needs onnxscript) if that fails.
    Both print progress and warnings; the library never prints, so they are swallowed."""
    import contextlib
    import io
    import warnings

    names = {"input_names": ["x_t", "t"], "output_names": ["prediction"]}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, example, str(path), opset_version=17, dynamo=False,
                              dynamic_axes={"x_t": {0: "batch"}, "t": {0: "batch"}, "prediction": {0: "batch"}},
                              **names)
            return
        except Exception:  # noqa: BLE001 - the legacy exporter is deprecated; try the new one
            path.unlink(missing_ok=True)
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(model, example, dynamo=True, verbose=False,
                                 dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, **names)
        prog.save(str(path))


# ---------------------------------------------------------------- model card
def render_card(config: dict, source: str, *, license: str = "mit") -> str:
    """The README.md of a model folder: YAML front matter (huggingface_hub.ModelCardData) + body."""
    from huggingface_hub import ModelCard, ModelCardData

    tr, m, d, g = config["training"], config["model"], config["diffusion"], config["grid"]
    w = config["weights"]
    data = ModelCardData(
        library_name="ddpmctl",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=["ddpmctl", "diffusion", "ddpm", "unconditional-image-generation", "pytorch", "safetensors"],
        datasets=tr.get("hub_datasets") or None,
    )
    title = f"{tr.get('run') or 'ddpmctl model'}"
    size, ch = m["image_size"], m["channels"]
    mult = ", ".join(str(x) for x in m["channel_mult"])
    attn = ", ".join(f"{r}×{r}" for r in m["attention_resolutions"]) or "none"
    cmd = sample_command(source, g)
    lines = [
        f"# {title}",
        "",
        f"An unconditional {size}×{size} {'RGB' if ch == 3 else 'grayscale'} image model: a denoising diffusion "
        "probabilistic model (Ho et al. 2020) trained with [ddpmctl](https://pypi.org/project/ddpmctl/).",
        "",
        f"![{g['n']} samples]({g['file']})",
        "",
        "## Use it",
        "",
        "```bash",
        "pip install ddpmctl",
        cmd,
        f"ddpmctl grid samples/ --out {g['file']}",
        "```",
        "",
        f"`{g['file']}` above is exactly this: images {g['seed']}..{g['seed'] + g['n'] - 1} (image *i* uses seed "
        f"*i*, whatever the batch size), drawn in float32 with the `{g['sampler']}` sampler and laid out "
        f"{g['nrow']} per row. More images: raise `--n`; other samplers: `--sampler {'|'.join(SAMPLERS)}`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | {tr.get('dataset')} |",
        f"| augmentation | {'random horizontal flips' if tr.get('flip') else 'none'} |",
        f"| epochs | {_fmt(tr.get('epochs'))} |",
        f"| optimizer steps | {_fmt(tr.get('steps'))} |",
        f"| images seen | {_fmt(tr.get('images_seen'))} |",
        f"| final loss | {_fmt(tr.get('final_loss'))} ({d['prediction']}-prediction MSE) |",
        f"| batch size | {_fmt(tr.get('batch_size'))} |",
        f"| optimizer | AdamW, lr {_fmt(tr.get('lr'))} after {_fmt(tr.get('warmup_steps'))} warm-up steps, "
        f"weight decay {_fmt(tr.get('weight_decay'))}, gradient clip {_fmt(tr.get('grad_clip'))} |",
        f"| EMA decay | {_fmt(tr.get('ema_decay'))} |",
        f"| preset | {config.get('preset')} |",
    ]
    if tr.get("skipped_steps"):
        lines.append(f"| non-finite steps skipped | {tr['skipped_steps']} |")
    evals = config.get("evaluation") or []
    if evals:
        lines += ["", "## Evaluation", "", "Measured with `ddpmctl eval` (bpd: bits/dim, lower is better; FID and "
                  "KID against the training data, lower is better).", "",
                  "| metric | value | step | details |", "|---|---|---|---|"]
        for e in evals:
            value = _fmt(e["value"]) + (f" ± {_fmt(e['pm'])}" if e.get("pm") is not None else "")
            lines.append(f"| {e['metric']} | {value} | {_fmt(e.get('step'))} | {_fmt(e.get('details') or '')} |")
    lines += [
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| network | U-Net, {m['base_channels']} base channels × ({mult}), {m['num_res_blocks']} residual "
        f"block(s) per level, attention at {attn}, {_fmt(w.get('parameters'))} parameters |",
        f"| diffusion | T = {d['timesteps']}, {d['schedule']} schedule, the network predicts "
        f"{'ε (the noise)' if d['prediction'] == 'eps' else 'v'} |",
        f"| weights | `{w['file']}`: {'EMA' if w['kind'] == 'ema' else 'raw (non-EMA)'} weights in {w['dtype']}, "
        f"from checkpoint {tr.get('checkpoint')} (safetensors: no pickle) |",
        f"| config | `config.json`: the model, diffusion and sample settings (ddpmctl {config['ddpmctl_version']}) |",
    ]
    if config.get("onnx"):
        o = config["onnx"]
        lines.append(f"| ONNX | `{o['file']}`: inputs `x_t` float32 (N, {ch}, {size}, {size}) and `t` int64 (N,) "
                     f"→ `prediction`; float32, opset {o.get('opset')}, dynamic batch; matches PyTorch within "
                     f"{o['max_abs_diff']:.2g} (tolerance {o['tolerance']:g}) |")
    body = "\n".join(lines) + "\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def sample_command(source: str, grid: dict) -> str:
    parts = ["ddpmctl sample", shlex.quote(source), f"--n {grid['n']}", f"--sampler {grid['sampler']}"]
    if grid.get("steps") is not None:
        parts.append(f"--steps {grid['steps']}")
    if grid.get("eta"):
        parts.append(f"--eta {grid['eta']}")
    parts += [f"--seed {grid['seed']}", "--precision fp32", "--out samples/"]
    return " ".join(parts)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


# ---------------------------------------------------------------- loading
def load_model_folder(folder: Path, *, device: torch.device | str = "cpu", source: str | None = None,
                      use_ema: bool = True, on_warning: Warn | None = None):
    """A model folder -> generate.Denoiser (float32 network, full RunSpec: missing sections take defaults)."""
    from ddpmctl.generate import Denoiser

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


# ---------------------------------------------------------------- the Hub
def parse_hf(source: str) -> tuple[str, str | None]:
    """'hf:OWNER/NAME[@REV]' -> (repo_id, revision)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ref = source[len(HF_PREFIX):].lstrip("/")
    repo_id, _, rev = ref.partition("@")
    if not repo_id or (_ and not rev):
        raise UsageError(f"{source!r}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{source!r}: invalid repo id ({str(exc).splitlines()[0]})") from None
    return repo_id, rev or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(source: str) -> Path:
    """hf:OWNER/NAME[@REV] -> a local snapshot folder (huggingface_hub's cache; offline-aware)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, rev = parse_hf(source)
    try:
        with _hub_call(f"downloading {source}", repo_id=repo_id, revision=rev):
            path = huggingface_hub.snapshot_download(
                repo_id, revision=rev, allow_patterns=DOWNLOAD_PATTERNS,
                library_name="ddpmctl", library_version=__version__)
    except LocalEntryNotFoundError:
        if _offline():
            raise NetworkError(f"{source} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                               "downloading it; unset HF_HUB_OFFLINE to fetch it once") from None
        raise NetworkError(f"{source}: cannot reach the Hugging Face Hub and it is not in the local cache") from None
    return Path(path)


def load_hf(source: str, *, device: torch.device | str = "cpu", use_ema: bool = True,
            on_warning: Warn | None = None):
    folder = download(source)
    return load_model_folder(folder, device=device, source=source, use_ema=use_ema, on_warning=on_warning)


@contextmanager
def _hub_call(action: str, *, repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / HTTP / network exceptions into one-line DdpmctlErrors."""
    from huggingface_hub import errors as hfe

    try:
        yield
    except DdpmctlError:
        raise
    except hfe.LocalEntryNotFoundError:
        raise
    except hfe.LocalTokenNotFoundError:
        raise NetworkError(f"{action}: no Hugging Face token; {LOGIN_HELP}") from None
    except hfe.GatedRepoError:
        raise NetworkError(f"{action}: {repo_id} is gated; accept its conditions on the Hub and log in "
                           f"({LOGIN_HELP})") from None
    except hfe.RepositoryNotFoundError:
        raise NetworkError(f"{action}: repository {repo_id} not found (or private: {LOGIN_HELP})") from None
    except hfe.RevisionNotFoundError:
        raise NetworkError(f"{action}: revision {revision!r} not found in {repo_id}") from None
    except hfe.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise NetworkError(f"{action}: the Hugging Face token is invalid or expired (HTTP 401); "
                               f"{LOGIN_HELP}") from None
        if status == 403:
            raise NetworkError(f"{action}: the token may not write to {repo_id} (HTTP 403); use a token with "
                               f"write access to that namespace ({LOGIN_HELP})") from None
        detail = getattr(exc, "server_message", None) or str(exc)
        raise NetworkError(f"{action}: HTTP {status or 'error'}: {_one_line(detail)}") from None
    except hfe.HFValidationError as exc:
        raise UsageError(f"{action}: {_one_line(str(exc))}") from None
    except (OSError, TimeoutError) as exc:
        raise NetworkError(f"{action}: {_one_line(str(exc)) or exc.__class__.__name__}") from None
    except Exception as exc:  # noqa: BLE001 - httpx/requests transport errors have no common public base
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "huggingface_hub"):
            raise NetworkError(f"{action}: network error ({exc.__class__.__name__}: "
                               f"{_one_line(str(exc))})") from None
        raise


def _one_line(text: str) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:300]


def repo_name_for(name: str) -> str:
    """A run or folder name -> a valid Hub repo name ([A-Za-z0-9._-], no '--' or '..', <= 96 chars)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    s = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", s)).strip("-.")[:96].strip("-.")
    return s or "ddpmctl-model"


def _source_name(folder: Path, config: dict | None) -> str:
    run = (config or {}).get("training", {}).get("run")
    return run or folder.resolve().name


def get_token() -> str | None:
    """HF_TOKEN, else huggingface_hub's login cache."""
    import huggingface_hub

    return huggingface_hub.get_token()


def resolve_source(source: Path | None) -> tuple[Path, str]:
    """(path, 'run' | 'folder'); None means the newest run under ./runs."""
    if source is None:
        return ck.newest_run(), "run"
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{path} does not exist (expected a run directory or a model folder)")
    if path.is_dir() and (path / "spec.json").is_file():
        return path, "run"
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return path, "folder"
    if path.is_dir() and any(p.suffix.lower() in PICKLE_SUFFIXES for p in path.iterdir()):
        load_model_folder(path)  # raises the pickle message
    raise UsageError(f"{path} is neither a ddpmctl run directory (spec.json) nor a model folder (config.json + "
                     f"{MODEL_FILE})")


def _stage_folder(folder: Path, dest: Path, repo_id: str) -> None:
    """Copy the uploadable files of a model folder; point the card's sample command at hf:REPO_ID."""
    load_model_folder(folder)  # refuse anything `ddpmctl sample` would refuse
    for p in sorted(folder.iterdir()):
        if p.is_file() and any(p.match(pat) for pat in UPLOAD_PATTERNS):
            shutil.copy2(p, dest / p.name)
    card = dest / CARD_FILE
    if card.is_file():
        try:
            text = card.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{folder / CARD_FILE}: not UTF-8 text; expected the model card (Markdown)") from None
        if "library_name: ddpmctl" in text:
            source = shlex.quote(f"{HF_PREFIX}{repo_id}")
            text = re.sub(r"ddpmctl sample ('[^']*'|\S+)", lambda _: f"ddpmctl sample {source}", text)
            card.write_text(text, encoding="utf-8")


def push(
    source: Path | None,
    *,
    repo_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    dtype: str = "fp32",
    use_ema: bool = True,
    license: str = "mit",
    device: torch.device | str = "cpu",
    on_warning: Warn | None = None,
) -> PushResult:
    """Export (when given a run dir) and upload a model folder to the Hub in one commit.

    Order: check the token and resolve the owner (cheap, fails fast), export into a temporary
    folder, create the repo (exist_ok), create the branch, upload. The temporary folder is removed
    whatever happens, so a failure leaves nothing half-exported. `dry_run` needs no network.
    """
    from huggingface_hub import HfApi, constants

    path, kind = resolve_source(source)
    config = None
    if kind == "folder":
        config = read_model_config(path)
    name = repo_name_for(_source_name(path, config))
    if repo_id is not None:
        _check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise UsageError("--revision must not be empty")

    api = None
    owner_resolved = True
    if dry_run:
        if repo_id is None:
            owner_resolved = False
            repo_id = f"<token-owner>/{name}"
    else:
        if _offline():
            raise NetworkError("hub-push needs the network but HF_HUB_OFFLINE=1 is set; unset it "
                               "(or use --dry-run)")
        with _hub_call("reading the Hugging Face token"):
            token = get_token()
        if not token:
            raise NetworkError(f"no Hugging Face token found; {LOGIN_HELP}")
        api = HfApi(token=token)
        with _hub_call("checking the Hugging Face token"):  # fails fast, before any export
            who = api.whoami()
        if repo_id is None:
            owner = who.get("name") if isinstance(who, dict) else None
            if not owner:
                raise NetworkError("could not tell the token's user name from the Hub; pass --repo-id OWNER/NAME")
            repo_id = f"{owner}/{name}"

    with tempfile.TemporaryDirectory(prefix="ddpmctl-push-") as tmpdir:
        staged = Path(tmpdir) / "model"
        if kind == "run":
            export_model_folder(path, staged, dtype=dtype, use_ema=use_ema, repo_id=repo_id,
                                license=license, device=device, on_warning=on_warning)
        else:
            staged.mkdir()
            _stage_folder(path, staged, repo_id)
        files = _sizes(staged)
        card = (staged / CARD_FILE).read_text(encoding="utf-8") if (staged / CARD_FILE).is_file() else ""
        url = f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision else "")
        result = PushResult(repo_id, url if owner_resolved else None, files, card, dry_run, revision,
                            owner_resolved=owner_resolved, exported_from=str(path) if kind == "run" else None)
        if dry_run:
            return result
        assert api is not None
        with _hub_call(f"creating {repo_id}", repo_id=repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            with _hub_call(f"creating branch {revision} of {repo_id}", repo_id=repo_id, revision=revision):
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload {name} (ddpmctl {__version__})"
        with _hub_call(f"uploading to {repo_id}", repo_id=repo_id, revision=revision):
            info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model",
                                     revision=revision, commit_message=message)
        result.commit_url = getattr(info, "commit_url", None)
        return result


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UsageError(f"--repo-id {repo_id!r}: expected OWNER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"--repo-id {repo_id!r}: {_one_line(str(exc))}") from None
