"""Write failures as one message: a full disk, a file-size or quota limit, a read-only or forbidden place.

Every writer (checkpoints, images, eval.jsonl, metrics.jsonl, prepared data, downloads, exports)
runs its writes under :func:`writing`, which turns an ``OSError`` with one of :data:`WRITE_ERRNOS`
(or a safetensors ``SafetensorError`` wrapping one, which has no ``errno``) into a
:class:`WriteError` that names the path and what was kept. Writers nest: the outermost one that
knows what was kept (e.g. "the newest complete checkpoint step_N is intact") words the message,
keeping the inner reason. ``cli.main`` maps any such error that escaped every writer the same way.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from ddpmctl.errors import DdpmctlError

WRITE_ERRNOS = {  # errno -> what to add to the system's own words (os.strerror)
    errno.ENOSPC: "",
    errno.EFBIG: " (a file-size limit such as `ulimit -f`, or the filesystem's largest file)",
    errno.EDQUOT: "",
    errno.EROFS: "",
    errno.EACCES: "",
}
_SAFETENSORS_OS_ERROR = re.compile(r"os error (\d+)")  # SafetensorError('... I/O error: ... (os error 27)')

Kept = Union[str, Callable[[], str], None]


class WriteError(DdpmctlError):
    """A write failed for lack of room or permission. ``exit_code`` 1; nothing half-written is kept."""

    def __init__(self, path: Path | str | None, reason: str, kept: str | None = None):
        self.path, self.reason, self.kept = path, reason, kept
        where = f"could not write {path}" if path is not None else "a write failed"
        then = kept or "nothing partial was kept"
        super().__init__(f"{where}: {reason}; {then}. Free some space (or fix the permission) and run the "
                         "same command again")


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: ``OSError.errno``, or the one a SafetensorError's text carries."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        m = _SAFETENSORS_OS_ERROR.search(str(exc))
        return int(m.group(1)) if m else None
    return None


def as_write_error(exc: BaseException, path: Path | str | None = None, kept: str | None = None) -> WriteError | None:
    """``exc`` as a :class:`WriteError` (``path`` and ``kept`` win over what an inner writer said),
    or None when it is not a write failure of :data:`WRITE_ERRNOS`."""
    if isinstance(exc, WriteError):
        return WriteError(path if path is not None else exc.path, exc.reason, kept or exc.kept)
    code = write_errno(exc)
    if code not in WRITE_ERRNOS:
        return None
    if path is None and isinstance(exc, OSError):
        path = exc.filename
    return WriteError(path, os.strerror(code) + WRITE_ERRNOS[code], kept)


@contextmanager
def writing(path: Path | str, kept: Kept = None, undo: Callable[[], None] | None = None,
            error: type[WriteError] = WriteError) -> Iterator[None]:
    """Run a writer's writes; a write failure becomes one :class:`WriteError` naming ``path``.

    ``kept``: what is intact (text, or a function called at failure time); ``undo``: called first to
    remove or roll back what was half-written (its own errors are ignored); ``error``: a subclass
    of WriteError to raise (e.g. one that is also a CheckpointError). Other errors pass."""
    try:
        yield
    except Exception as exc:
        err = as_write_error(exc, path)
        if err is None:
            raise
        if undo is not None:
            try:
                undo()
            except Exception:  # noqa: BLE001 - the write error is the one to report
                pass
        said = kept() if callable(kept) else kept
        raise error(err.path, err.reason, said or err.kept) from None


def append_bytes(path: Path, data: bytes, *, fsync: bool = False, kept: Kept = None) -> int:
    """Append ``data`` to ``path`` whole or not at all; return the file's new length.

    Unbuffered, so a failed write leaves nothing queued to be flushed at close: on a write failure
    the file is truncated back to its old length (no torn line) and :class:`WriteError` says so."""
    from ddpmctl.safefile import open_owned  # never through a symlink

    path = Path(path)
    with os.fdopen(open_owned(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", buffering=0) as f:
        start = f.seek(0, 2)
        with writing(path, kept=kept or f"{path.name} keeps its earlier records", undo=lambda: f.truncate(start)):
            view = memoryview(data)
            while view:
                view = view[f.write(view):]  # a short write (a limit reached) is followed by the error
            if fsync:
                os.fsync(f.fileno())
        return f.tell()
