"""Output folders that appear whole or not at all, written by one process at a time.

`check_out_dir` is the one check every ``--out``/``--overwrite`` goes through: a folder is only
replaced when it is an output folder, never a run directory, a model folder (except by
`ddpmctl export`, which writes them), the source being read, the current directory, or a parent
of any of them. `staged_dir` holds the folder's lock (:func:`ddpmctl.lock.out_lock`) while it
writes, so a second writer of the same folder is refused instead of silently replacing the first
one's result.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ddpmctl.errors import UsageError
from ddpmctl.safefile import clear

RUN_MARKER = "spec.json"  # ddpmctl.checkpoint.check_run_dir
MODEL_MARKERS = ("config.json", "model.safetensors")  # ddpmctl.hub.CONFIG_FILE, MODEL_FILE
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
        if kind is not None and not (model_folder and d == here and kind == "a model folder"):
            where = "it is" if d == here else f"it holds {d.relative_to(here)}/,"
            raise UsageError(f"{refuse} {where} {kind}, which --overwrite never replaces; give a new folder "
                             "for the output")


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
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
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
