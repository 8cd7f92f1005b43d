"""`ddpmctl demo`: serve a local web page that draws images from a model (optional `demo` extra)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import PRECISION_HELP, DeviceOpt, app, command_device, info, warn

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command(epilog="Examples:\n\n  ddpmctl demo\n\n"
                    "  ddpmctl demo runs/shapes-20261126-101500 --port 8000\n\n"
                    "  ddpmctl demo hf:me/shapes-ddpm --max-work 2000\n\n"
                    "Needs the optional [demo] extra: pip install '.[demo]' in the ddpmctl checkout, or pipx inject ddpmctl 'gradio>=6,<7'")
def demo(
    source: Annotated[Optional[str], typer.Argument(help="Run directory, model folder, diffusers folder or hf:OWNER/NAME[@REV] "
                                                         "(default: the newest run under ./runs).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 lets other machines in.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 7860,
    share: Annotated[bool, typer.Option("--share", help="Also open a public link through Gradio's share "
                                                        "servers (anyone with it can use your device).")] = False,
    max_work: Annotated[int, typer.Option(min=1, help="Refuse requests over this many images × steps.")] = 4000,
    max_images: Annotated[int, typer.Option(min=1, max=256, help="Most images per request.")] = 16,
    queue_size: Annotated[int, typer.Option(min=1, help="Requests that may wait; more are told the queue "
                                                        "is full.")] = 8,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    device: DeviceOpt = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
) -> None:
    """Serve a web page to generate images and watch the reverse process (Ctrl-C stops it)."""
    from ddpmctl.demo import Limits, build_app, launch, require_gradio

    require_gradio()  # before loading anything: without the extra, exit 1 with the install command
    from ddpmctl.devices import choose_precision
    from ddpmctl.modelfolder import load_source

    dev = command_device(device)
    prec = choose_precision(precision, dev)
    den = load_source(source, use_ema=not no_ema, device=dev, on_warning=info)
    # The flags that change the pixels, for the `ddpmctl sample` command shown under the images.
    sample_args = (["--no-ema"] if no_ema else []) + (["--device", device] if device else []) \
        + (["--precision", precision] if precision != "auto" else [])
    web = build_app(den, device=dev, precision=prec, source=source or den.source, sample_args=sample_args,
                    limits=Limits(max_work=max_work, max_images=max_images, queue_size=queue_size))
    if host not in LOOPBACK:
        warn(f"serving on {host}: anyone who can reach this machine can generate images on it")
    url = launch(web, host=host, port=port, share=share)
    info(f"serving {den.source} ({den.checkpoint}, {den.weights} weights) at {url} · Ctrl-C stops")
    if web.share_url:
        info(f"public link: {web.share_url}")
    print(url, flush=True)
    try:
        while web.is_running:  # until Ctrl-C (main() turns it into exit 130)
            time.sleep(0.2)
    finally:
        web.close(verbose=False)
