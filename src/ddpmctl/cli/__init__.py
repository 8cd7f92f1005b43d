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
COMMANDS = ["train", "resume", "sample", "grid", "download", "eval", "bench", "export", "hub_push", "demo"]


def _register() -> None:
    for name in COMMANDS:  # a module that fails to import is a bug to see, never a missing command
        importlib.import_module(f"ddpmctl.cli.{name}")


_register()


def main() -> None:
    from rich.markup import escape

    from ddpmctl.cli.common import Terminated, handle_sigterm
    from ddpmctl.errors import DdpmctlError
    from ddpmctl.writes import as_write_error

    handle_sigterm()  # like Ctrl-C: every command's cleanup runs, then exit 143
    try:
        rc = app(standalone_mode=False)
    except DdpmctlError as exc:
        if os.environ.get("DDPMCTL_DEBUG"):
            import traceback

            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Terminated:  # SIGTERM: every cleanup on the way here ran
        err_console.print("terminated", highlight=False)
        sys.exit(Terminated.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:
        failed = as_write_error(exc)  # a failed write that no writer wrapped: still one line, exit 1
        if failed is not None:
            err_console.print(f"[bold red]error:[/] {escape(str(failed))}", highlight=False, soft_wrap=True)
            sys.exit(failed.exit_code)
        # Usage errors of the click that typer bundles: duck-typed, as typer may vendor its own copy.
        name = type(exc).__name__
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # ClickException, UsageError, BadParameter
            exc.show(file=sys.stderr)
            sys.exit(exc.exit_code)
        if name == "Exit":
            sys.exit(getattr(exc, "exit_code", 0))
        if name == "Abort":
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
