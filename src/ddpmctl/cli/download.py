"""`ddpmctl download`: fetch and prepare a dataset, or list the prepared ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ddpmctl.cli.common import JsonOpt, QuietOpt, app, info, out_console, print_json
from ddpmctl.cli.progress import ProgressView
from ddpmctl.units import human_bytes
from ddpmctl.errors import UsageError


def _list(root: Optional[Path], as_json: bool) -> None:
    from ddpmctl.data import KNOWN, list_prepared
    from ddpmctl.data.prepared import dir_bytes, resolve_root

    r = resolve_root(root)
    rows = list_prepared(r)
    cache = r / ".cache"
    cache_bytes = dir_bytes(cache) if cache.is_dir() else 0
    if as_json:
        print_json({"root": str(r), "datasets": rows, "cache_bytes": cache_bytes, "downloadable": list(KNOWN)})
        return
    if not rows:
        out_console.print(escape(f"no prepared datasets under {r}"))
    else:
        from rich.table import Table

        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("name", "count", "size", "channels", "disk", "source"):
            t.add_column(col, justify="right" if col in ("count", "size", "channels", "disk") else "left")
        for d in rows:
            if "error" in d:
                t.add_row(escape(d["name"]), "-", "-", "-", human_bytes(d["bytes"]), f"[red]{escape(d['error'])}[/]")
                continue
            counts = " / ".join(f"{s} {n}" for s, n in d["counts"].items())
            t.add_row(escape(d["name"]), escape(counts), f"{d['size']}x{d['size']}", str(d["channels"]),
                      human_bytes(d["bytes"]), escape(str(d["source"])))
        out_console.print(t)
    info(escape(f"data root {r}; raw download cache {human_bytes(cache_bytes)} in {cache}"))
    info(f"downloadable by name: {', '.join(KNOWN)}")


@app.command()
def download(
    source: Annotated[Optional[str], typer.Argument(
        help="mnist | fashion-mnist | cifar10 | celeba | celeba-hq | hf://datasets/OWNER/NAME@REV | "
             "https://.../file.zip | ./folder | ./file.zip", show_default=False)] = None,
    root: Annotated[Optional[Path], typer.Option(
        "--root", help="Data root (default: $DDPMCTL_DATA, else the per-user data folder).")] = None,
    size: Annotated[Optional[int], typer.Option(
        "--size", help="Prepared image size in pixels (default: native for mnist/cifar10, 64 otherwise).")] = None,
    channels: Annotated[Optional[int], typer.Option(
        "--channels", help="1 or 3 (default: 3 unless every image is grayscale).")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Only this split (hf:// and named datasets); the split to store a folder/archive as.")] = None,
    column: Annotated[Optional[str], typer.Option(
        "--column", help="Image column of a parquet dataset (default: found automatically).")] = None,
    label_column: Annotated[Optional[str], typer.Option(
        "--label-column", help="Class column of an hf:// parquet dataset, kept as labels for --conditional "
                               "training (default: its ClassLabel feature, if it has one).")] = None,
    sha256: Annotated[Optional[str], typer.Option(
        "--sha256", help="Expected SHA-256 of an https:// download (required for URLs).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Name to prepare it under (default: derived from the source).")] = None,
    crop: Annotated[Optional[str], typer.Option(
        "--crop", help="celeba only: ddim (default; 128x128 box at x=25..153, y=57..185) or center140.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if already prepared.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the prepared datasets and exit.")] = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Download and prepare a dataset once, so training starts at once.

    Examples:

      ddpmctl download cifar10

      ddpmctl download celeba-hq --size 128

      ddpmctl download hf://datasets/OWNER/NAME --split train

      ddpmctl download https://example.org/faces.zip --sha256 HEX --name faces

      ddpmctl download ./my_photos --size 64

      ddpmctl download --list --json
    """
    if list_:
        if source:
            raise UsageError("--list takes no dataset argument")
        _list(root, json_)
        return
    if not source:
        raise UsageError("give a dataset to download (e.g. `ddpmctl download cifar10`) or --list")
    from ddpmctl.data import download as do_download

    t0 = time.perf_counter()
    with ProgressView(quiet) as progress:
        res = do_download(source, root=root, name=name, size=size, channels=channels, split=split, column=column,
                          sha256=sha256, crop=crop, force=force, on_event=progress, label_column=label_column)
    summary = res.summary()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if json_:
        print_json(summary)
        return
    counts = ", ".join(f"{s} {n}" for s, n in summary["counts"].items())
    skipped = sum(summary["skipped"].values())
    state = "already prepared" if res.already_prepared else "prepared"
    out_console.print(escape(
        f"{state} {res.name}: {counts} images, {summary['size']}x{summary['size']}x{summary['channels']}, "
        f"{human_bytes(summary['bytes'])} in {res.path}" + (f" ({skipped} files skipped)" if skipped else ""))
    )
