"""Preparation throughput: decoding + crop + resize on all cores (the `ddpmctl download` hot loop).

    .venv/bin/python benchmarks/bench_prepare.py             # 2000 CelebA-like 178x218 JPEGs -> 64x64, DDIM crop
    .venv/bin/python benchmarks/bench_prepare.py --n 8000 --workers 4 --pool threads

Prints one JSON line with images/s (the time includes starting worker processes). The images
are synthetic (smooth gradients plus noise, JPEG quality 90, about the size of CelebA's aligned
JPEGs), generated in memory first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

import ddpmctl.data.decode as dec
from ddpmctl.data.decode import Preprocess, decode_many
from ddpmctl.data.sources import crop_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
    ap.add_argument("--pool", choices=["auto", "threads", "processes"], default="auto")
    args = ap.parse_args()
    if args.workers:
        dec.workers = lambda: args.workers  # benchmark knob only

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:218, 0:178]
    blobs = []
    for i in range(64):  # 64 distinct JPEGs, reused: decoding cost is what is measured
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3 + i) % 256, ((xx + yy) * 2) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    items = [(f"{i}.jpg", blobs[i % len(blobs)]) for i in range(args.n)]
    pp = Preprocess(args.size, 3, crop_fraction("ddim"), "ddim")
    t0 = time.perf_counter()
    processes = {"auto": None, "threads": False, "processes": True}[args.pool]
    res = decode_many(iter(items), len(items), pp, processes=processes)
    dt = time.perf_counter() - t0
    print(json.dumps({
        "n": args.n, "decoded": res.count, "source": "178x218 JPEG q90", "out": [3, args.size, args.size],
        "workers": dec.workers(), "pool": args.pool, "cpu_count": os.cpu_count(), "images_per_s": round(res.count / dt),
        "mean_jpeg_bytes": round(sum(map(len, blobs)) / len(blobs)), "seconds": round(dt, 3),
    }))


if __name__ == "__main__":
    main()
