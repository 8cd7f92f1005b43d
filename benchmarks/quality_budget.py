"""Quality per compute budget: train a spec for a fixed budget, sample, score against held-out real images.

For each training seed the script

1. trains with the ddpmctl CLI, as a user would (`python -m ddpmctl train DATA --preset P --set ...
   --seed S --time-limit BUDGET` and/or `--max-steps N`, in a subprocess, so that `train.time_limit`
   counts that process's wall time from its start, start-up and data loading included). With a
   wall-clock budget the epoch count is lifted (`train.epochs=100000`) so the budget, not the
   preset's epochs, ends the run; the training grids are turned off (`train.sample_every=100000`,
   `sample.grid_size=1`) so they do not eat the budget. `--set` overrides all of this.
2. samples N images (seeds 0..N-1) from the EMA weights with `ddpmctl.generate.generate`, the code
   `ddpmctl sample` runs (default sampler, steps and eta: the run's own, `ddpmctl.generate.run_defaults`;
   `--samplers NAME:STEPS:ETA,...`: each of several samplers on the same weights, one row each);
3. scores them against the real test split, offline:
   * a small CNN classifier, trained once on the real training split and cached under OUT/classifier/
     (keyed by the images' digest): the Fréchet distance between Gaussians fitted to its 64-d
     penultimate features of the samples and of the real test images
     (`ddpmctl.evaluate.frechet_distance_from_features`), next to the same distance for N real training
     images (the floor at this N: what a perfect model would get); its mean top-class confidence on
     the samples, the fraction classified with confidence > 0.9, and the total-variation distance
     between the predicted class histogram of the samples and that of the real test images;
     the classifier's own accuracy on the real test split is reported to show the features mean something;
   * for `shapes`, also the image statistics of docs/quality.md (benchmarks/compare_samplers.py:
     bg luma, bg sd, fg luma, dark, between, 2-tone rms), for the samples and the real test split.

Data (`--data`):
    shapes   the built-in dataset (4,096 train / 512 test images, labels: circle, square, triangle)
    digits   scikit-learn's bundled `load_digits` (1,797 real 8x8 handwritten digits, no download;
             `pip install 'ddpmctl[bench]'`), written once as PNGs to OUT/data/digits/{train,test}/D/
             (1,500 / 297, a fixed seeded split) and trained on like any folder: ddpmctl's loader
             upsamples them to the spec's image size (Pillow bicubic)
    FOLDER   a folder with FOLDER/train/CLASS/*.png and FOLDER/test/CLASS/*.png (one subfolder per
             class; the class names label the classifier's training data)

Every result is one JSON line per (config, seed) appended to OUT/results.jsonl, and a table on stdout
(`--json`: the JSON lines instead). Each line states the CPU model and flags (avx512f, avx512_bf16,
amx), torch version, threads, precision, steps reached, images seen and wall times.

    OMP_NUM_THREADS=2 python benchmarks/quality_budget.py --data shapes --budget 10m --n 256 --seeds 0,1 \\
        --out /tmp/qb
    python benchmarks/quality_budget.py --data digits --preset mnist --set model.base_channels=32 \\
        --set model.groups=8 --set train.batch_size=64 --budget 30m --sampler ddim --steps 50 --out /tmp/qb

docs/quality.md, section "Quality per compute budget", has the campaign's commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ddpmctl
from ddpmctl.data import load_images
from ddpmctl.data.shapes import DEFAULT_COUNT, SEEDS, make_shapes
from ddpmctl.devices import choose_device, choose_precision
from ddpmctl.durations import parse_duration, short_duration
from ddpmctl.evaluate import feature_stats, frechet_distance_from_features, images_digest
from ddpmctl.generate import generate, run_defaults
from ddpmctl.images import make_grid, save_png
from ddpmctl.modelfolder import load_run
from ddpmctl.spec import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_samplers import summarise  # noqa: E402  (the shapes statistics of docs/quality.md)

DIGITS_TEST = 297
DIGITS_SEED = 20240603
# What the budget run changes in the spec before the user's --set (which wins).
BUDGET_SETS = ["train.sample_every=100000", "sample.grid_size=1"]
SHAPES_STATS = ("bg luma", "bg sd", "fg luma", "dark", "between", "2-tone rms")


# ----------------------------------------------------------------------------- the machine


def cpu_info() -> dict:
    """CPU model and the flags that decide CPU speed and precision (Linux /proc/cpuinfo; None elsewhere)."""
    model, flags = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and flags is None:
                flags = set(value.split())
    except OSError:
        pass

    def has(*names: str):
        return None if flags is None else any(n in flags for n in names)

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    return {"cpu": model or platform.processor() or None, "cores": os.cpu_count(), "avx512f": has("avx512f"), "avx512_bf16": has("avx512_bf16"),
            "amx": has("amx_tile", "amx_bf16"), "torch_cpu_capability": capability}


# ----------------------------------------------------------------------------- real data with labels


def write_digits(folder: Path) -> Path:
    """scikit-learn's load_digits as PNGs: folder/{train,test}/DIGIT/NNNN.png (8x8 grey, 0..255). Once."""
    done = folder / "done.json"
    if done.is_file():
        return folder
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--data digits needs scikit-learn: pip install 'ddpmctl[bench]' (or scikit-learn)") from None
    d = load_digits()
    u8 = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values 0..16
    order = np.random.default_rng(DIGITS_SEED).permutation(len(u8))
    splits = {"test": order[:DIGITS_TEST], "train": order[DIGITS_TEST:]}
    for split, idx in splits.items():
        for i in idx:
            path = folder / split / str(int(d.target[i])) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(path, torch.from_numpy(u8[i][None]))
    done.write_text(json.dumps({"source": "sklearn.datasets.load_digits", "n": len(u8),
                                "counts": {k: len(v) for k, v in splits.items()}, "seed": DIGITS_SEED}) + "\n")
    return folder


