"""ddpmctl against diffusers, side by side: same process, same device, same batch and precision.

For each preset the matching diffusers model runs its own example's training step
(examples/unconditional_image_generation/train_unconditional.py: add_noise, MSE, AdamW, gradient
clipping, EMAModel, the per-step ``loss.item()`` of its progress bar) and its DDPMPipeline sampling
loop (UNet2DModel + DDPMScheduler.step); ddpmctl runs `ddpmctl bench` (ddpmctl.bench.run), i.e. the
training step and sampler that `train` and `sample` run.

    cifar10  vs google/ddpm-cifar10-32's UNet2DModel (35.7M parameters, Ho et al.'s network)
    celeba   vs the diffusers example's 64x64 UNet2DModel (113.7M parameters; ddpmctl's is 78.6M,
             so compare achieved TFLOP/s as well as images/s)
    mnist    vs a UNet2DModel built like the mnist preset (28x28x1, 64-128-128 channels, attention at
             7x7, scale-shift time conditioning, dropout 0.1: 6.9M parameters, the same FLOPs)

"diffusers-tuned" is the example step plus channels_last and fused AdamW (CUDA only). Data is
resident on the device for every contestant. diffusers is a benchmark extra
(`pip install -e '.[bench]'`), never a runtime dependency of ddpmctl.

    python benchmarks/peer_diffusers.py --preset cifar10                     # auto device
    python benchmarks/peer_diffusers.py --preset mnist --device cpu --batch-size 16 --sample-batch-size 16
    python benchmarks/peer_diffusers.py --preset celeba --json-out celeba.json

Prints a table with both and the ratios (ddpmctl / diffusers; for sampling, images/s ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpmctl import bench
from ddpmctl.devices import choose_device, choose_precision, describe, set_fast_math
from ddpmctl.engine import compile_wanted
from ddpmctl.unet import build, count_parameters

DIFFUSERS_MODELS = {
    # google/ddpm-cifar10-32 config.json
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
                    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6,
                    norm_num_groups=32, time_embedding_type="positional"),
    # train_unconditional.py's model at --resolution 64
    "celeba": dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                   block_out_channels=(128, 128, 256, 256, 512, 512),
                   down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                     "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")),
    # the mnist preset's network built from diffusers blocks
    "mnist": dict(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(64, 128, 128),
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=64,
                  norm_num_groups=32, dropout=0.1, resnet_time_scale_shift="scale_shift"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(e: dict) -> None:
    if e.get("message"):
        log(("warning: " if e.get("event") == "warning" else "  ") + e["message"])


def network_flops(make_net, channels: int, size: int, output=lambda y: y) -> dict[str, int]:
    """FLOPs per image of a peer's network (built by ``make_net`` on the meta device) for the training
    loss's forward + backward and for one forward pass, as bench counts ddpmctl's; and its parameters."""
    n = 2
    with torch.device("meta"):
        net = make_net()
        x = torch.empty(n, channels, size, size)
        t = torch.zeros(n, dtype=torch.long)

    def train() -> None:
        F.mse_loss(output(net(x, t)).float(), x.float()).backward()

    def forward() -> None:
        with torch.no_grad():
            net(x, t)

    return {"train": bench.count_flops(train) // n, "forward": bench.count_flops(forward) // n,
            "parameters": sum(p.numel() for p in net.parameters())}


def diffusers_flops(cfg: dict) -> dict[str, int]:
    from diffusers import UNet2DModel

    return network_flops(lambda: UNet2DModel(**cfg), cfg["in_channels"], cfg["sample_size"],
                         output=lambda y: y.sample)


def diffusers_train_step(cfg: dict, device: torch.device, batch: int, *, tuned: bool, bf16: bool):
    """train_unconditional.py's step (accelerate's bf16 autocast written out) on device-resident data."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = UNet2DModel(**cfg).to(device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8,
                                  fused=tuned or None)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=100_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    ema.to(device)
    size, ch = cfg["sample_size"], cfg["in_channels"]
    images = bench.synthetic_images(4 * batch, ch, size).to(device)
    autocast = bf16
    state = {"i": 0, "loss": 0.0}

    def one_step() -> None:
        i = state["i"] % 4
        clean = images[i * batch:(i + 1) * batch].float().div(127.5).sub(1.0)
        if tuned:
            clean = clean.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(clean.shape, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(noisy, timesteps).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        state["loss"] = loss.detach().item()  # the example's progress bar reads the loss every step
        state["i"] += 1

    return one_step


def diffusers_sampler(cfg: dict, device: torch.device, batch: int, *, bf16: bool):
    """DDPMPipeline's loop: unet(image, t).sample then DDPMScheduler.step, bf16 weights when the run
    is bf16 (as from_pretrained(..., torch_dtype=torch.bfloat16)), fp32 otherwise."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    dtype = torch.bfloat16 if bf16 else torch.float32
    unet = unet.to(device=device, dtype=dtype).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                              clip_sample=True)
    scheduler.set_timesteps(1000)
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    generator = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def run(n: int) -> None:
        image = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        for t in scheduler.timesteps[:n]:
            model_output = unet(image, t).sample
            image = scheduler.step(model_output, t, image, generator=generator).prev_sample

    return run


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The device, precision, batch, window, interleaving, compile and output options every peer
    script shares (each adds its preset choices and its peer's own precision option)."""
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="both contestants (auto: ddpmctl's default for the device)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile for ddpmctl (default: its own default, on for CUDA only)")
    p.add_argument("--json-out", type=Path, default=None, help="write the results here")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the preset's)")
    p.add_argument("--sample-batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=None, help="timed denoising steps per repeat")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="alternate the contestants window by window (default: on for CPU, where other load drifts)")


@dataclasses.dataclass
class Run:
    """What both contestants share, resolved from the common options (:func:`resolve_run`)."""

    device: torch.device
    spec: object  # ddpmctl's RunSpec for the preset
    prec: object  # ddpmctl's Precision
    bf16: bool  # the peer runs bf16
    batch: int
    sample_batch: int
    interleave: bool
    ours_flops: dict
    n_params: int


def resolve_run(args, peer_precision: str | None) -> Run:
    """The device, ddpmctl's spec and precision, the peer's precision (``peer_precision``, else
    ddpmctl's), batches and interleaving; fills the unset timing options with bench's defaults."""
    device = choose_device(args.device)
    d = bench.DEFAULTS.get(device.type, bench.DEFAULTS["cpu"])
    args.steps = args.steps or d["steps"]
    args.warmup = d["warmup"] if args.warmup is None else args.warmup
    args.repeats = args.repeats or d["repeats"]
    args.sample_steps = args.sample_steps or d["sample_steps"]
    spec = bench.resolve_spec(args.preset, device, args.batch_size, args.precision)
    prec = choose_precision(args.precision, device)
    batch = spec.train.batch_size
    with torch.device("meta"):
        n_params = count_parameters(build(spec.model))
    return Run(device=device, spec=spec, prec=prec, bf16=(peer_precision or prec.name) == "bf16", batch=batch,
               sample_batch=args.sample_batch_size or d["sample_batch_size"] or batch,
               interleave=device.type == "cpu" if args.interleave is None else args.interleave,
               ours_flops=bench.model_flops_per_image(spec), n_params=n_params)


def compare_train(builders: dict, batch: int, device: torch.device, args, interleave: bool) -> dict:
    """name -> bench.measure_train result. One after the other (each built, measured and freed alone:
    its peak memory is its own), or interleaved window by window (a shared, busy CPU drifts; every
    contestant then sees the same drift; peak memory is the process's and not per contestant)."""
    out = {}
    if not interleave:
        for name, build_step in builders.items():
            one_step, read = build_step()
            out[name] = bench.measure_train(one_step, batch, device, steps=args.steps, warmup=args.warmup,
                                            repeats=args.repeats, read=read, emit=emit, label=f"{name} train")
            del one_step, read
            free(device)
        return out
    built = {name: b() for name, b in builders.items()}
    windows: dict[str, list] = {name: [] for name in built}
    for r in range(args.repeats):
        for name, (one_step, read) in built.items():
            windows[name].append(bench.measure_train(one_step, batch, device, steps=args.steps,
                                                     warmup=args.warmup if r == 0 else 0, repeats=1, read=read,
                                                     emit=emit, label=f"{name} train"))
    for name, ws in windows.items():
        rates = [w["images_per_s"] for w in ws]
        ips = statistics.median(rates)
        out[name] = {"images_per_s": ips, "step_ms": 1e3 * batch / ips, "repeats": rates, "best": max(rates),
                     "peak_memory_bytes": None, "peak_memory_kind": "not per contestant (interleaved)"}
    return out


def compare_sample(builders: dict, batch: int, device: torch.device, args, interleave: bool) -> dict:
    """name -> bench.measure_sampling result, one after the other or interleaved (see compare_train)."""
    out = {}
    if not interleave:
        for name, build_run in builders.items():
            run = build_run()
            out[name] = bench.measure_sampling(run, batch, device, steps=args.sample_steps, repeats=args.repeats,
                                               emit=emit, label=f"{name} sample")
            del run
            free(device)
        return out
    built = {name: b() for name, b in builders.items()}
    windows: dict[str, list] = {name: [] for name in built}
    for r in range(args.repeats):
        for name, run in built.items():
            windows[name].append(bench.measure_sampling(run, batch, device, steps=args.sample_steps, repeats=1,
                                                        emit=emit, label=f"{name} sample", warmup=r == 0))
    for name, ws in windows.items():
        per = [w["repeats_ms"][0] for w in ws]
        ms = statistics.median(per)
        out[name] = {"ms_per_step": ms, "images_per_s_1000_steps": batch / (ms * 1e-3 * 1000), "repeats_ms": per,
                     "best_ms": min(per), "peak_memory_bytes": None}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", choices=sorted(DIFFUSERS_MODELS))
    add_common_args(p)
    p.add_argument("--diffusers-precision", default=None, choices=["fp32", "bf16"],
                   help="diffusers' precision when it should differ from ddpmctl's, e.g. fp32 (its example's "
                        "default, mixed_precision 'no') against ddpmctl's auto: defaults against defaults; bf16 "
                        "runs as its example does, autocast for training and bf16 weights for sampling")
    p.add_argument("--no-tuned", action="store_true", help="skip the channels_last + fused AdamW diffusers run")
    p.add_argument("--no-sample-compile", action="store_true",
                   help="sample ddpmctl without torch.compile (bf16 + CUDA graph only): saves the compile time")
    args = p.parse_args()

    import diffusers

    run = resolve_run(args, args.diffusers_precision)
    device, spec, prec, bf16, batch = run.device, run.spec, run.prec, run.bf16, run.batch
    sample_batch, interleave, ours_flops, n_params = run.sample_batch, run.interleave, run.ours_flops, run.n_params
    cfg = DIFFUSERS_MODELS[args.preset]
    results: dict = {"preset": args.preset, "device": describe(device), "torch": torch.__version__,
                     "diffusers_version": diffusers.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, default=str))

    t0 = time.perf_counter()
    results["interleaved"] = interleave
    peer_flops = diffusers_flops(cfg)
    ours: dict = {"preset": args.preset, "precision": prec.name, "batch_size": batch, "parameters": n_params,
                  "flops_per_image_train": ours_flops["train"], "flops_per_image_forward": ours_flops["forward"],
                  "sample_batch_size": sample_batch, "warnings": []}
    peer: dict = {"precision": "bf16" if bf16 else "fp32",
                  "parameters": peer_flops["parameters"], "flops_per_image_train": peer_flops["train"],
                  "flops_per_image_forward": peer_flops["forward"], "sample_batch_size": sample_batch}
    results["ddpmctl"], results["diffusers"] = ours, peer

    def note(e: dict) -> None:
        if e.get("event") == "warning":
            ours["warnings"].append(e["message"])
        emit(e)

    # Each contestant: a builder returning its step (train) or n-step loop (sample), and where its
    # numbers go. ddpmctl's are bench's own: the step `train` runs, the sampler `sample` runs.
    def ours_train():
        one_step, read, training = bench.ddpmctl_train_step(spec, device, prec, compile_mode=args.compile, emit=note)
        ours["compile"] = compile_wanted(spec.train.compile if args.compile is None else args.compile,
                                                device) and getattr(training.forward, "failed", None) is None
        return one_step, read

    train_builders = {"ddpmctl": ours_train,
                      "diffusers": lambda: (diffusers_train_step(cfg, device, batch, tuned=False, bf16=bf16), None)}
    if device.type == "cuda" and not args.no_tuned:
        train_builders["diffusers-tuned"] = lambda: (diffusers_train_step(cfg, device, batch, tuned=True, bf16=bf16), None)
    sample_compile = False if args.no_sample_compile else args.compile
    sample_builders = {
        "ddpmctl": lambda: bench.ddpmctl_sampler(spec, device, prec, sample_batch, compile_mode=sample_compile,
                                                 emit=note),
        "diffusers": lambda: diffusers_sampler(cfg, device, sample_batch, bf16=bf16),
    }
    ours["sample_compile"] = compile_wanted(sample_compile, device)

    with bench._restore_global_state():
        set_fast_math(device, device.type == "cpu")  # as `train` sets them, for every contestant
        log(f"== training, batch {batch}, {'interleaved' if interleave else 'one after the other'}")
        tr = compare_train(train_builders, batch, device, args, interleave)
        for name, r in tr.items():
            flops = ours_flops if name == "ddpmctl" else peer_flops
            prefix = "tuned_" if name == "diffusers-tuned" else ""
            dst = ours if name == "ddpmctl" else peer
            dst.update({f"{prefix}train_images_per_s": r["images_per_s"], f"{prefix}train_step_ms": r["step_ms"],
                        f"{prefix}train_images_per_s_best": r.get("best", max(r["repeats"])),
                        f"{prefix}train_repeats_images_per_s": r["repeats"],
                        f"{prefix}peak_memory_bytes": r["peak_memory_bytes"],
                        f"{prefix}achieved_tflops": r["images_per_s"] * flops["train"] / 1e12})
            if not prefix:
                dst["peak_memory_kind"] = r["peak_memory_kind"]
        save()
        log(f"== sampling, batch {sample_batch} ({time.perf_counter() - t0:.0f}s so far)")
        sm = compare_sample(sample_builders, sample_batch, device, args, interleave)
        for name, r in sm.items():
            flops = ours_flops if name == "ddpmctl" else peer_flops
            dst = ours if name == "ddpmctl" else peer
            dst.update({"sample_ms_per_step": r["ms_per_step"],
                        "sample_images_per_s_1000_steps": r["images_per_s_1000_steps"],
                        "sample_repeats_ms": r["repeats_ms"], "sample_peak_memory_bytes": r["peak_memory_bytes"],
                        "sample_ms_per_step_best": r.get("best_ms", min(r["repeats_ms"])),
                        "sample_achieved_tflops": sample_batch * flops["forward"] / (r["ms_per_step"] * 1e-3) / 1e12})
        save()
        dtype = prec.autocast_dtype or torch.float32
        ours["peak_dtype"] = str(dtype).removeprefix("torch.")
        ours["matmul_peak_tflops"] = bench.matmul_peak_tflops(device, dtype)
        ours["mfu"] = ours["achieved_tflops"] / ours["matmul_peak_tflops"]
        ours["sample_mfu"] = ours["sample_achieved_tflops"] / ours["matmul_peak_tflops"]
    pk = ours.get("matmul_peak_tflops")
    for key in ("achieved_tflops", "tuned_achieved_tflops", "sample_achieved_tflops"):
        if pk and peer.get(key) is not None:
            peer[key.replace("achieved_tflops", "mfu")] = peer[key] / pk
    results["ratios"] = {
        "train_images_per_s": ratio(ours["train_images_per_s"], peer.get("train_images_per_s")),
        "train_images_per_s_vs_tuned": ratio(ours["train_images_per_s"], peer.get("tuned_train_images_per_s")),
        "train_tflops": ratio(ours["achieved_tflops"], peer.get("achieved_tflops")),
        "sample_images_per_s": ratio(ours["sample_images_per_s_1000_steps"], peer.get("sample_images_per_s_1000_steps")),
        "sample_tflops": ratio(ours["sample_achieved_tflops"], peer.get("sample_achieved_tflops")),
        "peak_memory": ratio(ours["peak_memory_bytes"], peer.get("peak_memory_bytes")),
        # best window of each: on a shared CPU, the closest to an unloaded machine
        "train_images_per_s_best": ratio(ours["train_images_per_s_best"], peer.get("train_images_per_s_best")),
        "sample_images_per_s_best": ratio(peer.get("sample_ms_per_step_best"), ours["sample_ms_per_step_best"]),
    }
    results["seconds"] = time.perf_counter() - t0
    save()
    print(table(results))
    return 0


