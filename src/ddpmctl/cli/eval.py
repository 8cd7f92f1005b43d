"""`ddpmctl eval`: bits/dim, FID and KID of a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape

from ddpmctl.cli.common import DeviceOpt, JsonOpt, QuietOpt, SamplerOpt, app, command_device, info, print_json, warn

def _n(x: int) -> str:
    return f"{x:,}"


def human_lines(record: dict) -> list[str]:
    """One line per metric, each with its sample count."""
    m, lines = record["metrics"], []
    if "bpd" in m:
        b = m["bpd"]
        t = b["terms"]
        sem = f" ± {b['sem']:.4f}" if b["sem"] is not None else ""
        how = "every t" if b["exact"] else (f"--stride {b['stride']}: {_n(b['network_evaluations_per_image'])} of "
                                            f"{_n(b['timesteps'])} t per image, stratified, noisier")
        lines.append(f"bits/dim {b['bits_per_dim']:.4f}{sem} (n={_n(b['n'])} {b['split']} images; "
                     f"prior {t['prior']:.4f} + KL {t['kl']:.4f} + decoder {t['decoder']:.4f}; {how})")
    if "fid" in m:
        f = m["fid"]
        bias = "; fewer than 50,000 samples: biased upward" if f["biased_upward"] else ""
        lines.append(f"FID {f['value']:.2f} (n={_n(f['n'])}{bias}; reference: {_n(f['reference']['n'])} "
                     f"{f['reference']['split']} images)")
    if "kid" in m:
        k = m["kid"]
        lines.append(f"KID {k['value']:.5f} ± {k['std']:.5f} (n={_n(k['n'])}; {k['subsets']} subsets of "
                     f"{_n(k['subset_size'])}; reference: {_n(k['reference']['n'])} {k['reference']['split']} images)")
    for name, fmt in (("fid", ".2f"), ("kid", ".5f")):
        if m.get(name, {}).get("per_class"):
            lines.append(f"{name.upper()} per class: " + ", ".join(f"{c} {v:{fmt}}"
                                                                  for c, v in m[name]["per_class"].items()))
    if "sampler" in record:
        guided = f", classes in turn, guidance {record['guidance']:g}" if record.get("guidance") is not None else ""
        lines.append(f"samples: {record['sampler']}, {record['steps']} steps, seeds {record['seed']}.."
                     f"{record['seed'] + record['n_samples'] - 1}{guided}")
    return lines


@app.command("eval", epilog="Examples:\n\n  ddpmctl eval runs/shapes-20261126-101500   (bits/dim, the default)\n\n"
                            "  ddpmctl eval runs/cifar --data cifar10 --metric fid,kid --n 50000 --sampler ddim "
                            "--steps 50\n\n"
                            "  ddpmctl eval runs/x --metric bpd --stride 10 --n 1000 --json\n\n"
                            "  ddpmctl eval runs/x --metric fid --inception-weights ~/weights-inception.safetensors")
def eval_cmd(
    source: Annotated[Optional[str], typer.Argument(help="Run directory, model folder, diffusers folder or hf:OWNER/NAME (default: the newest run "
                                                                 "under ./runs).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Dataset to compare with (default: the run's training "
                                                     "data).")] = None,
    split: Annotated[Optional[Literal["train", "test"]], typer.Option(
        help="Split to use (default: test for bpd, train for fid/kid, as in Ho et al.).")] = None,
    metric: Annotated[str, typer.Option(help="Comma-separated: bpd, fid, kid. bpd runs on every install; fid and "
                                             "kid need the optional [eval] extra (torch-fidelity's Inception-v3; "
                                             "pip install '.[eval]', or with pipx: pipx inject ddpmctl torch-fidelity).")] = "bpd",
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="bpd: held-out images (default: the whole split); "
                                                                "fid/kid: generated samples (default 50,000).")]
    = None,
    sampler: SamplerOpt = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="fid/kid denoising steps (default: the run's "
                                                             "sample.steps for its sampler, else the sampler's usual number).")] = None,
    eta: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="eta where the sampler takes one (0 deterministic, "
                                                 "1 stochastic; default: the run's sample.eta for its sampler, else 0).")] = None,
    variance: Annotated[Literal["beta_tilde", "beta"], typer.Option(help="DDPM sigma^2: beta_tilde or beta.")]
    = "beta_tilde",
    guidance: Annotated[Optional[float], typer.Option(min=0.0, help="Conditional models, fid/kid: classifier-free "
                                                      "guidance weight (default: the run's sample.guidance); sample i "
                                                      "is of class i mod K and FID/KID are reported per class "
                                                      "too.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Sample i uses seed SEED + i; also seeds the bpd noise.")] = 0,
    stride: Annotated[int, typer.Option(min=1, help="bpd: t = 0..STRIDE exactly, then one random t per block of "
                                                    "STRIDE steps (faster, noisier; 1 = every t).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    kid_subsets: Annotated[int, typer.Option(min=1, help="KID: number of random subsets.")] = 100,
    kid_subset_size: Annotated[int, typer.Option(min=2, help="KID: subset size (capped at the sample "
                                                             "count).")] = 1000,
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="Inception-v3 FID weights (.safetensors or .pth state dict) for offline use; default: "
             "torch-fidelity's, downloaded once into the torch hub cache.")] = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option(help="Sampling precision: auto | fp32 | bf16 | fp16 (bpd is always "
                                                "fp32).")] = "auto",
    data_root: Annotated[Optional[Path], typer.Option(help="Prepared-data root (default $DDPMCTL_DATA or the "
                                                           "per-user data dir).")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not append to RUN_DIR/eval.jsonl.")] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure bits/dim (held-out likelihood bound; the default), FID and KID; append the result to
    RUN_DIR/eval.jsonl."""
    from ddpmctl.evaluate import EvalOptions, evaluate, parse_metrics

    opts = EvalOptions(metrics=parse_metrics(metric), data=data, split=split, n=n, sampler=sampler, steps=steps,
                       eta=eta, guidance=guidance, variance=variance, seed=seed, batch_size=batch_size, stride=stride,
                       kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, inception_weights=inception_weights,
                       device=command_device(device), precision=precision, use_ema=not no_ema, data_root=data_root,
                       log=not no_log)
    from ddpmctl.cli.progress import ProgressView

    with ProgressView(quiet) as progress:
        record = evaluate(source, opts, on_event=progress)
    if "bpd" in record["metrics"] and not record["metrics"]["bpd"]["exact"]:
        warn(escape(record["metrics"]["bpd"]["note"]))
    if "log" in record:
        info(escape(f"appended to {record['log']} ({record['seconds']:.1f}s)"))
    if as_json:
        print_json(record)
    else:
        for line in human_lines(record):
            print(line)
