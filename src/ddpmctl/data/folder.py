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


@dataclass
class LocalImages:
    """Candidate images of a folder or archive, ready for :func:`ddpmctl.data.decode.decode_many`."""

    path: Path
    total: int
    items: Callable[[], Iterator[tuple[str, Source]]]
    skipped: Skipped = field(default_factory=Skipped)
    kind: str = "folder"


def scan_folder(folder: Path) -> LocalImages:
    """Every PNG/JPEG/WebP file under ``folder`` (recursively, sorted by relative path)."""
    skipped = Skipped()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            rel = p.relative_to(folder).as_posix()
            if is_image_name(fn):
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
