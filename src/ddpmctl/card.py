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
        f"probabilistic model (Ho et al. 2020) trained with ddpmctl {config['ddpmctl_version']}, a command-line "
        "tool that is installed from its source repository (it is not on PyPI yet).",
        "",
        f"![{g['n']} samples]({g['file']})",
        "",
        "## Use it",
        "",
        "```bash",
        "pipx install .        # in a checkout of the ddpmctl repository; or: pip install .",
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