def labelled_split(data: str, split: str, size: int, channels: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(uint8 images (N, C, S, S), class index (N,), class names) of one split."""
    if data == "shapes":
        from ddpmctl.data.shapes import KINDS

        u8, kinds = make_shapes(DEFAULT_COUNT[split], size, channels, seed=SEEDS[split])
        return torch.from_numpy(u8), kinds.astype(np.int64), list(KINDS)
    root = Path(data) / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise SystemExit(f"--data {data}: expected {root}/CLASS/*.png with at least two class subfolders "
                         "(and the same under test/)")
    images, labels = [], []
    for k, name in enumerate(classes):
        x = load_images(str(root / name), image_size=size, channels=channels).images
        images.append(x)
        labels.append(np.full(len(x), k, np.int64))
    return torch.cat(images), np.concatenate(labels), classes


# ----------------------------------------------------------------------------- the feature classifier


class SmallCNN(nn.Module):
    """Three conv blocks -> 64-d features (global average pool) -> class logits."""

    def __init__(self, channels: int, classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


def scaled(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # as in training


@torch.no_grad()
def embed(net: SmallCNN, u8: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64) float64, softmax probabilities (N, K))."""
    net.eval()
    feats, probs = [], []
    for i in range(0, len(u8), batch):
        f, logits = net(scaled(u8[i:i + batch]))
        feats.append(f.double().numpy())
        probs.append(torch.softmax(logits, 1).double().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def classifier(out: Path, data_id: str, train: tuple, test: tuple, steps: int = 600) -> tuple[SmallCNN, float]:
    """The feature classifier for this data: loaded from OUT/classifier/ or trained (seeded) and saved."""
    from safetensors.torch import load_file, save_file

    x, y, classes = train
    digest = images_digest(x)[:16]
    path = out / "classifier" / f"{data_id}-{tuple(x.shape[1:])[0]}x{x.shape[-1]}-{digest}.safetensors"
    if path.is_file():
        net = SmallCNN(x.shape[1], len(classes))
        net.load_state_dict(load_file(str(path)))
    else:
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = SmallCNN(x.shape[1], len(classes))  # seeded initialisation
            opt = torch.optim.Adam(net.parameters(), lr=2e-3)
            yt = torch.from_numpy(y)
            net.train()
            for _ in range(steps):
                idx = torch.randint(0, len(x), (128,), generator=g)
                _, logits = net(scaled(x[idx]))
                loss = nn.functional.cross_entropy(logits, yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(net.state_dict(), str(tmp), metadata={"classes": json.dumps(classes), "steps": str(steps)})
        os.replace(tmp, path)
    _, p = embed(net, test[0])
    return net, float((p.argmax(1) == test[1]).mean())


# ----------------------------------------------------------------------------- one (config, seed)


def train_run(args, run_dir: Path, data_source: str, sets: list[str], seed: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "ddpmctl", "train", data_source, "--preset", args.preset, "--seed", str(seed),
           "--out", str(run_dir), "--json", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    if args.budget:
        cmd += ["--time-limit", short_duration(args.budget_s)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def sampler_choices(args) -> list[tuple]:
    """--samplers "ddim:20:0,dpm-solver++:20:1" -> [(name, steps, eta)]; else one (--sampler, --steps, --eta)."""
    if not args.samplers:
        return [(args.sampler, args.steps, args.eta)]
    out = []
    for item in args.samplers.split(","):
        name, _, rest = item.strip().partition(":")
        steps, _, eta = rest.partition(":")
        out.append((name, int(steps) if steps else None, float(eta) if eta else None))
    return out


def score(args, run_dir: Path, net: SmallCNN, real: dict, choice: tuple) -> dict:
    device = choose_device(args.device or "auto")
    den = load_run(run_dir, device=device)
    sampler, steps, eta = run_defaults(den.spec, choice[0])
    if choice[1] is not None:
        steps = choice[1]
    if choice[2] is not None:
        eta = choice[2]
    precision = choose_precision(den.spec.train.precision, device)
    t0 = time.perf_counter()
    out, nfe = [], 0
    for _, imgs, nfe in generate(den, list(range(args.n)), sampler=sampler, steps=steps, eta=eta, device=device,
                                 precision=precision, compile=False):
        out.append(imgs.cpu())
    u8 = torch.cat(out)
    sample_s = time.perf_counter() - t0
    eta_tag = f"-eta{eta:g}" if eta else ""
    save_png(run_dir / f"quality_samples-{sampler}{steps}{eta_tag}.png", make_grid(u8[:64], nrow=8))
    feats, probs = embed(net, u8)
    conf = probs.max(1)
    hist = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
    row = {"parameters": sum(p.numel() for p in den.model.parameters()), "sampler": sampler, "sampler_steps": steps, "eta": eta, "network_evaluations": nfe, "n": len(u8),
           "sample_precision": precision.name, "sample_seconds": round(sample_s, 2),
           "fd": frechet_distance_from_features(feats, *real["stats"]),
           "confidence": float(conf.mean()), "confident_frac": float((conf > 0.9).mean()),
           "class_tv": float(0.5 * np.abs(hist - real["hist"]).sum())}
    if args.data == "shapes" and u8.shape[1] == 3:  # the statistics are defined on RGB
        row["shapes_stats"] = {k: v for k, v in summarise(u8.numpy()).items() if k in SHAPES_STATS}
    return row


# ----------------------------------------------------------------------------- output


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    cols = [("config", "config"), ("seed", "seed"), ("steps", "steps reached"), ("images_seen", "images seen"),
            ("train_seconds", "train s"), ("sampler_label", "sampler"), ("fd", "FD"), ("fd_real_floor", "FD floor"),
            ("confidence", "conf"), ("confident_frac", "conf>0.9"), ("class_tv", "class TV")]
    if any("shapes_stats" in r for r in rows):
        cols += [(k, k) for k in SHAPES_STATS]
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        flat = {**r, **{k: v[0] for k, v in r.get("shapes_stats", {}).items()}}
        print("| " + " | ".join(fmt(flat.get(k)) for k, _ in cols) + " |")
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(f"{r['config']}, {r['sampler_label']}", []).append(r)
    for config, rs in by_config.items():
        if len(rs) > 1:
            parts = []
            for key in ("fd", "confidence", "class_tv"):
                v = np.array([r[key] for r in rs])
                parts.append(f"{key} {v.mean():.3g} ± {v.std(ddof=1):.2g}")
            print(f"\n{config}: {len(rs)} seeds: " + ", ".join(parts) + " (mean ± sd over seeds)")
    r = rows[0]
    m = r["machine"]
    print(f"\nmachine: {m['cpu']} ({m['cores']} cores; avx512f {yn(m['avx512f'])}, avx512_bf16 "
          f"{yn(m['avx512_bf16'])}, amx {yn(m['amx'])}), torch {r['torch']}, {r['threads']} threads, "
          f"train precision {r['precision']}; classifier test accuracy {r['classifier_test_accuracy']:.3f}; "
          f"FD floor: N real training images vs the test split")


def yn(v) -> str:
    return "?" if v is None else "yes" if v else "no"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shapes", help="shapes | digits | FOLDER (FOLDER/{train,test}/CLASS/*.png)")
    ap.add_argument("--preset", help="ddpmctl preset (default: shapes for shapes, mnist otherwise)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.field=value, repeatable")
    ap.add_argument("--budget", help="wall-clock training budget: 120s, 10m, 30m, 1h (train --time-limit)")
    ap.add_argument("--max-steps", type=int, help="optimizer steps (images seen = steps x batch size)")
    ap.add_argument("--n", type=int, default=256, help="images sampled per run (seeds 0..N-1)")
    ap.add_argument("--sampler", help="ddpm | ddim | dpm-solver++ (default: the run's own)")
    ap.add_argument("--steps", type=int, help="sampler steps (default: the run's own for its sampler)")
    ap.add_argument("--eta", type=float, help="sampler eta (default: the run's own for its sampler, else 0)")
    ap.add_argument("--samplers", help="score each run with several samplers, NAME:STEPS:ETA comma-separated "
                    "(e.g. ddim:20:0,ddim:20:1,dpm-solver++:20:1); one row each; overrides --sampler/--steps/--eta")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (e.g. 0,1)")
    ap.add_argument("--label", help="name of this config in the table (default: preset and --set values)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for training and torch threads here")
    ap.add_argument("--device", help="auto | cpu | cuda | mps (passed to train; sampling uses the same)")
    ap.add_argument("--out", type=Path, default=Path("quality_budget"), help="output folder")
    ap.add_argument("--json", action="store_true", help="print the JSON lines instead of the table")
    args = ap.parse_args(argv)
    if not args.budget and not args.max_steps:
        ap.error("give a budget: --budget DURATION and/or --max-steps N")
    args.budget_s = parse_duration(args.budget, "--budget") if args.budget else None
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.preset = args.preset or ("shapes" if args.data == "shapes" else "mnist")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # The data, with the spec's size and channels, as ddpmctl train will see it.
    if args.data == "digits":
        data_dir = write_digits(out / "data" / "digits")
        data_source, data_id = str((data_dir / "train").resolve()), "digits"
        label_root = str(data_dir)
    elif args.data == "shapes":
        data_source, data_id, label_root = "shapes", "shapes", "shapes"
    else:
        data_source, data_id, label_root = str(Path(args.data, "train").resolve()), Path(args.data).name, args.data
    sets = (["train.epochs=100000"] if args.budget and not args.max_steps else []) + BUDGET_SETS + args.sets
    spec = resolve(args.preset, sets=sets)
    size, channels = spec.model.image_size, spec.model.channels
    if args.data != "shapes" and spec.data.flip:
        sets = ["data.flip=false"] + sets  # digits (and most labelled folders) are not mirror-symmetric
        spec = resolve(args.preset, sets=sets)
    train = labelled_split(label_root, "train", size, channels)
    test = labelled_split(label_root, "test", size, channels)
    net, accuracy = classifier(out, data_id, train, test)
    test_feats, _ = embed(net, test[0])
    stats = feature_stats(test_feats)
    floor_idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(0))[:args.n]
    floor_feats, _ = embed(net, train[0][floor_idx])
    real = {"stats": stats, "hist": np.bincount(test[1], minlength=len(train[2])) / len(test[1])}
    fd_floor = frechet_distance_from_features(floor_feats, *stats)

    machine = cpu_info()
    config = args.label or " ".join([args.preset] + args.sets) or args.preset
    budget = " + ".join(x for x in [short_duration(args.budget_s) if args.budget else "",
                                    f"{args.max_steps} steps" if args.max_steps else ""] if x)
    rows = []
    for seed in seeds:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = out / "runs" / f"{data_id}-{args.preset}-seed{seed}-{stamp}"
        result, train_wall = train_run(args, run_dir, data_source, sets, seed)
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config, "seed": seed,
               "data": args.data, "preset": args.preset, "sets": sets, "budget": budget,
               "time_limit_s": args.budget_s, "max_steps": args.max_steps, "run_dir": str(run_dir),
               "steps": result["steps"], "images_seen": result["steps"] * spec.train.batch_size,
               "epochs": result["epochs"], "stopped": result.get("stopped"),
               "train_images_per_s": result.get("images_per_s"), "final_loss": result.get("final_loss"),
               "train_seconds": round(train_wall, 1),
               "precision": choose_precision(spec.train.precision, choose_device(args.device or "auto")).name,
               "threads": args.threads or torch.get_num_threads(),  # the child reads the same OMP_NUM_THREADS
               "torch": torch.__version__, "ddpmctl": ddpmctl.__version__, "machine": machine,
               "classifier_test_accuracy": accuracy, "fd_real_floor": fd_floor,
               "real_test_n": len(test[0])}
        base = row
        for choice in sampler_choices(args):
            row = {**base, **score(args, run_dir, net, real, choice)}
            row["sampler_label"] = f"{row['sampler']} {row['sampler_steps']}" + (f" η={row['eta']:g}" if row["eta"] else "")
            if "shapes_stats" in row:
                row["shapes_stats_real"] = {k: v for k, v in summarise(test[0].numpy()).items() if k in SHAPES_STATS}
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"seed {seed}: {row['steps']} steps in {row['train_seconds']} s, {row['sampler_label']}: "
                      f"FD {row['fd']:.3g} (floor {fd_floor:.3g})", file=sys.stderr, flush=True)
    if not args.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
