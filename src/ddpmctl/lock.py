"""One process per run directory: RUN_DIR/.lock holds the PID of the process training the run.

The lock is an advisory ``flock`` on that file, so the kernel releases it when the holder dies,
even on SIGKILL. A lock file left behind by a dead process is therefore taken over, with a
warning that names the dead PID. Locking is re-entrant within one process (the `resume` command
holds the lock while it rewrites spec.json, then the training loop takes it again).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

from ddpmctl.errors import RunDirError
from ddpmctl.smallfiles import read_text_lenient

LOCK_FILE = ".lock"

try:  # POSIX; elsewhere the lock degrades to an O_EXCL file (no stale-lock detection).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_held: dict[str, list] = {}  # resolved run dir -> [fd, depth]


def _read_owner(path: Path) -> str:
    try:
        return read_text_lenient(path)  # informational only: damaged bytes must not stop a takeover
    except OSError:
        return ""


class RunLock:
    """``with RunLock(run_dir, on_warning):`` — refuses (RunDirError) while another process trains it."""

    def __init__(self, run_dir: Path, on_warning: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.key = str(self.run_dir.resolve())
        self.on_warning = on_warning

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.key in _held:
            _held[self.key][1] += 1
            return
        fd = self._lock_fd()
        _held[self.key] = [fd, 1]

    def _lock_fd(self) -> int:
        for _ in range(10):  # retry when the file is replaced between open() and flock()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunDirError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
            if fcntl is None:  # pragma: no cover
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                owner = _read_owner(self.path)
                raise RunDirError(
                    f"{self.run_dir} is in use by another ddpmctl process ({owner or 'unknown PID'}); "
                    "wait for it to finish or stop it first"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it
                os.close(fd)
                continue
            previous = _read_owner(self.path)
            if previous and self.on_warning:  # a clean release removes the file: its holder died
                self.on_warning(f"taking over the stale lock of a ddpmctl process that is no longer running "
                                f"({previous.split()[0]}) in {self.run_dir}")
            os.ftruncate(fd, 0)
            os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
            os.fsync(fd)
            return fd
        raise RunDirError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        entry = _held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        fd = entry[0]
        del _held[self.key]
        try:
            self.path.unlink(missing_ok=True)  # unlink while still holding the lock, then close
        except OSError:
            pass
        os.close(fd)
