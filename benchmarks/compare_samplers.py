"""Samplers side by side on trained runs: wall time, image statistics against the real data, a grid.

Every sampler draws the same seeds (image i: seed i, through ddpmctl.generate.generate, the code
`ddpmctl sample` runs, uncompiled, fp32), so rows of the grid start from the same x_T. The statistics
are computed per image on the uint8 output and compared with the real images of the run's data (the
built-in shapes: its test split):

    bg luma       mean luma (0.299 R + 0.587 G + 0.114 B, 0..255) of the 1-pixel border ring; on
                  `shapes` the ring is always plain background (shapes keep a margin)
    bg sd         standard deviation of luma on that ring (0 for a plain background: texture/noise)
    fg luma       95th percentile of luma (the shape; `shapes` foregrounds have luma >= 130)
    dark          fraction of pixels with luma < 60 (`shapes` backgrounds have luma <= 56)
    between       fraction of pixels with 70 < luma < 120 (neither background nor shape: blur, haze)
    2-tone rms    RMS distance (grey levels) of each pixel to the nearer of two colours fitted per image
                  (2-means in RGB): 0 for a flat two-colour image, grows with blur, texture and noise
    mean, std     of all pixel values (0..255)

Each is printed as mean ± standard error over the images. `--ode-reference` adds a 1000-step DDIM
(eta = 0) run, the probability-flow ODE solved finely, and reports each deterministic sampler's RMS
distance to it (how well it solves the ODE, separately from how good the ODE's images are).

    OMP_NUM_THREADS=1 python benchmarks/compare_samplers.py runs/shapes --n 64 --ode-reference \\
        --grid shapes_samplers.png
    # several runs: one table each, one grid with a panel each (docs/quality.md)
    OMP_NUM_THREADS=1 python benchmarks/compare_samplers.py runs/a runs/b --title "eps" --title "v" --grid g.png

Samplers are given as NAME[:STEPS[:ETA]] (default: ddpm, ddim:50, dpm-solver++:20, dpm-solver++:20:1).
The wall time is that of the first batch of `--batch-size` (16) images, network and sampler only (no
process start, model load or PNG writing; `ddpmctl sample` adds those).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpmctl.data import load_images
from ddpmctl.generate import generate
from ddpmctl.images import make_grid
from ddpmctl.modelfolder import load_source

LUMA = np.array([0.299, 0.587, 0.114])
DEFAULT_SAMPLERS = ["ddpm", "ddim:50", "dpm-solver++:20", "dpm-solver++:20:1"]


def parse_sampler(text: str) -> tuple[str, int | None, float]:
    parts = text.split(":")
    name = parts[0]
    steps = int(parts[1]) if len(parts) > 1 and parts[1] else None
    eta = float(parts[2]) if len(parts) > 2 else 0.0
    return name, steps, eta


def label(name: str, steps: int | None, eta: float) -> str:
    if name == "ddpm":
        return "DDPM 1000"
    shown = {"ddim": "DDIM", "dpm-solver++": "DPM-Solver++"}[name]
    default = {"ddim": 50, "dpm-solver++": 20}[name]
    return f"{shown} {steps or default}" + (f" eta={eta:g}" if eta else "")


def two_tone_rms(x: np.ndarray) -> np.ndarray:
    """x: float (N, 3, H, W) in 0..255 -> per image RMS residual (grey levels) of a 2-colour fit."""
    n = x.shape[0]
    px = x.reshape(n, 3, -1).transpose(0, 2, 1)  # (N, P, 3)
    luma = px @ LUMA
    c = [np.take_along_axis(px, luma.argmin(1)[:, None, None], 1)[:, 0],
         np.take_along_axis(px, luma.argmax(1)[:, None, None], 1)[:, 0]]
    for _ in range(10):
        d = np.stack([((px - ck[:, None]) ** 2).sum(-1) for ck in c])  # (2, N, P)
        nearest = d.argmin(0)
        for k in (0, 1):
            m = (nearest == k)[..., None]
            cnt = m.sum(1)
            c[k] = np.where(cnt > 0, (px * m).sum(1) / np.maximum(cnt, 1), c[k])
    d = np.minimum(((px - c[0][:, None]) ** 2).sum(-1), ((px - c[1][:, None]) ** 2).sum(-1))
    return np.sqrt(d.mean(1) / 3)


def image_stats(u8: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of uint8 (N, 3, H, W) images (see the module docstring)."""
    x = u8.astype(np.float64)
    luma = np.einsum("nchw,c->nhw", x, LUMA)
    ring = np.concatenate([luma[:, 0, :], luma[:, -1, :], luma[:, 1:-1, 0], luma[:, 1:-1, -1]], axis=1)
    flat = luma.reshape(len(x), -1)
    return {
        "bg luma": ring.mean(1),
        "bg sd": ring.std(1),
        "fg luma": np.percentile(flat, 95, axis=1),
        "dark": (flat < 60).mean(1),
        "between": ((flat > 70) & (flat < 120)).mean(1),
        "2-tone rms": two_tone_rms(x),
        "mean": x.reshape(len(x), -1).mean(1),
        "std": x.reshape(len(x), -1).std(1),
    }


def summarise(u8: np.ndarray) -> dict[str, tuple[float, float]]:
    return {k: (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))) for k, v in image_stats(u8).items()}


