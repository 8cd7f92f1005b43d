"""Reading images out of .zip / .tar / .tar.gz (.tgz, .tar.bz2, .tar.xz) archives, safely.

Archives are read in place and never extracted, so nothing can be written anywhere. Every
entry is still checked before the first image is decoded, and an archive with an entry that
*would* escape its folder when extracted (absolute path, drive letter, ``..`` component, or a
symbolic/hard link pointing outside) is refused as a whole: such an archive is malformed or
hostile and its contents are not trusted. Links that stay inside, directories, device files
and non-image files are skipped and counted.
"""

from __future__ import annotations

import posixpath
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ddpmctl.data.decode import NOT_IMAGE, Skipped, Source, is_image_name
from ddpmctl.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_MEMBER_BYTES = 256 << 20  # larger entries are skipped (no dataset image is that big)
TOO_LARGE = f"entry larger than {MAX_MEMBER_BYTES >> 20} MiB"
LINK = "link inside the archive"
SPECIAL = "not a regular file"
ENCRYPTED = "encrypted entry"


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | Path) -> str:
    name = Path(path).name
    for suf in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def _refuse(archive: Path, entry: str, why: str) -> DataError:
    return DataError(
        f"refusing archive {archive}: entry {entry!r} {why}; an archive must only contain paths inside "
        "its own folder. Nothing was extracted or prepared."
    )


def _unsafe_path(name: str) -> str | None:
    """Why ``name`` would escape the extraction folder, or None when it is safe."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return "has an absolute path"
    if ".." in n.split("/"):
        return "has a '..' component (path traversal)"
    if "\x00" in n:
        return "has a NUL byte in its name"
    return None


def _link_escapes(member_name: str, target: str, *, relative_to_member: bool) -> bool:
    t = target.replace("\\", "/")
    if not t or t.startswith("/") or re.match(r"^[A-Za-z]:", t):
        return True
    base = posixpath.dirname(member_name.replace("\\", "/")) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, t))
    return resolved == ".." or resolved.startswith("../") or resolved.startswith("/")


@dataclass
class ArchiveImages:
    """The images of one archive: ``total`` candidates, ``skipped`` counts, and :meth:`items`."""

    path: Path
    total: int
    skipped: Skipped = field(default_factory=Skipped)
    _names: list = field(default_factory=list, repr=False)
    _kind: str = "zip"

    def items(self) -> Iterator[tuple[str, Source]]:
        """Yield ``(entry name, bytes)`` for every candidate image, reading the archive once, in order."""
        if self._kind == "zip":
            with zipfile.ZipFile(self.path) as zf:
                for info in self._names:
                    try:
                        data = zf.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
                        data = b""  # undecodable: the decoder counts it
                    yield info.filename, data
        else:
            wanted = {m.offset for m in self._names}
            try:
                with tarfile.open(self.path, "r:*") as tf:
                    for m in tf:  # one sequential pass, so .tar.gz is decompressed once
                        if m.offset not in wanted or not m.isfile():
                            continue
                        try:
                            f = tf.extractfile(m)
                            data = f.read() if f is not None else b""
                        except (tarfile.TarError, OSError, EOFError):
                            data = b""
                        yield m.name, data
            except (tarfile.TarError, OSError, EOFError):
                return  # a truncated archive: the images not yielded count as missing


def open_archive(path: Path) -> ArchiveImages:
    """List and check every entry of an archive (raises :class:`DataError` on unsafe entries)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"archive {path} does not exist")
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return _open_zip(path)
    if lower.endswith(ARCHIVE_SUFFIXES):
        return _open_tar(path)
    if zipfile.is_zipfile(path):  # no telling suffix (a download URL): sniff the content
        return _open_zip(path)
    try:
        is_tar = tarfile.is_tarfile(path)
    except (OSError, EOFError):
        is_tar = False
    if is_tar:
        return _open_tar(path)
    raise DataError(f"{path} is not a zip or tar archive")


def _open_zip(path: Path) -> ArchiveImages:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip archive: {exc}") from exc
    skipped = Skipped()
    keep = []
    with zf:
        for info in zf.infolist():
            name = info.filename
            why = _unsafe_path(name)
            if why:
                raise _refuse(path, name, why)
            mode = (info.external_attr >> 16) & 0o177777
            if stat.S_ISLNK(mode):
                target = zf.read(info).decode("utf-8", "replace")
                if _link_escapes(name, target, relative_to_member=True):
                    raise _refuse(path, name, f"is a symbolic link to {target!r}, outside the archive")
                skipped.add(LINK, name)
                continue
            if info.is_dir():
                continue
            if not is_image_name(name):
                skipped.add(NOT_IMAGE, name)
            elif info.flag_bits & 0x1:
                skipped.add(ENCRYPTED, name)
            elif info.file_size > MAX_MEMBER_BYTES:
                skipped.add(TOO_LARGE, name)
            else:
                keep.append(info)
    keep.sort(key=lambda i: i.filename)
    return ArchiveImages(path, len(keep), skipped, keep, "zip")


def _open_tar(path: Path) -> ArchiveImages:
    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable tar archive: {exc}") from exc
    skipped = Skipped()
    keep = []
    try:
        with tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is truncated or corrupt: {exc}") from exc
    for m in members:
        why = _unsafe_path(m.name)
        if why:
            raise _refuse(path, m.name, why)
        if m.issym():
            if _link_escapes(m.name, m.linkname, relative_to_member=True):
                raise _refuse(path, m.name, f"is a symbolic link to {m.linkname!r}, outside the archive")
            skipped.add(LINK, m.name)
        elif m.islnk():
            if _link_escapes(m.name, m.linkname, relative_to_member=False):
                raise _refuse(path, m.name, f"is a hard link to {m.linkname!r}, outside the archive")
            skipped.add(LINK, m.name)
        elif m.isdir():
            continue
        elif not m.isfile():
            skipped.add(SPECIAL, m.name)
        elif not is_image_name(m.name):
            skipped.add(NOT_IMAGE, m.name)
        elif m.size > MAX_MEMBER_BYTES:
            skipped.add(TOO_LARGE, m.name)
        else:
            keep.append(m)
    # Duplicate names (an archive appended to): keep the last, as extraction would.
    seen: dict[str, tarfile.TarInfo] = {}
    for m in keep:
        seen[m.name] = m
    keep = list(seen.values())
    return ArchiveImages(path, len(keep), skipped, keep, "tar")
