"""Prepared datasets on disk: ROOT/NAME/{dataset.json, images_SPLIT.npy}.

* ``images_SPLIT.npy``: a plain NumPy ``.npy`` file holding uint8 (N, C, H, W), read with
  ``allow_pickle=False``;
* ``dataset.json``: where the data came from (source, revision or URL), what was done to it
  (preprocessing), the count per split, size, channels, the sha256 of every array file,
  skip counts, licence note and the ddpmctl version.

A preparation is written into ``ROOT/.tmp-NAME-PID-RANDOM/`` and renamed into place at the
end, so an interrupted preparation never leaves a half-written dataset behind. Raw downloads
are cached under ``ROOT/.cache/`` (hidden folders are never datasets).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from ddpmctl import __version__
from ddpmctl.data.labels import label_file
from ddpmctl.errors import DataError, UsageError
from ddpmctl.outdir import pid_alive
from ddpmctl.smallfiles import read_object, sha256_file
from ddpmctl.writes import WRITE_ERRNOS, as_write_error

FORMAT = "ddpmctl-dataset/1"
INFO_FILE = "dataset.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
_HASH_CHUNK = 8 << 20


def default_data_root() -> Path:
    """``$DDPMCTL_DATA``, else the platform's per-user data folder + ``ddpmctl``."""
    env = os.environ.get("DDPMCTL_DATA")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "ddpmctl"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "ddpmctl"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else home / ".local" / "share") / "ddpmctl"


def resolve_root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else default_data_root()


def cache_dir(root: Path, kind: str) -> Path:
    d = root / ".cache" / kind
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_', '+' or '-' "
            "(at most 100 characters, not starting with '.' or '-')"
        )
    return name


def sanitize_name(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".-_")
    return s[:100] or "dataset"


def array_file(split: str) -> str:
    return f"images_{split}.npy"


# ----------------------------------------------------------------------------- reading


def read_info(ds_dir: Path) -> dict | None:
    p = ds_dir / INFO_FILE
    if not p.is_file():
        return None
    info = read_object(p, expect=f"a ddpmctl dataset description (format {FORMAT})", error=DataError,
                       hint=f"; delete {ds_dir} and download it again")
    if info.get("format") != FORMAT:
        raise DataError(f"{p} is not a ddpmctl dataset description (format {FORMAT}); "
                        f"delete {ds_dir} and download it again")
    return info


def load_array(ds_dir: Path, info: dict, split: str, *, verify: bool = True) -> np.ndarray:
    """Read one split into memory, checking the sha256 recorded in dataset.json while reading."""
    files = info.get("files", {})
    if split not in files:
        raise UsageError(
            f"dataset {info.get('name')!r} has no split {split!r}; it has: {', '.join(sorted(files)) or 'none'}"
        )
    path = ds_dir / files[split]
    expected = info.get("sha256", {}).get(files[split])
    redo = f"delete {ds_dir} and run the download again"
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            header_len = f.tell()
            if dtype != np.uint8 or fortran or len(shape) != 4:
                raise DataError(f"{path} holds {dtype} {shape}, expected uint8 (N, C, H, W); {redo}")
            f.seek(0)
            h.update(f.read(header_len))
            arr = np.empty(shape, dtype=np.uint8)
            flat = memoryview(arr.reshape(-1))
            pos, n = 0, arr.size
            while pos < n:
                got = f.readinto(flat[pos:pos + _HASH_CHUNK])
                if not got:
                    raise DataError(f"{path} is truncated ({pos} of {n} bytes); {redo}")
                h.update(flat[pos:pos + got])
                pos += got
            if f.read(1):
                raise DataError(f"{path} has trailing bytes; {redo}")
    except FileNotFoundError as exc:
        raise DataError(f"{path} is missing; {redo}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; {redo}") from exc
    if verify and expected and h.hexdigest() != expected:
        raise DataError(f"{path} fails its checksum (expected sha256 {expected}, got {h.hexdigest()}); {redo}")
    return arr


def verify_dataset(ds_dir: Path, info: dict) -> bool:
    """True when every array file listed in dataset.json exists and matches its sha256."""
    try:
        for fname in [*info.get("files", {}).values(), *(info.get("labels") or {}).values()]:
            expected = info.get("sha256", {}).get(fname)
            if not expected or sha256_file(ds_dir / fname) != expected:
                return False
    except OSError:
        return False
    return bool(info.get("files"))


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def list_prepared(root: Path | str | None = None) -> list[dict]:
    """One summary dict per prepared dataset under the root, sorted by name."""
    root = resolve_root(root)
    out: list[dict] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            info = read_info(d)
        except DataError as exc:
            out.append({"name": d.name, "path": str(d), "error": str(exc), "bytes": dir_bytes(d)})
            continue
        if info is None:
            continue
        out.append({
            "name": info.get("name", d.name), "path": str(d), "source": info.get("source"),
            "revision": info.get("revision"), "size": info.get("size"), "channels": info.get("channels"),
            "counts": info.get("counts", {}), "count": info.get("count"), "bytes": dir_bytes(d),
            "created": info.get("created"), "licence": info.get("licence"),
        })
    return out


# ----------------------------------------------------------------------------- writing