def run_sampler(den, seeds, name, steps, eta, batch_size) -> tuple[np.ndarray, float, int]:
    out, times, nfe = [], [], 0
    it = generate(den, seeds, sampler=name, steps=steps, eta=eta, batch_size=batch_size,
                  device=torch.device("cpu"), compile=False)
    while True:
        t0 = time.perf_counter()
        try:
            _, imgs, nfe = next(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t0)
        out.append(imgs.numpy())
    return np.concatenate(out), times[0], nfe


def labelled_grid(panels: list[tuple[str | None, list[tuple[str, np.ndarray]]]], path: Path, scale: int = 2) -> None:
    """One PNG: for each panel an optional title line, then one row per (label, uint8 images)."""
    from PIL import Image, ImageDraw

    tiles = [[(text, make_grid(torch.from_numpy(np.ascontiguousarray(a)), nrow=len(a))) for text, a in rows]
             for _, rows in panels]
    w = max(t.shape[2] for rows in tiles for _, t in rows) * scale
    h = tiles[0][0][1].shape[1] * scale
    margin, title_h = 116, 20
    height = sum(h * len(rows) + (title_h if title else 0) for (title, _), rows in zip(panels, tiles))
    canvas = Image.new("RGB", (margin + w, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (title, _), rows in zip(panels, tiles):
        if title:
            draw.text((4, y + 5), title, fill=(0, 0, 0))
            y += title_h
        for text, tile in rows:
            img = Image.fromarray(tile.permute(1, 2, 0).numpy())
            canvas.paste(img.resize((img.width * scale, img.height * scale), Image.NEAREST), (margin, y))
            draw.text((4, y + h // 2 - 6), text, fill=(0, 0, 0))
            y += h
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def num(v: float, digits: int) -> str:
    return f"{0.0 if abs(v) < 1e-9 else v:.{digits}g}"


def print_table(title: str, results: dict, batch: int) -> None:
    keys = list(next(iter(results.values()))["stats"])
    print(f"\n{title}\n")
    print("| | " + " | ".join(keys) + f" | s / {batch} images | RMS to ODE |")
    print("|---" * (len(keys) + 3) + "|")
    for row, r in results.items():
        cells = [f"{num(r['stats'][k][0], 3)} ± {num(r['stats'][k][1], 2)}" for k in keys]
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        ode = f"{r['rms_to_ode_reference']:.1f}" if "rms_to_ode_reference" in r else ""
        print(f"| {row} (n={r['n']}) | " + " | ".join(cells) + f" | {secs} | {ode} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or model folders (EMA weights are used)")
    ap.add_argument("--title", action="append", help="a title per run for the table and the grid (repeatable)")
    ap.add_argument("--sampler", action="append", help="NAME[:STEPS[:ETA]], repeatable")
    ap.add_argument("--n", type=int, default=64, help="images per sampler for the statistics (seeds 0..n-1)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch; the first batch is timed")
    ap.add_argument("--grid", type=Path, help="write a labelled grid of the first --grid-n images of each row")
    ap.add_argument("--grid-n", type=int, default=16)
    ap.add_argument("--ode-reference", action="store_true", help="also run DDIM 1000 eta=0 and report RMS to it")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    titles = (args.title or []) + [str(r) for r in args.runs[len(args.title or []):]]
    samplers = [parse_sampler(s) for s in (args.sampler or DEFAULT_SAMPLERS)]
    if args.ode_reference:
        samplers.append(("ddim", 1000, 0.0))
    seeds = list(range(args.n))
    batch = min(args.batch_size, args.n)

    panels, everything = [], {}
    for run, title in zip(args.runs, titles):
        den = load_source(run)
        spec = den.spec
        rows = []
        results = {}
        if not panels:  # the real images once, from the first run's data
            real = load_images(spec.data.source, image_size=spec.model.image_size, channels=spec.model.channels,
                               split="test").images.numpy()
            results["real data"] = {"stats": summarise(real), "n": len(real)}
            rows.append(("real data", real[: args.grid_n]))
        images = {}
        for name, steps, eta in samplers:
            key = label(name, steps, eta)
            u8, seconds, nfe = run_sampler(den, seeds, name, steps, eta, args.batch_size)
            images[key] = u8
            results[key] = {"stats": summarise(u8), "n": len(u8), "nfe": nfe, "seconds": seconds,
                            "seconds_for_images": batch}
            print(f"{title}: {key}: {seconds:.1f}s for the first {batch} images ({nfe} evaluations)",
                  file=sys.stderr, flush=True)
            if not (args.ode_reference and (name, steps, eta) == ("ddim", 1000, 0.0)):
                rows.append((key, u8[: args.grid_n]))
        if args.ode_reference:
            ref = images["DDIM 1000"].astype(np.float64)
            for (name, steps, eta), key in zip(samplers, images):
                if name != "ddpm" and eta == 0:
                    results[key]["rms_to_ode_reference"] = float(np.sqrt(((images[key] - ref) ** 2).mean()))
        print_table(title, results, batch)
        panels.append((title if len(args.runs) > 1 else None, rows))
        everything[title] = results
    if args.grid:
        labelled_grid(panels, args.grid)
        print(f"grid: {args.grid}", file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
