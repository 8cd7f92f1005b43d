"""Reading the small JSON/TOML files ddpmctl owns or is handed (spec.json, --spec files, state.json,
manifest.json, config.json, dataset.json, samples/index.json): one function, one set of messages.

Whatever is wrong with such a file (unreadable, not UTF-8, not valid JSON or TOML, nested too
deeply for the parser, too large, its top level not an object), the caller gets one
:class:`~ddpmctl.errors.DdpmctlError` naming the file, what is wrong and what was expected, never a
UnicodeDecodeError, RecursionError or AttributeError. The types of the fields inside are checked
where they are used (pydantic models for the spec and the training state). Also the one file
hash (:func:`sha256_file`) that checkpoint manifests, prepared datasets and downloads check.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

from ddpmctl.errors import DdpmctlError, UsageError

MAX_BYTES = 16 << 20  # far above any file ddpmctl writes (a spec is ~2 KB, a training state ~100 KB)


def read_object(path: Path, *, expect: str, error: type[DdpmctlError] = UsageError, toml: bool | None = None,
                hint: str = "") -> dict:
    """The top-level object of the JSON (or TOML: ``toml`` True, or None and a .toml suffix) file.

    ``expect`` says what the file should hold ("the run's spec"), for the message; ``error`` is the
    class raised (a :class:`DdpmctlError` subclass); ``hint`` is appended to the message (what to do).
    """
    path = Path(path)
    toml = path.suffix.lower() == ".toml" if toml is None else toml
    fmt = "TOML" if toml else "JSON"

    def fail(problem: str) -> DdpmctlError:
        return error(f"{path}: {problem}; expected {expect} (a {fmt} object){hint}")

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_BYTES:
        raise fail(f"larger than {MAX_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        obj = tomllib.loads(text) if toml else json.loads(text)
    except RecursionError:
        raise fail(f"nested too deeply to be valid {fmt}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"not valid {fmt} ({exc})") from None
    if not isinstance(obj, dict):
        raise fail(f"its top level is {_kind(obj)}, not an object")
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log ddpmctl appends to (eval.jsonl): one object per line. A line that
    does not parse (torn by a crash, damaged bytes, nested too deeply) or is not an object is skipped."""
    records = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def read_text_lenient(path: Path) -> str:
    """A small text file ddpmctl writes for itself (checkpoints/NEWEST, .lock), stripped; bytes that are
    not UTF-8 become U+FFFD, so a damaged file reads as a name that matches nothing. OSError passes."""
    with open(path, "rb") as f:
        return f.read(4096).decode("utf-8", errors="replace").strip()


def _kind(obj) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number" if isinstance(obj, (int, float)) else type(obj).__name__)


def sha256_file(path: Path | str, chunk: int = 8 << 20) -> str:
    """The file's SHA-256, hex, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
