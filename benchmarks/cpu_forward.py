"""One network evaluation (the sampling step's cost) on the CPU, formulation by formulation.

For a preset's U-Net (random weights: the real model zero-initialises its output layer, which
would make every error 0/0), times the forward pass at one batch size in the ways a CPU sampler
could run it, and the relative error of each against plain fp32:

    eager fp32                 what `--precision fp32` runs
    eager fp32 channels_last   NHWC memory format
    autocast bf16              what `--precision bf16` (auto on CPUs with AVX512-BF16/AMX) runs
    bf16 weights               a bf16 copy of the model, no autocast (what CUDA sampling does)
    compiled frozen fp32/bf16  torch.compile with inductor freezing (--compile; minutes on 2 cores)

Best and median of --repeats calls after two untimed ones, torch's default threads.

    python benchmarks/cpu_forward.py --preset mnist --batch 32
    python benchmarks/cpu_forward.py --preset cifar10 --batch 16 --compile

Results on the 2-core AMD EPYC (Zen 4, AVX512-BF16) machine are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ddpmctl import spec as specmod
from ddpmctl.unet import build


def timed(fn, x, t, repeats: int) -> tuple[float, float, torch.Tensor]:
    with torch.no_grad():
        out = fn(x, t)
        fn(x, t)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x, t)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2], out.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="also time torch.compile with freezing")
    args = p.parse_args()

    torch.manual_seed(0)
    m = specmod.resolve(args.preset).model
    net = build(m).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.02)
    x = torch.randn(args.batch, m.channels, m.image_size, m.image_size)
    t = torch.randint(0, 1000, (args.batch,))
    nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last)
    bf16 = copy.deepcopy(net).to(torch.bfloat16)

    def autocast(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(a, b)

    variants = {
        "eager fp32": net,
        "eager fp32 channels_last": lambda a, b: nhwc(a.contiguous(memory_format=torch.channels_last), b),
        "autocast bf16": autocast,
        "bf16 weights": lambda a, b: bf16(a.bfloat16(), b),
    }
    if args.compile:
        variants["compiled frozen fp32"] = torch.compile(net, dynamic=False, options={"freezing": True})
        variants["compiled frozen bf16"] = torch.compile(lambda a, b: bf16(a.bfloat16(), b), dynamic=False,
                                                         options={"freezing": True})
    print(f"{args.preset} forward, batch {args.batch}, cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'':28s} {'best ms':>9s} {'median ms':>10s} {'vs fp32':>8s} {'rel. error':>11s}")
    ref = None
    base = None
    for name, fn in variants.items():
        start = time.perf_counter()
        best, median, out = timed(fn, x, t, args.repeats)
        setup = time.perf_counter() - start - best * (args.repeats + 2)
        if ref is None:
            ref, base = out, median
        err = float((out - ref).norm() / ref.norm())
        extra = f"   (first calls +{setup:.0f} s: compilation)" if name.startswith("compiled") else ""
        print(f"{name:28s} {best * 1e3:9.1f} {median * 1e3:10.1f} {base / median:7.2f}x {err:11.1e}{extra}",
              flush=True)


if __name__ == "__main__":
    main()
