"""The model card: the README.md of a model folder (YAML front matter for the Hub, training facts,
the evaluation rows of the run's eval.jsonl (read by ddpmctl.rundir), the sample grid and the exact `ddpmctl sample`
command that draws it). It renders a model folder's config.json; it reads no weights and makes no
network call (``huggingface_hub.ModelCard`` only formats the front matter).
"""

from __future__ import annotations

import shlex
from typing import Any

from ddpmctl.sampler_registry import SAMPLERS


def eval_rows(records: list[dict]) -> list[dict]:
    """The records of a run's eval.jsonl (ddpmctl.rundir.read_eval_log) -> the last 10 rows
    {metric, value, pm, step, details} of the card's evaluation table."""
    rows: list[dict] = []
    for rec in records:
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


def render_card(config: dict, source: str, *, license: str = "mit", fmt: str = "ddpmctl") -> str:
    """The README.md of a model folder: YAML front matter (huggingface_hub.ModelCardData) + body.
    ``fmt``: "ddpmctl" (a ddpmctl model folder) or "diffusers" (a DDPMPipeline folder)."""
    from huggingface_hub import ModelCard, ModelCardData

    tr, m, d, g = config["training"], config["model"], config["diffusion"], config["grid"]
    w = config["weights"]
    diffusers = fmt == "diffusers"
    tags = ["ddpmctl", "diffusion", "ddpm", "unconditional-image-generation", "pytorch", "safetensors"]
    data = ModelCardData(
        library_name="diffusers" if diffusers else "ddpmctl",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=(tags + ["diffusers", "diffusers:DDPMPipeline"] if diffusers else tags)
        + (["class-conditional", "classifier-free-guidance"] if m.get("conditional") else []),
        datasets=tr.get("hub_datasets") or None,
    )
    conv = tr.get("converted_from")  # a diffusers folder exported in ddpmctl's format
    kind_label = {"ema": "EMA", "model": "raw (non-EMA)"}.get(w["kind"], "the source's")
    title = f"{tr.get('run') or (conv.removeprefix('hf:') if conv else 'ddpmctl model')}"
    size, ch = m["image_size"], m["channels"]
    mult = ", ".join(str(x) for x in m["channel_mult"])
    attn = ", ".join(f"{r}×{r}" for r in m["attention_resolutions"]) or "none"
    cmd = sample_command(source, g)
    classes = list(m.get("classes") or []) if m.get("conditional") else []
    kind = (f"A class-conditional (classifier-free guidance, Ho & Salimans 2022) {size}×{size}" if classes
            else f"An unconditional {size}×{size}")
    lines = [
        f"# {title}",
        "",
        f"{kind} {'RGB' if ch == 3 else 'grayscale'} image model: a denoising diffusion "
        f"probabilistic model (Ho et al. 2020) "
        + (f"converted from the diffusers folder `{conv}` by ddpmctl {config['ddpmctl_version']}" if conv else
           f"trained with ddpmctl {config['ddpmctl_version']}")
        + ", a command-line tool that is installed from its source repository (it is not on PyPI yet).",
        "",
        f"![{g['n']} samples]({g['file']})",
        "",
        "## Use it",
        "",
        "```bash",
        "pipx install .        # in a checkout of the ddpmctl repository; or: pip install .",
        cmd,
        f"ddpmctl grid samples/ --out {g['file']}",
        *([f"{cmd} --class {shlex.quote(classes[0])} --guidance {config['sample'].get('guidance', 0.0):g}"]
          if classes else []),
        "```",
        *(["", f"Classes ({len(classes)}, `--class NAME`, an index, or `all`): "
           + ", ".join(f"`{c}`" for c in classes[:100]) + (" …" if len(classes) > 100 else "")
           + ". Without `--class` the model draws unconditionally (its null class)."] if classes else []),
        "",
        f"`{g['file']}` above is exactly this: images {g['seed']}..{g['seed'] + g['n'] - 1} (image *i* uses seed "
        f"*i*, whatever the batch size), drawn in float32 with the `{g['sampler']}` sampler and laid out "
        f"{g['nrow']} per row. More images: raise `--n`; other samplers: `--sampler {'|'.join(SAMPLERS)}`.",
        "",
        *(_diffusers_use(d, source) if diffusers else
          ["This folder is in ddpmctl's format; `ddpmctl export RUN --format diffusers` writes the same weights "
           "as a diffusers `DDPMPipeline` folder (docs/hub.md says which networks have a diffusers equivalent).",
           ""]),
        "## Training",
        "",
    ]
    if conv:
        lines.append(f"See `{conv}`: this folder holds its weights ({w['dtype']}), mapped onto ddpmctl's network "
                     "exactly (docs/diffusers.md in the ddpmctl repository).")
    else:
        lines += [
            "| | |",
            "|---|---|",
            f"| dataset | {tr.get('dataset')} |",
            f"| augmentation | {'random horizontal flips' if tr.get('flip') else 'none'} |",
            f"| epochs | {_fmt(tr.get('epochs'))} |",
            f"| optimizer steps | {_fmt(tr.get('steps'))} |",
            f"| images seen | {_fmt(tr.get('images_seen'))} |",
            f"| final loss | {_fmt(tr.get('final_loss'))} ({d['prediction']}-prediction MSE"
            f"{', min-SNR-' + _fmt(d.get('min_snr_gamma')) + ' weighted' if d.get('loss_weighting') == 'min-snr' else ''}) |",
            f"| batch size | {_fmt(tr.get('batch_size'))} |",
            f"| optimizer | {tr.get('optimizer', 'AdamW')}, lr {_fmt(tr.get('lr'))} after "
            f"{_fmt(tr.get('warmup_steps'))} warm-up steps, "
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
        f"| weights | `{w['file']}`: {kind_label} weights in {w['dtype']}, "
        f"from checkpoint {tr.get('checkpoint')} (safetensors: no pickle) |",
        (f"| config | `unet/config.json` (UNet2DModel) and `scheduler/scheduler_config.json` (DDPMScheduler), "
         f"written by ddpmctl {config['ddpmctl_version']} |" if diffusers else
         f"| config | `config.json`: the model, diffusion and sample settings (ddpmctl {config['ddpmctl_version']}) |"),
    ]
    if config.get("onnx"):
        o = config["onnx"]
        lines.append(f"| ONNX | `{o['file']}`: inputs `x_t` float32 (N, {ch}, {size}, {size}) and `t` int64 (N,) "
                     f"→ `prediction`; float32, opset {o.get('opset')}, dynamic batch; matches PyTorch within "
                     f"{o['max_abs_diff']:.2g} (tolerance {o['tolerance']:g}) |")
    body = "\n".join(lines) + "\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card)


