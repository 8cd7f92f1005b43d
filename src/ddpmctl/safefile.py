"""The one way ddpmctl writes its own files (run dirs, model folders, output folders, data roots).

Two rules, so that nothing outside those folders is ever written through a symbolic link:

- A file changed in place (an append to metrics.jsonl or eval.jsonl, the run lock, a truncation)
  is opened with ``O_NOFOLLOW``: a symlink where ddpmctl expects its own file is refused with a
  :class:`~ddpmctl.errors.SymlinkError` naming it, and its target is never opened.
- A file written whole is written to a new temporary sibling (``O_EXCL | O_NOFOLLOW``, so a link
  planted at the temporary name is refused too), fsynced and renamed over the final name. A rename
  replaces a symlink itself, never the file it points to.

Reading a user's data through symlinks stays allowed.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, TextIO

from ddpmctl.errors import SymlinkError
from ddpmctl.writes import writing

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 on Windows, where creating symlinks needs privileges
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def symlink_error(path: Path | str) -> SymlinkError:
    return SymlinkError(f"{path} is a symbolic link where ddpmctl keeps a file of its own; refusing to write "
                        f"through it (to {os.readlink(path) if os.path.islink(path) else '?'}); remove the link "
                        "and run the command again")


def refuse_symlink(path: Path | str) -> None:
    """Raise SymlinkError when `path` itself is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise symlink_error(path)


def open_owned(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that never follows a symlink at `path` (SymlinkError instead); returns the fd."""
    try:
        return os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):  # EMLINK: FreeBSD
            raise symlink_error(path) from None
        raise


def open_append(path: Path | str) -> TextIO:
    """Open a ddpmctl-owned text file for appending (created if missing), never through a symlink."""
    return os.fdopen(open_owned(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")


def open_update(path: Path | str) -> BinaryIO:
    """Open an existing ddpmctl-owned file for reading and writing in place (``r+b``), never through a symlink."""
    return os.fdopen(open_owned(path, os.O_RDWR), "r+b")


def clear(path: Path | str) -> None:
    """Remove what is at `path` before ddpmctl makes it anew: a symlink itself (never what it points
    to), a file, or a directory tree."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def fsync_dir(path: Path | str) -> None:
    """Make a rename in `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: Path | str) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as f: f.write(...)``: `path` appears whole (fsynced) or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of this PID (or a planted link: unlink removes the link)
    try:
        with writing(path, kept=f"{path.name} is as it was"):  # a full disk: one message (ddpmctl.writes)
            with os.fdopen(open_owned(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to a new temporary sibling, fsync, rename over `path`."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
