"""Output folders that appear whole or not at all, written by one process at a time.

`check_out_dir` is the one check every ``--out``/``--overwrite`` goes through: a folder is only
replaced when it is an output folder, never a run directory, a model folder (except by
`ddpmctl export`, which writes them), the source being read, the current directory, or a parent
of any of them. `staged_dir` holds the folder's lock (:func:`ddpmctl.lock.out_lock`) while it
writes, so a second writer of the same folder is refused instead of silently replacing the first
one's result.

A writer stages its output under a name that carries its PID (``.OUT.partial-PID``,
``FILE.part-PID``); a signal removes it on the way out (``cli.main`` turns SIGTERM into an
exception like Ctrl-C's), and a SIGKILL's leftover is removed by the next writer of the same
output, once no process of that PID runs on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ddpmctl.errors import UsageError
from ddpmctl.safefile import clear

RUN_MARKER = "spec.json"  # a run directory (ddpmctl.rundir.spec_path, ddpmctl.checkpoint.check_run_dir)
# ddpmctl.modelfolder.CONFIG_FILE, MODEL_FILE (spelled out: importing it would load torch into the data
# commands, which use this module; tests/test_export.py checks they agree)
MODEL_MARKERS = ("config.json", "model.safetensors", "model_index.json")  # ddpmctl and diffusers folders
RUN_PARTS = ("checkpoints", "samples")  # folders a run directory keeps its own files in


def _kind(folder: Path) -> str | None:
    if (folder / RUN_MARKER).is_file():
        return "a run directory"
    if any((folder / m).is_file() for m in MODEL_MARKERS):
        return "a model folder"
    return None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(out: Path, overwrite: bool, *, reading: Iterable[Path | str] = (),
                  model_folder: bool = False) -> None:
    """Refuse (UsageError, exit 2) an `out` that must not be written or replaced.

    `reading`: the local sources the command reads (never replaced, nor any folder holding them).
    `model_folder`: `out` itself may be a model folder (``ddpmctl export`` replaces an earlier export).
    """
    out = Path(out)
    if os.path.islink(out):
        raise UsageError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give the folder itself "
                         "or a new name")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if not out.is_dir():
        return  # a new folder: nothing is replaced
    if any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    # `out` will be replaced: only an output folder may be
    here = out.resolve()
    refuse = f"--out {out} is not replaced:"
    cwd = Path.cwd().resolve()
    if _within(cwd, here):
        raise UsageError(f"{refuse} it is the current directory{'' if here == cwd else ' or a parent of it'}; "
                         "give a new folder for the output")
    for src in reading:
        src_path = Path(src).resolve()
        if _within(src_path, here):
            raise UsageError(f"{refuse} it {'is' if src_path == here else 'holds'} the source being read "
                             f"({src}); give a new folder for the output")
    if here.name in RUN_PARTS and _kind(here.parent) == "a run directory":
        raise UsageError(f"{refuse} it is part of the run directory {out.parent}; give a new folder for the output")
    for dirpath, _dirs, _files in os.walk(here):  # never follows symlinks
        d = Path(dirpath)
        kind = _kind(d)
        ours = d == here or (d.parent == here and (here / "model_index.json").is_file())  # a diffusers folder's unet/
        if kind is not None and not (model_folder and ours and kind == "a model folder"):
            where = "it is" if d == here else f"it holds {d.relative_to(here)}/,"
            raise UsageError(f"{refuse} {where} {kind}, which --overwrite never replaces; give a new folder "
                             "for the output")


def pid_alive(pid: int) -> bool:
    """Whether a process of that PID runs on this machine (this one counts; unknown counts as alive)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        return True  # cannot tell cheaply
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove ``folder/PREFIX<PID>`` files and folders whose PID is no longer running; return them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    for p in entries:
        m = pattern.match(p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


def staging_prefix(out: Path) -> str:
    """The name of ``out``'s staging folders, before the PID."""
    return f".{Path(out).name}.partial-"


@contextmanager
def staged_dir(out: Path, overwrite: bool = False, *, reading: Iterable[Path | str] = (),
               model_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on failure it is removed.

    Holds `out`'s lock meanwhile: a second writer of the same folder exits 2 ("in use by another
    ddpmctl process (pid=...)"). The checks of :func:`check_out_dir` run again under the lock."""
    from ddpmctl.lock import out_lock

    given, out = Path(out), Path(os.path.abspath(out))  # `--out .` has no name to put a sibling beside
    reading = list(reading)
    check_out_dir(given, overwrite, reading=reading, model_folder=model_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        check_out_dir(given, overwrite, reading=reading, model_folder=model_folder)
        remove_stale(out.parent, staging_prefix(out))  # what a killed earlier writer left
        tmp = out.with_name(f"{staging_prefix(out)}{os.getpid()}")
        clear(tmp)
        tmp.mkdir()
        try:
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