def _diffusers_use(d: dict, source: str) -> list[str]:
    """The card's diffusers section: loading the folder with diffusers, and where its samplers differ."""
    return [
        "### With diffusers",
        "",
        "This is a diffusers `DDPMPipeline` folder (`model_index.json`, `unet/`, `scheduler/`); ddpmctl reads it "
        "too (the ddpmctl format, `ddpmctl export RUN`, is the other one ddpmctl writes).",
        "",
        "```python",
        "from diffusers import DDIMScheduler, DDPMPipeline",
        "",
        f"pipe = DDPMPipeline.from_pretrained({source.removeprefix('hf:')!r})",
        f"images = pipe(batch_size=4, num_inference_steps={d['timesteps']}).images  # DDPM: all T steps",
        "# DDIM from t = T - 1, as ddpmctl's DDIM starts:",
        'pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")',
        "images = pipe(batch_size=4, num_inference_steps=50).images",
        "```",
        "",
        f"DDPM over all T = {d['timesteps']} steps is the same process in both (same betas, "
        f"{'ε' if d['prediction'] == 'eps' else 'v'}-prediction, x0 clipped to [-1, 1], σ² = β̃). With fewer "
        "steps the timesteps differ: diffusers' default spacing (\"leading\") visits t = T - T/steps, ..., 0 and "
        "never t = T - 1; \"trailing\" visits T - 1, T - 1 - T/steps, ..., T/steps - 1; ddpmctl's DDIM visits "
        "round((T - 1)(1 - i/(steps - 1))), from T - 1 down to 0 (diffusers' \"linspace\" evaluates the network "
        "there but its DDIM update steps to t - T/steps, not to the next of them), and its DPM-Solver++ spaces "
        "steps evenly in log-SNR. So a few-step diffusers DDIM is close to ddpmctl's, not equal; `ddpmctl "
        "sample` follows ddpmctl's.",
        "",
    ]


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
