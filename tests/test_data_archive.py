"""Archive safety and robustness: each refusal and each skip, one test apiece.

Archives are read in place (never extracted); a hostile entry refuses the whole archive and
nothing is prepared or written anywhere.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmctl.data import download, list_prepared
from ddpmctl.errors import DataError


def _png(rgb=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                ti = tarfile.TarInfo(e[0])
                ti.size = len(e[1])
                tf.addfile(ti, io.BytesIO(e[1]))
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti


def _nothing_prepared(root: Path, tmp_path: Path) -> None:
    assert list_prepared(root) == []
    if root.exists():
        assert not [p for p in root.iterdir() if p.name.startswith((".tmp", ".old"))]
    assert not list(tmp_path.parent.glob("evil*")) and not (tmp_path / "evil.png").exists()


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data-root"


def test_tar_slip_refused(tmp_path, root):
    arc = _tar(tmp_path / "slip.tar.gz", [("ok/a.png", _png()), ("../evil.png", _png())])
    with pytest.raises(DataError, match=r"'\.\./evil\.png'.*\.\..*component"):
        download(str(arc), root=root)
    _nothing_prepared(root, tmp_path)


def test_zip_slip_refused(tmp_path, root):
    arc = tmp_path / "slip.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok/a.png", _png())
        zf.writestr("ok/../../evil.png", _png())
    with pytest.raises(DataError, match="path traversal"):
        download(str(arc), root=root)
    _nothing_prepared(root, tmp_path)


def test_absolute_path_refused(tmp_path, root):
    arc = _tar(tmp_path / "abs.tar", [("/tmp/evil.png", _png())])
    with pytest.raises(DataError, match="absolute path"):
        download(str(arc), root=root)
    _nothing_prepared(root, tmp_path)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_symlink_escape_refused(tmp_path, root, kind):
    if kind == "tar":
        arc = _tar(tmp_path / "link.tar", [("a/ok.png", _png()), _symlink("a/evil.png", "../../../etc/passwd")])
    else:
        arc = tmp_path / "link.zip"
        with zipfile.ZipFile(arc, "w") as zf:
            zf.writestr("a/ok.png", _png())
            info = zipfile.ZipInfo("a/evil.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link.*outside"):
        download(str(arc), root=root)
    _nothing_prepared(root, tmp_path)


def test_internal_symlink_skipped_not_refused(tmp_path, root):
    arc = _tar(tmp_path / "inner.tar", [("a/ok.png", _png()), _symlink("a/alias.png", "ok.png")])
    res = download(str(arc), root=root, size=8)
    assert res.info["counts"] == {"train": 1}
    assert res.info["skipped"]["train"]["link inside the archive"]["count"] == 1


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims a w x h canvas (the classic decompression-bomb shape: tiny file, huge image)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_and_counted(tmp_path, root):
    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.png", _png())
        zf.writestr("huge.png", _png_header(30000, 30000))  # over twice Pillow's limit: Pillow refuses
        zf.writestr("big.png", _png_header(9000, 9000))  # under Pillow's limit, over ddpmctl's
    events = []
    res = download(str(arc), root=root, size=8, on_event=events.append)
    assert res.info["counts"] == {"train": 1}
    bombs = [v for k, v in res.info["skipped"]["train"].items() if k.startswith("decompression bomb")]
    assert bombs and bombs[0]["count"] == 2 and sorted(bombs[0]["examples"]) == ["big.png", "huge.png"]
    assert any(e["event"] == "skipped" and e["reason"].startswith("decompression bomb") for e in events)


def test_truncated_images_skipped_and_counted(tmp_path, root):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png, jpg = io.BytesIO(), io.BytesIO()
    noisy.save(png, format="PNG")
    noisy.save(jpg, format="JPEG", quality=90)
    arc = _tar(tmp_path / "trunc.tar", [
        ("good.png", _png()), ("cut.png", png.getvalue()[: len(png.getvalue()) // 2]),
        ("cut.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2]), ("empty.png", b""),
    ])
    res = download(str(arc), root=root, size=8)
    assert res.info["counts"] == {"train": 1}
    sk = res.info["skipped"]["train"]["undecodable or truncated image"]
    assert sk["count"] == 3 and sorted(sk["examples"]) == ["cut.jpg", "cut.png", "empty.png"]


def test_empty_archive_is_an_error(tmp_path, root):
    arc = tmp_path / "empty.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("README.txt", "no images here")
    with pytest.raises(DataError) as exc:
        download(str(arc), root=root)
    msg = str(exc.value)
    assert "empty.zip" in msg and "no usable image" in msg and ".png" in msg and "1 not an image file" in msg
    _nothing_prepared(root, tmp_path)


def test_corrupt_archive_is_an_error(tmp_path, root):
    arc = tmp_path / "broken.tar.gz"
    arc.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 50)
    with pytest.raises(DataError, match="broken.tar.gz"):
        download(str(arc), root=root)
    _nothing_prepared(root, tmp_path)
