"""Output folders that appear whole or not at all, and the cleanup of what a killed writer left.

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
from typing import Iterator

from ddpmctl.errors import UsageError


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")


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
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, staging_prefix(out))  # what a killed earlier writer left
    tmp = out.with_name(f"{staging_prefix(out)}{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
