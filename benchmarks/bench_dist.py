"""What DistributedDataParallel over gloo costs per training step on the CPU (docs/distributed.md).

    .venv/bin/python benchmarks/bench_dist.py                         # mnist preset, global batch 64
    .venv/bin/python benchmarks/bench_dist.py --preset shapes --batch 32 --steps 30

Three measurements, each the median step time after warm-up, one torch thread per process:

* ``single``: one process, batch B/2 (the work one rank does in a 2-rank job), no DDP;
* ``ddp2``: two gloo ranks, global batch B (B/2 each), the training loop's step (DDP gradient
  all-reduce + the per-step loss all-reduce) plus the per-step signal agreement on the control
  group; overhead = ddp2 - single;
* ``control``: one control-plane agreement (``Dist.max_int``) alone, and one loss all-reduce alone.

Also ``single_full``: one process with 2 threads and batch B, the alternative to 2 ranks on a
2-core machine. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_times(spec, dist, steps: int, warmup: int) -> list[float]:
    from ddpmctl.bench import synthetic_images
    from ddpmctl.data.loader import DeviceLoader
    from ddpmctl.devices import choose_precision
    from ddpmctl.engine import setup_training

    device = torch.device("cpu")
    torch.manual_seed(0)
    training = setup_training(spec, device, choose_precision("fp32", device), dist=dist, compile_mode="off")
    B, m = spec.train.batch_size, spec.model
    loader = DeviceLoader(synthetic_images(4 * B, m.channels, m.image_size), B, device, seed=0,
                          shard=(dist.rank, dist.world_size))
    rows = dist.shard(B)
    gen = torch.Generator().manual_seed(1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x0 = loader.batch(*divmod(i, loader.steps_per_epoch))
        t = torch.randint(0, spec.diffusion.timesteps, (B,), generator=gen)[rows]
        noise = torch.randn((B, *x0.shape[1:]), generator=gen)[rows]
        loss, _g, _f = training.step(x0, t, noise, 1e-4)
        dist.max_int(0)  # the loop's per-step signal agreement
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world: int, port: int, args, out) -> None:
    import datetime

    import torch.distributed as td

    from ddpmctl import spec as S
    from ddpmctl.dist import Dist

    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                          timeout=datetime.timedelta(seconds=300))
    dist = Dist(rank, world, rank, td.new_group(backend="gloo"))
    spec = S.resolve(args.preset, sets=[], overrides={"train": {"batch_size": args.batch}})
    times = _step_times(spec, dist, args.steps, args.warmup)
    ctl, red = [], []
    for _ in range(200):
        t0 = time.perf_counter()
        dist.max_int(0)
        ctl.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dist.mean(torch.ones(())).item()
        red.append(time.perf_counter() - t0)
    out.put((rank, statistics.median(times), statistics.median(ctl), statistics.median(red)))
    td.destroy_process_group()


def _single(args, batch: int, threads: int) -> float:
    from ddpmctl import spec as S
    from ddpmctl.dist import SINGLE

    torch.set_num_threads(threads)
    spec = S.resolve(args.preset, sets=[], overrides={"train": {"batch_size": batch}})
    return statistics.median(_step_times(spec, SINGLE, args.steps, args.warmup))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over 2 ranks)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    single = _single(args, args.batch // 2, 1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get() for _ in procs)
    for p in procs:
        p.join()
    ddp2 = max(r[1] for r in res)
    single_full = _single(args, args.batch, 2)
    from ddpmctl.unet import build
    from ddpmctl import spec as S

    params = sum(p.numel() for p in build(S.resolve(args.preset).model).parameters())
    print(json.dumps({
        "preset": args.preset, "parameters": params, "global_batch": args.batch,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "single_half_batch_ms": round(single * 1e3, 2), "ddp2_step_ms": round(ddp2 * 1e3, 2),
        "ddp_overhead_ms": round((ddp2 - single) * 1e3, 2),
        "ddp_overhead_pct": round(100 * (ddp2 - single) / single, 1),
        "control_agreement_ms": round(max(r[2] for r in res) * 1e3, 3),
        "loss_allreduce_ms": round(max(r[3] for r in res) * 1e3, 3),
        "single_full_batch_2threads_ms": round(single_full * 1e3, 2),
        "images_per_s_ddp2": round(args.batch / ddp2, 1),
        "images_per_s_single_2threads": round(args.batch / single_full, 1),
    }))


if __name__ == "__main__":
    main()
