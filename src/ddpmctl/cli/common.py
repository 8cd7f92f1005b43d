"""Shared pieces of the CLI: the app, the consoles, option aliases, output helpers."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ddpmctl import __version__
from ddpmctl.sampler_registry import SamplerName, sampler_help

# Results go to stdout; messages, progress and errors to stderr.
out_console = Console(highlight=False, soft_wrap=True)  # sys.stdout, looked up at each write
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # sys.stderr, looked up at each write


def _version(value: bool) -> None:
    if value:
        print(f"ddpmctl {__version__}")
        raise typer.Exit(0)


class _PlainHelp:
    """What every command's --help shows, fixed in one place: help texts are literal (rich markup is
    escaped, so ``pip install '.[onnx]'`` keeps its brackets), flags show no ``<bool>``, and the usage
    line names arguments in capitals (``DATA``, ``[SOURCE]``), not ``{data}``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from rich.markup import escape

        super().__init__(*args, **kwargs)
        for attr in ("help", "epilog", "short_help"):
            if getattr(self, attr, None):
                setattr(self, attr, escape(getattr(self, attr)))
        for param in self.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
            if isinstance(param, TyperArgument) and param.metavar is None:
                param.metavar = param.name.upper()
            _no_bool(param)

    def get_help_option(self, ctx):  # created lazily by click
        option = super().get_help_option(ctx)
        if option is not None:
            _no_bool(option)
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or param.name.upper()
                pieces.append((name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        if hasattr(self, "subcommand_metavar"):
            pieces.append(self.subcommand_metavar)
        return pieces


def _no_bool(param) -> None:
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # typer's rich help would print <bool> for a flag


class Command(_PlainHelp, TyperCommand):
    pass


class Group(_PlainHelp, TyperGroup):
    pass


class App(typer.Typer):
    """Every command made with ``app.command`` is a :class:`Command`."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or Command, **kwargs)


EXAMPLES = (
    "Examples:\n\n"
    "  ddpmctl train shapes   (a first model in minutes on a CPU)\n\n"
    "  ddpmctl sample --n 16 --out samples/   (the newest run under ./runs)\n\n"
    "  ddpmctl grid runs/shapes-20261126-101500 --evolution --out evolution.png\n\n"
    "  ddpmctl train cifar10 --dry-run   (spec, parameters, memory and time estimate; writes nothing)\n\n"
    "  ddpmctl eval   (bits/dim of the newest run)\n\n"
    "  ddpmctl export --out my-model/   (then: ddpmctl demo my-model/)"
)

app = App(
    name="ddpmctl",
    help="Train Denoising Diffusion Probabilistic Models on image datasets and sample from them.",
    epilog=EXAMPLES,
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Train DDPMs and sample from them. Run `ddpmctl COMMAND --help` for examples."""


# Option aliases shared by several commands.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (machine-readable).")]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")
]
PRECISION_HELP = ("auto | fp32 | bf16 | fp16 (auto: bf16 where the device computes it natively: CUDA, CPUs with "
                  "AVX512-BF16 or AMX; else fp32).")
# --sampler: the registry's names and summaries (sample, grid, eval); None = the command's default
SamplerOpt = Annotated[Optional[SamplerName], typer.Option(
    "--sampler", help=f"{sampler_help()} (default: the run's spec.sample.sampler).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or progress lines (without a "
                                       "terminal a line comes at least every 30 s otherwise); warnings and errors "
                                       "still show.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out", help="Output path.")]


def info(msg: str) -> None:
    """A message for the user on stderr."""
    err_console.print(msg, highlight=False)


def warn(msg: str) -> None:
    """A warning on stderr; ``msg`` is rich markup (callers escape text that is not)."""
    err_console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def error(msg: str) -> None:
    """An error line on stderr, formatted as main() formats a DdpmctlError."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def command_device(name: Optional[str], *, deterministic: bool = False, backend: bool = True):
    """The one place a command resolves its --device (``ddpmctl.devices.resolve``: None is auto) into
    the ``torch.device`` it hands the library, and sets the process's backend flags
    (``ddpmctl.devices.set_fast_math``) for it. ``backend=False`` for train, resume and bench: training's
    setup sets them from the run's ``train.deterministic`` (for library callers too), and bench sets them
    as training does."""
    from ddpmctl.devices import resolve, set_fast_math

    device = resolve(name)
    if backend:
        set_fast_math(device, deterministic)
    return device


def print_json(obj: Any) -> None:
    """One JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")
    sys.stdout.flush()


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread wherever it is, so that every ``finally`` and cleanup runs
    on the way out (staged ``.OUT.partial-PID`` folders, download ``.part-PID`` files, the demo
    server) as it does for Ctrl-C; the process then exits 143 (main() adds one line, "terminated").
    A SystemExit, not a KeyboardInterrupt: typer would turn that into a plain exit 130, and no
    ``except Exception`` in between mistakes it for a failure. Training catches SIGTERM itself
    (``cli.progress.signals_to``: finish the step, checkpoint, stop) and restores this afterwards."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self) -> None:
        super().__init__(self.exit_code)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _terminated_in_a_finalizer(unraisable, previous=sys.unraisablehook) -> None:
    """A SIGTERM that arrived while a finalizer or weakref callback ran raised :class:`Terminated` there,
    where Python cannot propagate it (it would print "Exception ignored ... Traceback" and go on): raise
    it again 10 ms later (SIGALRM, which ddpmctl uses for nothing else), once the finalizer is done, so the
    exit takes its usual path."""
    if isinstance(unraisable.exc_value, Terminated):  # (raise_signal here would run the handler at once)
        signal.signal(signal.SIGALRM, _raise_terminated)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    previous(unraisable)


def handle_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` (main thread only; elsewhere nothing changes)."""
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals are the host program's business
        return
    sys.unraisablehook = _terminated_in_a_finalizer


def parse_classes(spec, text: str) -> list[int]:
    """`--class` values -> class indices: a name, an index, a comma-separated list of either, or ``all``."""
    from ddpmctl.errors import UsageError

    names = list(spec.model.classes)
    if not spec.model.num_classes:
        raise UsageError("--class needs a class-conditional model; this one is unconditional "
                         "(train one with --conditional)")
    accepted = f"accepted: all, 0..{len(names) - 1}, or a name: {', '.join(names[:20])}" + (
        ", ..." if len(names) > 20 else "")
    if text.strip() == "all":
        return list(range(len(names)))
    out = []
    for part in text.split(","):
        p = part.strip()
        if p in names:
            out.append(names.index(p))
        elif p.isdigit() and int(p) < len(names):
            out.append(int(p))
        else:
            raise UsageError(f"unknown class {p!r}; {accepted}")
    return out
