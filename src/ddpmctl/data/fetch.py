"""Downloading one file over http(s) with urllib: streamed to a temporary name, sha256-verified."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ddpmctl import __version__
from ddpmctl.data._events import Event, Progress, emitter
from ddpmctl.errors import DataError, NetworkError, UsageError
from ddpmctl.outdir import remove_stale
from ddpmctl.safefile import open_owned
from ddpmctl.smallfiles import sha256_file
from ddpmctl.units import human_bytes
from ddpmctl.writes import as_write_error

CHUNK = 1 << 20
TIMEOUT_S = 60
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def check_sha256(value: str | None, source: str) -> str:
    if not value:
        raise UsageError(
            f"--sha256 is required to download {source}: give the file's SHA-256 (usually published next to it; "
            "`sha256sum FILE` computes it) so a corrupted or substituted file is never used"
        )
    if not SHA256_RE.match(value.strip()):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits, got {value!r}")
    return value.strip().lower()


def url_filename(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).lstrip(".")
    return name or "download"


def split_url_fragment(url: str) -> tuple[str, str | None]:
    """``https://x/y.zip#sha256=HEX`` -> (``https://x/y.zip``, ``HEX``)."""
    base, _, frag = url.partition("#")
    m = re.match(r"^sha256=([0-9a-fA-F]{64})$", frag)
    return base, (m.group(1).lower() if m else None)


def size_line(what: str, nbytes: int | None, where: str, unknown: str = "the server did not give its size") -> str:
    """The line stated before a download starts: ``downloading NAME: 162.6 MiB from WHERE``."""
    if nbytes is None:
        return f"downloading {what} {where} ({unknown}; progress counts the bytes received)"
    return f"downloading {what}: {human_bytes(nbytes)} {where}"


def download_file(url: str, dest: Path, *, sha256: str, on_event: Event | None = None,
                  timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds a file with that sha256.

    Once the server has answered, and before the first byte of data is read, a ``download`` event
    states the size from its Content-Length (or that it gave none). The data goes to
    ``dest.part-PID`` first; on a checksum mismatch it is deleted and :class:`DataError` names the
    file and both hashes; on a network failure :class:`NetworkError`.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256_file(dest) == sha256:
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, f"{dest.name}.part-")  # a killed earlier download's partial file
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    retry = "check the address and your connection, then run the same command again"
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": f"ddpmctl/{__version__}"})
    try:
        part.unlink(missing_ok=True)  # a leftover of this PID, or a planted link (the link goes, not its target)
        with urllib.request.urlopen(req, timeout=timeout) as resp, \
                os.fdopen(open_owned(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            emitter(on_event)({"event": "download", "source": url, "name": dest.name, "bytes": total,
                               "message": size_line(dest.name, total, f"from {url}")})
            progress = Progress(on_event, "download", total, unit="bytes", source=url)
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                progress.update(len(chunk))
            progress.close()
            if total is not None and progress.done != total:
                raise NetworkError(f"download of {url} stopped after {progress.done} of {total} bytes; {retry}")
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise NetworkError(f"could not download {url}: HTTP {exc.code} {exc.reason}; {retry}") from exc
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException,
            OSError) as exc:
        part.unlink(missing_ok=True)
        failed = as_write_error(exc, dest, "the partial download was deleted; nothing was prepared")
        if failed is not None:  # our side: a full disk, a size limit, a read-only folder
            raise failed from None
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(f"could not download {url}: {reason}; {retry}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    actual = h.hexdigest()
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 {sha256}, got {actual}; "
            "the file was deleted and nothing was prepared"
        )
    os.replace(part, dest)
    return dest
