"""Local sources: a folder of images (searched recursively) or an archive file."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ddpmctl.data.archive import is_archive, open_archive
from ddpmctl.data.decode import NOT_IMAGE, Skipped, Source, accepted_extensions, is_image_name
from ddpmctl.errors import DataError

OUTSIDE_LINK = "symbolic link pointing outside the folder"  # a skip reason (dataset.json `skipped`)


@dataclass
class LocalImages:
    """Candidate images of a folder or archive, ready for :func:`ddpmctl.data.decode.decode_many`."""

    path: Path
    total: int
    items: Callable[[], Iterator[tuple[str, Source]]]
    skipped: Skipped = field(default_factory=Skipped)
    kind: str = "folder"


def _escapes(p: Path, root: Path) -> bool:
    """Whether the symbolic link ``p`` points outside ``root`` (a resolved path)."""
    try:
        p.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
        return True
    return False


def scan_folder(folder: Path) -> LocalImages:
    """Every PNG/JPEG/WebP file under ``folder`` (recursively, sorted by relative path).

    Symbolic links that stay inside the folder are read like the files they point to; a link that
    points outside it (file or folder) is skipped and counted, so preparing a folder never reads
    files that are not in it (archives refuse such links outright)."""
    skipped = Skipped()
    found: list[tuple[str, Path]] = []
    root = Path(folder).resolve()
    for dirpath, dirnames, filenames in os.walk(folder):  # never descends into linked folders
        for d in dirnames:
            p = Path(dirpath) / d
            if not d.startswith(".") and p.is_symlink() and _escapes(p, root):
                skipped.add(OUTSIDE_LINK, p.relative_to(folder).as_posix())
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink() and _escapes(p, root):
                skipped.add(OUTSIDE_LINK, rel)
            elif is_image_name(fn):
                found.append((rel, p))
            else:
                skipped.add(NOT_IMAGE, rel)
    found.sort(key=lambda t: t[0])

    def items() -> Iterator[tuple[str, Source]]:
        for rel, p in found:
            yield rel, str(p)

    return LocalImages(folder, len(found), items, skipped, "folder")


def open_local(path: Path) -> LocalImages:
    """A folder or an archive file, checked and listed (no decoding yet)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return scan_folder(path)
    if path.is_file() and is_archive(path):
        arch = open_archive(path)
        return LocalImages(path, arch.total, arch.items, arch.skipped, "archive")
    if path.is_file():
        raise DataError(f"{path} is neither a folder nor an archive (.zip, .tar, .tar.gz)")
    raise DataError(f"no such folder or archive: {path}")


def no_images_error(local: LocalImages, skipped: Skipped | None = None) -> DataError:
    what = "folder" if local.kind == "folder" else "archive"
    sk = skipped or local.skipped
    detail = ""
    if sk.total:
        detail = "; skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(sk.counts.items()))
    return DataError(
        f"no usable image in {what} {local.path} (accepted: {accepted_extensions()}, searched recursively)"
        + detail
    )


def fingerprint(path: Path) -> str:
    """A cheap identity for a local source: the sha256 of an archive, or of a folder's file listing."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()
