"""`ddpmctl hub-push`: publish a run (exported on the fly) or a model folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ddpmctl.cli.common import DeviceOpt, JsonOpt, app, command_device, info, print_json
from ddpmctl.cli.export import Dtype
from ddpmctl.units import human_bytes


@app.command("hub-push",
             epilog="Examples:\n\n  ddpmctl hub-push --dry-run\n\n"
                    "  ddpmctl hub-push runs/shapes-20261126-101500 --repo-id me/shapes-ddpm --private\n\n"
                    "  ddpmctl hub-push runs/shapes-20261126-101500/export --revision v2 --commit-message 'retrained'\n\n"
                    "  ddpmctl hub-push runs/shapes-20261126-101500 --format diffusers --repo-id me/shapes-diffusers\n\n"
                    "  ddpmctl sample hf:me/shapes-ddpm --n 16 --out samples/")
def hub_push(
    source: Annotated[Optional[Path], typer.Argument(help="Run directory (exported first), model folder or diffusers folder "
                                                          "(default: the newest run under ./runs).")] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="OWNER/NAME (default: the run's name in "
                                                                     "the token owner's namespace).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to commit to (created if needed).")] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit message.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the repo id, files and card; no network, "
                                                            "no upload.")] = False,
    dtype: Annotated[Dtype, typer.Option(help="Weight dtype when exporting a run.")] = "fp32",
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Export a run's raw weights instead of the EMA.")]
    = False,
    license: Annotated[str, typer.Option(help="License in the card when exporting a run.")] = "mit",
    format: Annotated[Optional[Literal["ddpmctl", "diffusers"]], typer.Option(
        "--format", help="A run's export format: ddpmctl (default) or diffusers (a DDPMPipeline folder, "
                         "ddpmctl export --format diffusers). A folder is pushed in its own format.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model folder to the Hub in one commit and print its URL.

    The token comes from HF_TOKEN or `hf auth login`.

    A run directory is exported into a temporary folder first; nothing is written into the run.
    """
    from ddpmctl.push import push

    dev = command_device(device)
    res = push(source, repo_id=repo_id, private=private, revision=revision, commit_message=commit_message,
               dry_run=dry_run, dtype=dtype, use_ema=not no_ema, license=license, device=dev, on_warning=info,
               format=format)
    if as_json:
        print_json(res.to_dict())
        return
    if dry_run:
        print(f"repo: {res.repo_id}" + ("" if res.owner_resolved else "  (owner: the token's user, "
                                                                     "resolved when pushing)"))
        if res.revision:
            print(f"revision: {res.revision}")
        print("files:")
        for name, size in res.files.items():
            print(f"  {name}  {human_bytes(size)}")
        print("card (README.md):")
        print(res.card)
        info("dry run: nothing was uploaded")
        return
    info(f"pushed {len(res.files)} files to {res.repo_id} in one commit"
         + (f" on {res.revision}" if res.revision else "") + (f": {res.commit_url}" if res.commit_url else ""))
    print(res.url)
