"""Classifier-free guidance on a conditional `shapes` run: how the weight W trades class accuracy for variety.

For each W, N images of every class are drawn with the run's own sampler (image i of every class uses
seed SEED + i, so the rows differ by class and W only) through ddpmctl.generate.generate, the code
`ddpmctl sample --class ... --guidance W` runs. Reported per W:

    accuracy      share of images whose shape ddpmctl.data.shapes.classify_shapes names as the asked class
                  (that classifier names 99-100% of real shapes: the real-data row)
    variety       mean pairwise RMS distance (grey levels) between images of one class, as a share of the
                  same among real images of that class: 1 = as varied as the data, lower = more alike
    between       fraction of pixels with 70 < luma < 120 (neither background nor shape: blur, haze,
                  artifacts; real shapes have only their antialiased edges there)
    bg sd         standard deviation of luma on the 1-pixel border (0 for a plain real background)

Each as mean ± standard error over the images (variety: over classes).

    OMP_NUM_THREADS=1 python benchmarks/guidance_tradeoff.py runs/cond-shapes --w 0,0.5,1,2,4 --n 64
    OMP_NUM_THREADS=1 python benchmarks/guidance_tradeoff.py runs/cond-shapes --grid docs/conditional_shapes.png
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ddpmctl.data import load_images
from ddpmctl.data.shapes import KINDS, classify_shapes
from ddpmctl.generate import generate, per_class, run_defaults
from ddpmctl.images import make_grid, save_png
from ddpmctl.modelfolder import load_source

LUMA = np.array([0.299, 0.587, 0.114])


def cpu_flags() -> str:
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("Model name")), "?")
    have = next((ln.split(":", 1)[1].split() for ln in flags.splitlines() if ln.startswith("Flags")), [])
    return f"{model}; {' '.join(f for f in have if f.startswith(('avx', 'amx')))}"


def variety(u8: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per class: mean pairwise RMS distance (grey levels) between its images."""
    x = u8.reshape(len(u8), -1).astype(np.float64)
    out = []
    for c in range(k):
        xc = x[labels == c]
        d = ((xc[:, None] - xc[None]) ** 2).mean(-1) ** 0.5
        n = len(xc)
        out.append(d.sum() / (n * (n - 1)))
    return np.array(out)


def stats(u8: np.ndarray, labels: np.ndarray, k: int, real_variety: np.ndarray) -> dict[str, tuple[float, float]]:
    luma = np.einsum("nchw,c->nhw", u8.astype(np.float64), LUMA)
    ring = np.concatenate([luma[:, 0, :], luma[:, -1, :], luma[:, 1:-1, 0], luma[:, 1:-1, -1]], axis=1)
    flat = luma.reshape(len(u8), -1)
    per = {
        "accuracy": (classify_shapes(u8) == labels).astype(float),
        "variety": variety(u8, labels, k) / real_variety,
        "between": ((flat > 70) & (flat < 120)).mean(1),
        "bg sd": ring.std(1),
    }
    return {name: (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))) for name, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--w", default="0,0.5,1,2,4", help="guidance weights, comma-separated")
    ap.add_argument("--n", type=int, default=64, help="images per class and W")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", type=Path, help="also write a grid: a row per class, one block of 8 per W")
    args = ap.parse_args(argv)
    dev = torch.device("cpu")
    den = load_source(args.run, device=dev)
    spec = den.spec
    k = spec.model.num_classes
    if not k or list(spec.model.classes) != list(KINDS):
        sys.exit(f"{args.run} is not a conditional shapes run (classes {list(spec.model.classes)})")
    sampler, steps, eta = run_defaults(spec, None)
    real = load_images("shapes", image_size=spec.model.image_size, channels=spec.model.channels, split="test")
    real_u8, real_labels = real.images.numpy()[:3 * args.n], real.labels.numpy()[:3 * args.n]
    real_var = variety(real_u8, real_labels, k)
    print(f"run {args.run} ({den.checkpoint}); {sampler} {steps} steps, eta {eta:g}; {args.n} images per class "
          f"and W; CPU: {cpu_flags()}; torch {torch.__version__}\n")
    print("| W | class accuracy | variety (1 = data's) | between | bg sd |\n|---|---|---|---|---|")
    r = stats(real_u8, real_labels, k, real_var)
    fmt = lambda m, s, d=3: f"{m:.{d}f} ± {s:.{d}f}"  # noqa: E731
    print(f"| real test images | {fmt(*r['accuracy'])} | 1 | {fmt(*r['between'])} | {fmt(*r['bg sd'], 2)} |")
    blocks = []
    for w in [float(v) for v in args.w.split(",")]:
        seeds, labels = per_class(range(k), args.n, args.seed)
        u8 = torch.cat([b for _, b, _ in generate(den, seeds, sampler=sampler, steps=steps, eta=eta,
                                                  batch_size=3 * args.n, device=dev, labels=labels,
                                                  guidance=w)]).numpy()
        r = stats(u8, np.array(labels), k, real_var)
        print(f"| {w:g} | {fmt(*r['accuracy'])} | {fmt(*r['variety'])} | {fmt(*r['between'])} | "
              f"{fmt(*r['bg sd'], 2)} |", flush=True)
        blocks.append(u8.reshape(k, args.n, *u8.shape[1:])[:, :8])
    if args.grid:
        rows = np.concatenate(blocks, axis=1).reshape(-1, *blocks[0].shape[2:])  # row c: W blocks side by side
        save_png(args.grid, make_grid(torch.from_numpy(rows), nrow=8 * len(blocks)))
        print(f"\nwrote {args.grid}: rows {', '.join(KINDS)}; blocks of 8 left to right: W = {args.w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