def table(res: dict) -> str:
    o, d, r = res["ddpmctl"], res["diffusers"], res["ratios"]

    def f(x, spec=".1f"):
        return "n/a" if x is None else format(x, spec)

    gib = 2.0**30
    mem_o = o["peak_memory_bytes"] / gib if o["peak_memory_bytes"] is not None else None
    mem_d = d["peak_memory_bytes"] / gib if d.get("peak_memory_bytes") is not None else None
    rows = [
        ("parameters (M)", f(o["parameters"] / 1e6), f(d["parameters"] / 1e6), ""),
        ("GFLOP/image train", f(o["flops_per_image_train"] / 1e9), f(d["flops_per_image_train"] / 1e9), ""),
        (f"train images/s (batch {o['batch_size']})", f(o["train_images_per_s"]), f(d.get("train_images_per_s")),
         f(r["train_images_per_s"], ".2f") + "x"),
        ("train images/s, best window", f(o["train_images_per_s_best"]), f(d.get("train_images_per_s_best")),
         f(r["train_images_per_s_best"], ".2f") + "x"),
        ("train images/s, diffusers tuned", "", f(d.get("tuned_train_images_per_s")),
         f(r["train_images_per_s_vs_tuned"], ".2f") + "x"),
        ("train TFLOP/s", f(o["achieved_tflops"], ".2f"), f(d.get("achieved_tflops"), ".2f"),
         f(r["train_tflops"], ".2f") + "x"),
        ("train utilisation %", f(None if o["mfu"] is None else 100 * o["mfu"]),
         f(None if d.get("mfu") is None else 100 * d["mfu"]), ""),
        ("peak memory GiB (train)", f(mem_o, ".2f"), f(mem_d, ".2f"), f(r["peak_memory"], ".2f") + "x"),
        (f"sample ms/step (batch {o['sample_batch_size']})", f(o["sample_ms_per_step"], ".2f"),
         f(d.get("sample_ms_per_step"), ".2f"), ""),
        ("sample images/s, 1000-step DDPM", f(o["sample_images_per_s_1000_steps"], ".3f"),
         f(d.get("sample_images_per_s_1000_steps"), ".3f"), f(r["sample_images_per_s"], ".2f") + "x"),
        ("sample ms/step, best window", f(o["sample_ms_per_step_best"], ".2f"),
         f(d.get("sample_ms_per_step_best"), ".2f"), f(r["sample_images_per_s_best"], ".2f") + "x"),
        ("sample TFLOP/s", f(o["sample_achieved_tflops"], ".2f"), f(d.get("sample_achieved_tflops"), ".2f"),
         f(r["sample_tflops"], ".2f") + "x"),
    ]
    head = f"{res['preset']} on {res['device']}, torch {res['torch']}, diffusers {res['diffusers_version']}, " \
           f"{o['precision']}" + (f" (diffusers {d['precision']})" if d.get("precision", o["precision"]) !=
                                  o["precision"] else "") + f", ddpmctl compile {'on' if o['compile'] else 'off'} (sampling " \
           f"{'on' if o.get('sample_compile', o['compile']) else 'off'}), " \
           f"matmul peak {f(o['matmul_peak_tflops'], '.3g')} TFLOP/s ({o['peak_dtype']})"
    w = max(len(a) for a, *_ in rows)
    lines = [head, f"{'':{w}}  {'ddpmctl':>10}  {'diffusers':>10}  {'ratio':>7}"]
    lines += [f"{a:{w}}  {b:>10}  {c:>10}  {e:>7}" for a, b, c, e in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