def clean_stale(root: Path) -> None:
    """Remove temporary folders left by interrupted preparations (dead owner, or older than a day)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        m = re.match(r"^\.(tmp|old)-.+-(\d+)-[0-9a-f]{8}$", d.name)
        if not m or not d.is_dir():
            continue
        try:
            old = time.time() - d.stat().st_mtime > 86400
        except OSError:
            continue
        if old or not pid_alive(int(m.group(2))):
            shutil.rmtree(d, ignore_errors=True)


class PreparedWriter:
    """Writes a dataset into a temporary folder; :meth:`commit` renames it into ROOT/NAME."""

    def __init__(self, root: Path, name: str):
        check_name(name)
        self.root, self.name = root, name
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        self.tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.files: dict[str, str] = {}
        self.sha: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.label_files: dict[str, str] = {}
        self.classes: list[str] | None = None
        self._bufs: dict[str, np.ndarray] = {}
        self.committed = False

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self._bufs.clear()
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        failed = as_write_error(exc, self.root / self.name, self._kept()) if exc is not None else None
        if failed is not None:  # a full disk, a size limit, a read-only root: one message
            raise failed from None

    def _kept(self) -> str:
        final = self.root / self.name
        if final.is_dir():
            return f"nothing was prepared; the dataset already in {final} is as it was"
        return "nothing was prepared (the partial files were removed)"

    def buffer(self, split: str, n: int, channels: int, size: int) -> np.ndarray:
        """A writable (n, C, S, S) uint8 array backed by this split's .npy file (memory-mapped).

        Call :meth:`finish_buffer` after dropping every reference to it.
        """
        if n < 1:
            raise ValueError("a split needs at least one image")
        path = self.tmp / array_file(split)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
        _reserve(path)
        self._bufs[split] = mm
        return mm

    def finish_buffer(self, split: str, count: int, keep_channels: int | None = None) -> None:
        """Keep the split's first ``count`` rows (and ``keep_channels`` channels), then hash the file."""
        path = self.tmp / array_file(split)
        buf = self._bufs.pop(split)
        n, c, s, _ = buf.shape
        buf.flush()
        if count == 0:
            del buf
            path.unlink(missing_ok=True)
            return
        if keep_channels is not None and keep_channels != c:
            small = np.lib.format.open_memmap(self.tmp / "tmp.npy", mode="w+", dtype=np.uint8,
                                              shape=(count, keep_channels, s, s))
            step = 4096
            for i in range(0, count, step):
                j = min(count, i + step)
                small[i:j] = buf[i:j, :keep_channels]
            small.flush()
            del small, buf
            os.replace(self.tmp / "tmp.npy", path)
        else:
            del buf
            if count != n:
                _shrink_npy(path, count)
        self._register(split, path, count)

    def write_array(self, split: str, arr: np.ndarray) -> None:
        path = self.tmp / array_file(split)
        np.save(path, np.ascontiguousarray(arr, dtype=np.uint8), allow_pickle=False)
        self._register(split, path, int(arr.shape[0]))

    def write_labels(self, split: str, labels: np.ndarray, classes: list[str]) -> None:
        """Class labels of the split's images (int64, in array order) and the class names; every split
        of a dataset has the same classes."""
        if self.classes is not None and self.classes != list(classes):
            raise DataError(f"split {split} has classes {list(classes)[:10]}, another split {self.classes[:10]}")
        self.classes = list(classes)
        path = self.tmp / label_file(split)
        np.save(path, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)
        self.label_files[split] = path.name
        self.sha[path.name] = sha256_file(path)

    def _register(self, split: str, path: Path, count: int) -> None:
        self.files[split] = path.name
        self.sha[path.name] = sha256_file(path)
        self.counts[split] = count

    def commit(self, info: dict) -> tuple[Path, dict]:
        info = {
            "format": FORMAT,
            "name": self.name,
            **info,
            "count": sum(self.counts.values()),
            "counts": dict(self.counts),
            "splits": list(self.counts),
            "files": dict(self.files),
            "sha256": dict(self.sha),
            **({"labels": dict(self.label_files), "classes": self.classes} if self.label_files else {}),
            "layout": "uint8 (N, C, H, W), NumPy .npy",
            "ddpmctl_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (self.tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        final = self.root / self.name
        old = None
        if final.exists():
            old = self.root / f".old-{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(self.tmp, final)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final, info


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: on a full disk, writing into a sparse map would
    kill the process with SIGBUS; posix_fallocate fails with ENOSPC (an OSError) instead."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise
        # EOPNOTSUPP/EINVAL: a filesystem without fallocate; the writes below fail as they may
    finally:
        os.close(fd)


def _shrink_npy(path: Path, count: int) -> None:
    """Rewrite the .npy header for ``count`` rows in place and truncate the file."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        header_len = f.tell()
        new_shape = (count, *shape[1:])
        import io

        hdr = io.BytesIO()
        d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": new_shape}
        if version == (1, 0):
            np.lib.format.write_array_header_1_0(hdr, d)
        else:
            np.lib.format.write_array_header_2_0(hdr, d)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        if len(hdr.getvalue()) == header_len:
            f.seek(0)
            f.write(hdr.getvalue())
            f.truncate(header_len + count * row)
            return
    # Header length changed (never with NumPy's growth padding): copy instead.
    src = np.load(path, mmap_mode="r", allow_pickle=False)
    tmp = path.with_suffix(".shrink.npy")
    np.save(tmp, np.ascontiguousarray(src[:count]), allow_pickle=False)
    del src
    os.replace(tmp, path)
