"""The command line. The only package that imports typer and rich.

Each subcommand lives in its own module and registers itself on ``app``.
``main()`` turns every ``DdpmctlError`` into one line on stderr and an exit code
(2 usage, 1 runtime, 130/143 signals); ``DDPMCTL_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from ddpmctl.cli.common import app, err_console

# Subcommand modules, in the order `ddpmctl --help` lists them.
COMMANDS = ["train", "resume", "sample", "grid", "download", "eval", "bench", "export", "hub_push"]


def _register() -> None:
    for name in COMMANDS:
        try:
            importlib.import_module(f"ddpmctl.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet
            if exc.name != f"ddpmctl.cli.{name}":
                raise


_register()


def main() -> None:
    from ddpmctl.errors import DdpmctlError

    try:
        app(standalone_mode=False)
    except DdpmctlError as exc:
        if os.environ.get("DDPMCTL_DEBUG"):
            import traceback

            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show(file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
