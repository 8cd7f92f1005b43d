"""DeviceLoader throughput: float32 [-1, 1] batches (gather + flip + scale) from a uint8 array.

    .venv/bin/python benchmarks/bench_loader.py                      # CPU, N=20000, 64x64x3, batch 128
    .venv/bin/python benchmarks/bench_loader.py --device cuda --n 50000

Prints one JSON line: images/s and GB/s of float32 output. The numbers in docs/data.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from ddpmctl.data.loader import DeviceLoader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, args.channels, args.size, args.size), dtype=torch.uint8, generator=g)
    device = torch.device(args.device)
    loader = DeviceLoader(images, args.batch, device, seed=0, flip=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for _ in loader.epoch(0):  # warm-up epoch (allocator, permutation caches)
        pass
    sync()
    t0 = time.perf_counter()
    count = 0
    checksum = 0.0
    for e in range(1, args.epochs + 1):
        for x in loader.epoch(e):
            count += x.shape[0]
        checksum += float(x.sum())  # one sync per epoch keeps the work honest without per-step syncs
    sync()
    dt = time.perf_counter() - t0
    per_image = args.channels * args.size * args.size
    print(json.dumps({
        "device": str(device), "placement": loader.placement, "n": args.n,
        "shape": [args.channels, args.size, args.size], "batch": args.batch,
        "images_per_s": round(count / dt), "gb_per_s_float32_out": round(count * per_image * 4 / dt / 1e9, 2),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "machine": platform.machine(), "seconds": round(dt, 3), "checksum": round(checksum, 1),
    }))


if __name__ == "__main__":
    main()
