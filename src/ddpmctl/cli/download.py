"""`ddpmctl download`: fetch and prepare a dataset, or list the prepared ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ddpmctl.cli.common import JsonOpt, app, err_console, info, out_console, print_json, warn
from ddpmctl.errors import UsageError

PLAIN_EVERY_S = 5.0  # plain progress lines when stderr is not a terminal


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class DataProgress:
    """Renders ddpmctl.data events on stderr: rich progress bars on a terminal, plain lines otherwise.

    Usable by any command that loads data: ``with DataProgress() as on_event: load_images(..., on_event=on_event)``.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.live = err_console.is_terminal and not quiet
        self.progress = None
        self.tasks: dict = {}
        self.last_plain: dict = {}

    def __enter__(self) -> "DataProgress":
        if self.live:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                console=err_console, transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    @staticmethod
    def _describe(ev: dict) -> tuple[str, str]:
        unit = ev.get("unit", "images")
        label = ev.get("stage", "prepare") + (f" {ev['split']}" if ev.get("split") else "")
        rate = ev.get(f"{unit}_per_s") or 0.0
        if unit == "bytes":
            done = f"{_human_bytes(ev.get('done'))}/{_human_bytes(ev.get('total'))}"
            return label, f"{done} · {_human_bytes(rate)}/s"
        total = ev.get("total")
        return label, f"{ev.get('done', 0)}/{total if total is not None else '?'} {unit} · {rate:,.0f} {unit}/s"

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "progress":
            if self.quiet:
                return
            key = (ev.get("stage"), ev.get("split"), ev.get("source"))
            label, detail = self._describe(ev)
            if self.progress is not None:
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(label, total=ev.get("total"), detail="")
                self.progress.update(self.tasks[key], completed=ev.get("done", 0), total=ev.get("total"),
                                     detail=detail)
                return
            now = time.monotonic()
            first = key not in self.last_plain
            if first or ev.get("final") or now - self.last_plain[key] >= PLAIN_EVERY_S:
                if first and not ev.get("done") and not ev.get("final"):
                    self.last_plain[key] = now
                    return
                self.last_plain[key] = now
                info(escape(f"{label}: {detail}" + (" (done)" if ev.get("final") else "")))
            return
        if kind == "skipped":
            warn(escape(ev.get("message") or f"skipped {ev.get('count')} file(s): {ev.get('reason')}"))
        elif kind in ("download", "convert", "message"):
            if not self.quiet or kind == "download":
                info(escape(ev.get("message", "")))
        elif ev.get("message"):
            info(escape(ev["message"]))


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
                t.add_row(escape(d["name"]), "-", "-", "-", _human_bytes(d["bytes"]), f"[red]{escape(d['error'])}[/]")
                continue
            counts = " / ".join(f"{s} {n}" for s, n in d["counts"].items())
            t.add_row(escape(d["name"]), escape(counts), f"{d['size']}x{d['size']}", str(d["channels"]),
                      _human_bytes(d["bytes"]), escape(str(d["source"])))
        out_console.print(t)
    info(escape(f"data root {r}; raw download cache {_human_bytes(cache_bytes)} in {cache}"))
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
    sha256: Annotated[Optional[str], typer.Option(
        "--sha256", help="Expected SHA-256 of an https:// download (required for URLs).")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Name to prepare it under (default: derived from the source).")] = None,
    crop: Annotated[Optional[str], typer.Option(
        "--crop", help="celeba only: ddim (default; 128x128 box at x=25..153, y=57..185) or center140.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Prepare again even if already prepared.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the prepared datasets and exit.")] = False,
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
    with DataProgress(quiet=False) as progress:
        res = do_download(source, root=root, name=name, size=size, channels=channels, split=split, column=column,
                          sha256=sha256, crop=crop, force=force, on_event=progress)
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
        f"{_human_bytes(summary['bytes'])} in {res.path}" + (f" ({skipped} files skipped)" if skipped else ""))
    )
