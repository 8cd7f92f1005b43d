"""Do the fast paths compute the same function? fp32 eager reference vs what train/sample run.

    python benchmarks/check_fast_paths.py --device cuda --preset shapes --json-out fast_paths.json

Network (random weights, fresh random inputs): the sampling function as `sample` builds it (bf16
weights, channels_last, CUDA graph; compiled and not) against the fp32 eager model with TF32 off,
as ||out - ref|| / ||ref||; a second input through the same graph checks that replays see new
inputs. Training: one step of the compiled and of the eager model from the same weights and batch;
the losses and the updated weights compared. Sampling: 20 DDPM steps with the fast function vs
the fp32 reference. bf16 results land around 1e-3..1e-2; fp32 far under 1e-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ddpmctl import bench
from ddpmctl.devices import choose_device, choose_precision
from ddpmctl.diffusion import Schedule
from ddpmctl.samplers import ddpm_sample, per_image_generators, randn_per_image
from ddpmctl.engine import make_sample_fn, setup_training
from ddpmctl.unet import build


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also check the compiled paths (default: on CUDA)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()
    dev = choose_device(args.device)
    prec = choose_precision("auto", dev)
    do_compile = dev.type == "cuda" if args.compile is None else args.compile
    spec = bench.resolve_spec(args.preset, dev, args.batch, "auto")
    m = spec.model
    shape = (m.channels, m.image_size, m.image_size)
    res: dict = {"device": str(dev), "preset": args.preset, "precision": prec.name, "torch": torch.__version__}
    t_start = time.perf_counter()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    net = build(m)
    with torch.no_grad():
        for q in net.parameters():
            q.normal_(0.0, 0.05)
    net = net.to(dev).eval()
    x1, x2 = (torch.randn(args.batch, *shape, device=dev) for _ in range(2))
    t1, t2 = (torch.randint(0, spec.diffusion.timesteps, (args.batch,), device=dev) for _ in range(2))
    with torch.no_grad():
        ref1, ref2 = net(x1, t1).float(), net(x2, t2).float()
    variants = {"sample_fn": dict(compile=False)}
    if do_compile:
        variants["sample_fn_compiled"] = dict(compile=True)
    for name, kw in variants.items():
        warnings: list[str] = []
        fn = make_sample_fn(net, prec, dev, emit=lambda e: warnings.append(e.get("message", "")), **kw)
        with torch.no_grad():
            y1 = fn(x1, t1)
            y2 = fn(x2, t2)  # a replay with new inputs
            y1b = fn(x1, t1)
        res[name] = {"rel_err": rel(y1, ref1), "rel_err_second_input": rel(y2, ref2),
                     "replay_repeatable": rel(y1b, y1), "warnings": warnings}

    # 20 DDPM steps, fast function vs fp32 reference, same seeds.
    sched = Schedule.create("cosine", 20).to(dev)

    def ddpm(fn):
        gens = per_image_generators(range(args.batch), dev)
        return ddpm_sample(fn, sched, randn_per_image(gens, shape, dev), gens, prediction=spec.diffusion.prediction)

    with torch.no_grad():
        ref_x = ddpm(lambda x, t, cond=None: net(x, t, cond).float())
        res["ddpm_20_steps_rel_err"] = rel(ddpm(make_sample_fn(net, prec, dev, compile=False)), ref_x)

    # One training step: compiled vs eager forward, same weights, batch and noise.
    if do_compile:
        outs = {}
        for name, mode in (("eager", False), ("compiled", True)):
            torch.manual_seed(1)
            tr = setup_training(spec, dev, prec, compile_mode=mode)
            tr.model.load_state_dict(net.state_dict())
            for g in tr.opt.param_groups:  # fresh optimizer state for the loaded weights
                g["lr"] = 1e-3
            g0 = torch.Generator(device=dev).manual_seed(2)
            x0 = torch.rand(args.batch, *shape, device=dev, generator=g0) * 2 - 1
            t = torch.randint(0, spec.diffusion.timesteps, (args.batch,), device=dev, generator=g0)
            noise = torch.randn(x0.shape, device=dev, generator=g0)
            tr.model.eval()  # dropout draws differ between eager and compiled code: compare without
            loss, gnorm, finite = tr.step(x0, t, noise, 1e-3)
            outs[name] = (float(loss), float(gnorm), bool(finite),
                          torch.cat([q.detach().float().flatten() for q in tr.model.parameters()]),
                          getattr(tr.forward, "failed", None))
        e, c = outs["eager"], outs["compiled"]
        res["train_step"] = {"loss_eager": e[0], "loss_compiled": c[0], "loss_rel_diff": abs(e[0] - c[0]) / abs(e[0]),
                             "grad_norm_eager": e[1], "grad_norm_compiled": c[1],
                             "grad_norm_rel_diff": abs(e[1] - c[1]) / abs(e[1]),
                             "weights_rel_diff": rel(c[3], e[3]), "finite": e[2] and c[2], "compile_failed": c[4]}
    res["seconds"] = time.perf_counter() - t_start
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
