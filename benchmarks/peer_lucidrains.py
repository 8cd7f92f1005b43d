"""ddpmctl against lucidrains' denoising-diffusion-pytorch, side by side: same process, same device,
same batch and precision.

The peer runs its own Trainer's step (denoising_diffusion_pytorch.Trainer.train: GaussianDiffusion's
loss under autocast, backward, gradient clipping at 1.0, Adam, ema_pytorch.EMA updated every step
(it averages every 10th), the per-step ``loss.item()`` of its progress bar) on device-resident data,
and its sampler's step (GaussianDiffusion.p_sample: the network, x0 clipping, the posterior draw),
one after the other for N steps. ddpmctl runs `ddpmctl bench` (ddpmctl.bench.run's pieces), i.e. the
training step and sampler that `train` and `sample` run. The timing, windows and interleaving are
benchmarks/peer_diffusers.py's.

    cifar10  vs Unet(dim=64, dim_mults=(1, 2, 4, 8)), the README's configuration (35.7M parameters)
    celeba   vs the same Unet at 64x64 (ddpmctl's celeba network is 78.6M: compare TFLOP/s as well)
    mnist    vs Unet(dim=64, dim_mults=(1, 2, 3), channels=1) (7.3M parameters, the mnist preset 7.0M;
             the architectures differ, so the FLOPs do: compare achieved TFLOP/s as well)

lucidrains' package is a benchmark extra (`pip install -e '.[bench]'`), never a runtime dependency.

    python benchmarks/peer_lucidrains.py --preset mnist --device cpu --batch-size 16 --sample-batch-size 32 \\
        --steps 2 --warmup 1 --repeats 5 --sample-steps 3
    python benchmarks/peer_lucidrains.py --preset cifar10 --json-out lucidrains_cifar10.json   # auto device
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_diffusers as peer  # noqa: E402 - the shared timing harness

from ddpmctl import bench  # noqa: E402
from ddpmctl.devices import describe, set_fast_math  # noqa: E402

LUCIDRAINS_MODELS = {
    "cifar10": dict(dim=64, dim_mults=(1, 2, 4, 8), channels=3, image_size=32),
    "celeba": dict(dim=64, dim_mults=(1, 2, 4, 8), channels=3, image_size=64),
    "mnist": dict(dim=64, dim_mults=(1, 2, 3), channels=1, image_size=28),
}


def _diffusion(cfg: dict, device: torch.device):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    unet = Unet(dim=cfg["dim"], dim_mults=cfg["dim_mults"], channels=cfg["channels"])
    return GaussianDiffusion(unet, image_size=cfg["image_size"], timesteps=1000).to(device)


def lucidrains_flops(cfg: dict) -> dict[str, int]:
    from denoising_diffusion_pytorch import Unet

    return peer.network_flops(lambda: Unet(dim=cfg["dim"], dim_mults=cfg["dim_mults"], channels=cfg["channels"]),
                              cfg["channels"], cfg["image_size"])


def lucidrains_train_step(cfg: dict, device: torch.device, batch: int, *, bf16: bool):
    """Trainer.train's inner step, accelerate's autocast written out, on device-resident data."""
    from ema_pytorch import EMA

    torch.manual_seed(0)
    diffusion = _diffusion(cfg, device)
    diffusion.train()
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10).to(device)
    size, ch = cfg["image_size"], cfg["channels"]
    images = bench.synthetic_images(4 * batch, ch, size).to(device)
    state = {"i": 0}

    def one_step() -> None:
        i = state["i"] % 4
        data = images[i * batch:(i + 1) * batch].float().div(255.0)  # the Dataset's ToTensor: [0, 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion(data)
        total = loss.item()  # noqa: F841 - the progress bar reads the loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()
        state["i"] += 1

    return one_step


def lucidrains_sampler(cfg: dict, device: torch.device, batch: int, *, bf16: bool):
    """GaussianDiffusion.p_sample_loop's step (random weights), under autocast when the run is bf16."""
    torch.manual_seed(0)
    diffusion = _diffusion(cfg, device)
    with torch.no_grad():
        for p in diffusion.model.parameters():
            p.normal_(0.0, 0.02)
    diffusion.eval()
    shape = (batch, cfg["channels"], cfg["image_size"], cfg["image_size"])

    @torch.no_grad()
    def run(n: int) -> None:
        img = torch.randn(shape, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for t in range(999, 999 - n, -1):
                img, _x_start = diffusion.p_sample(img, t)

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", choices=sorted(LUCIDRAINS_MODELS))
    peer.add_common_args(p)
    p.add_argument("--lucidrains-precision", default=None, choices=["fp32", "bf16"],
                   help="the peer's precision when it should differ, e.g. fp32 (its Trainer's default, amp=False) "
                        "against ddpmctl's auto: defaults against defaults")
    args = p.parse_args()

    run = peer.resolve_run(args, args.lucidrains_precision)
    device, spec, prec, bf16, batch = run.device, run.spec, run.prec, run.bf16, run.batch
    sample_batch, interleave, ours_flops, n_params = run.sample_batch, run.interleave, run.ours_flops, run.n_params
    cfg = LUCIDRAINS_MODELS[args.preset]
    theirs_flops = lucidrains_flops(cfg)
    version = importlib.metadata.version("denoising_diffusion_pytorch")
    t0 = time.perf_counter()
    with bench._restore_global_state():
        set_fast_math(device, device.type == "cpu")
        train_builders = {
            "ddpmctl": lambda: bench.ddpmctl_train_step(spec, device, prec, compile_mode=args.compile,
                                                        emit=peer.emit)[:2],
            "lucidrains": lambda: (lucidrains_train_step(cfg, device, batch, bf16=bf16), None),
        }
        peer.log(f"== training, batch {batch}")
        tr = peer.compare_train(train_builders, batch, device, args, interleave)
        sample_builders = {
            "ddpmctl": lambda: bench.ddpmctl_sampler(spec, device, prec, sample_batch, compile_mode=args.compile,
                                                     emit=peer.emit),
            "lucidrains": lambda: lucidrains_sampler(cfg, device, sample_batch, bf16=bf16),
        }
        peer.log(f"== sampling, batch {sample_batch} ({time.perf_counter() - t0:.0f}s so far)")
        sm = peer.compare_sample(sample_builders, sample_batch, device, args, interleave)
    flops = {"ddpmctl": ours_flops, "lucidrains": theirs_flops}
    params = {"ddpmctl": n_params, "lucidrains": theirs_flops["parameters"]}
    res: dict = {"preset": args.preset, "device": describe(device), "torch": torch.__version__,
                 "denoising_diffusion_pytorch": version, "precision": prec.name,
                 "lucidrains_precision": "bf16" if bf16 else "fp32", "interleaved": interleave,
                 "batch_size": batch, "sample_batch_size": sample_batch, "seconds": time.perf_counter() - t0}
    for name in ("ddpmctl", "lucidrains"):
        res[name] = {
            "parameters": params[name], "flops_per_image_train": flops[name]["train"],
            "flops_per_image_forward": flops[name]["forward"],
            "train_images_per_s": tr[name]["images_per_s"], "train_images_per_s_best": tr[name]["best"]
            if "best" in tr[name] else max(tr[name]["repeats"]),
            "train_tflops": tr[name]["images_per_s"] * flops[name]["train"] / 1e12,
            "sample_ms_per_step": sm[name]["ms_per_step"],
            "sample_images_per_s_1000_steps": sm[name]["images_per_s_1000_steps"],
            "sample_tflops": sample_batch * flops[name]["forward"] / (sm[name]["ms_per_step"] * 1e-3) / 1e12,
        }
    o, t = res["ddpmctl"], res["lucidrains"]
    rows = [("parameters (M)", o["parameters"] / 1e6, t["parameters"] / 1e6, None),
            ("GFLOP/image train", o["flops_per_image_train"] / 1e9, t["flops_per_image_train"] / 1e9, None),
            (f"train images/s (batch {batch})", o["train_images_per_s"], t["train_images_per_s"],
             o["train_images_per_s"] / t["train_images_per_s"]),
            ("train images/s, best window", o["train_images_per_s_best"], t["train_images_per_s_best"],
             o["train_images_per_s_best"] / t["train_images_per_s_best"]),
            ("train TFLOP/s", o["train_tflops"], t["train_tflops"], o["train_tflops"] / t["train_tflops"]),
            (f"sample ms/step (batch {sample_batch})", o["sample_ms_per_step"], t["sample_ms_per_step"], None),
            ("sample images/s, 1000-step DDPM", o["sample_images_per_s_1000_steps"],
             t["sample_images_per_s_1000_steps"], t["sample_ms_per_step"] / o["sample_ms_per_step"]),
            ("sample TFLOP/s", o["sample_tflops"], t["sample_tflops"], o["sample_tflops"] / t["sample_tflops"])]
    res["ratios"] = {a: r for a, _, _, r in rows if r is not None}
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1, default=str))
    print(f"{args.preset} on {res['device']}, torch {torch.__version__}, denoising-diffusion-pytorch {version}, "
          f"{prec.name}" + ("" if res["lucidrains_precision"] == prec.name else
                            f" (lucidrains {res['lucidrains_precision']})"))
    print(f"{'':34}  {'ddpmctl':>10}  {'lucidrains':>10}  {'ratio':>7}")
    for a, b, c, r in rows:
        print(f"{a:34}  {b:10.3g}  {c:10.3g}  {'' if r is None else f'{r:.2f}x':>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
