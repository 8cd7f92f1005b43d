"""Datasets from the Hugging Face Hub: ``hf://datasets/OWNER/NAME[@REVISION]``.

Files are listed, with their sizes, by ``huggingface_hub.list_repo_tree`` and fetched one by one with
``huggingface_hub.hf_hub_download`` into ``ROOT/.cache/hf`` (the Hub's own cache layout, so
a second download reuses them). Parquet files are preferred; a repository of plain image
files (an "imagefolder") works too. The image column of a parquet file is found
automatically: the column the Hub's ``datasets`` metadata marks as an ``Image`` feature, else
a struct column with a binary ``bytes`` field, else a binary column; ``--column`` overrides.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ddpmctl.data._events import Event, Progress, emitter
from ddpmctl.data.decode import IMAGE_EXTENSIONS, Source
from ddpmctl.data.fetch import size_line
from ddpmctl.errors import DataError, DataNotFoundError, NetworkError, UsageError

HF_PREFIX = "hf://datasets/"
KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_hf(source: str) -> tuple[str, str | None]:
    """``hf://datasets/OWNER/NAME[@REV]`` -> (``OWNER/NAME``, ``REV`` or None)."""
    if not source.startswith(HF_PREFIX):
        raise UsageError(f"expected hf://datasets/OWNER/NAME or hf://datasets/OWNER/NAME@REVISION, got {source!r}")
    rest = source[len(HF_PREFIX):].strip("/")
    repo, _, rev = rest.partition("@")
    if not _REPO_RE.match(repo):
        raise UsageError(f"expected hf://datasets/OWNER/NAME or hf://datasets/OWNER/NAME@REVISION, got {source!r}")
    return repo, (rev or None)


def hf_source(repo: str) -> str:
    return f"{HF_PREFIX}{repo}"


def split_of(path: str) -> str:
    """The split a repository file belongs to, from the Hub's naming conventions."""
    parts = path.split("/")
    for d in parts[:-1]:
        if d.lower() in KNOWN_SPLITS:
            return d.lower()
    stem = parts[-1].rsplit(".", 1)[0]
    m = _SHARD_RE.match(stem)
    if m:
        return m.group("split").lower()
    token = re.split(r"[-_.]", stem, maxsplit=1)[0].lower()
    if token in KNOWN_SPLITS:
        return token
    return "train"


@dataclass
class HubFiles:
    repo: str
    revision: str | None  # resolved commit when known
    kind: str  # "parquet" or "images"
    files: dict  # split -> list[Path]


def _hub_errors(repo: str, revision: str | None, exc: Exception) -> Exception:
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    src = hf_source(repo) + (f"@{revision}" if revision else "")
    if isinstance(exc, GatedRepoError):
        return DataError(f"{src} is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return DataNotFoundError(f"{src} was not found on the Hugging Face Hub (a private dataset needs HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return DataNotFoundError(f"{src}: revision {revision!r} does not exist")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, OSError):
        return DataError(f"{src}: a listed file is missing: {exc}")
    name = type(exc).__name__
    offline = "OfflineMode" in name or "LocalEntryNotFound" in name
    hint = ("HF_HUB_OFFLINE is set; unset it to download" if offline
            else "check your connection (and HF_TOKEN for private data), then run the same command again")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    return NetworkError(f"could not fetch {src} from the Hugging Face Hub: {first}; {hint}")


class _NullFile:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _progress_tqdm(on_event: Event | None, filename: str):
    """A tqdm class for hf_hub_download that reports bytes through on_event and prints nothing."""
    from tqdm.std import tqdm as _tqdm

    class _Quiet(_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = _NullFile()
            super().__init__(*args, **kwargs)
            self._ddpmctl = Progress(on_event, "download", self.total, unit="bytes", source=filename)

        def update(self, n=1):
            out = super().update(n)
            if n:
                self._ddpmctl.total = self.total
                self._ddpmctl.update(int(n))
            return out

        def close(self):
            if hasattr(self, "_ddpmctl") and not getattr(self, "_ddpmctl_closed", False):
                self._ddpmctl_closed = True
                self._ddpmctl.close()
            super().close()

    return _Quiet


def _file_sizes(entries) -> dict[str, int | None]:
    """path -> size in bytes (None where the listing gives none) of the files in a ``list_repo_tree``."""
    out: dict[str, int | None] = {}
    for e in entries:
        if not hasattr(e, "size"):  # a folder
            continue
        lfs = getattr(e, "lfs", None)
        size = getattr(lfs, "size", None) if lfs is not None else None
        out[e.path] = size if isinstance(size, int) else (e.size if isinstance(e.size, int) else None)
    return out


def _size_event(repo: str, revision: str | None, cache: Path, todo: list[str], sizes: dict, splits: list[str],
                name: str | None) -> dict:
    """The ``download`` event stated before the first file is fetched: the bytes still to download (the
    Hub's listing gives each file's size), leaving out the files already in the cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(n: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo, n, cache_dir=str(cache), revision=revision,
                                                     repo_type="dataset"), str)
        except Exception:  # an unreadable cache is only a cache miss
            return False

    fetch = [n for n in todo if not cached(n)]
    known = [sizes.get(n) for n in fetch]
    total = None if None in known else sum(known)
    what = name or hf_source(repo)
    files = f"{len(fetch)} file(s) of {', '.join(splits)}" + (
        f"; {len(todo) - len(fetch)} more already in the cache" if len(fetch) < len(todo) else "")
    if not fetch:
        message = f"{what}: all {len(todo)} file(s) of {', '.join(splits)} already in {cache}"
    else:
        message = size_line(what, total, f"({files}) from {hf_source(repo)} into {cache}",
                            unknown="the Hub's listing did not give every file's size")
    return {"event": "download", "source": hf_source(repo), "name": what, "bytes": total if fetch else 0,
            "message": message}


def fetch_hub(repo: str, revision: str | None, cache: Path, *, splits: list[str] | None,
              on_event: Event | None = None, name: str | None = None) -> HubFiles:
    """List the repository, pick the parquet (or image) files of the wanted splits, state the size to
    download (``name`` labels it, e.g. ``celeba``), download them."""
    import huggingface_hub

    emit = emitter(on_event)
    emit({"event": "message", "message": f"asking the Hugging Face Hub for {hf_source(repo)} (without a connection "
                                         "its client retries for about 40 s before giving up)"})
    hf_log = logging.getLogger("huggingface_hub")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its "Retrying in 8s [Retry 5/5]" lines: the message above says it
    try:
        sizes = _file_sizes(huggingface_hub.list_repo_tree(repo, recursive=True, repo_type="dataset",
                                                            revision=revision))
    except Exception as exc:
        raise _hub_errors(repo, revision, exc) from exc
    finally:
        hf_log.setLevel(level)
    names = list(sizes)
    parquet = [n for n in names if n.lower().endswith(".parquet")]
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    kind, chosen = ("parquet", parquet) if parquet else ("images", images)
    if not chosen:
        raise DataError(f"{hf_source(repo)} has no parquet or image files ({len(names)} files listed)")
    by_split: dict[str, list[str]] = {}
    for n in sorted(chosen):
        by_split.setdefault(split_of(n), []).append(n)
    wanted = splits or sorted(by_split)
    missing = [s for s in wanted if s not in by_split]
    if missing:
        raise UsageError(f"{hf_source(repo)} has no split {', '.join(map(repr, missing))}; "
                         f"it has: {', '.join(sorted(by_split))}")
    todo = [n for s in wanted for n in by_split[s]]
    kwargs = {}
    params = inspect.signature(huggingface_hub.hf_hub_download).parameters
    emit(_size_event(repo, revision, cache, todo, sizes, wanted, name))
    files_progress = Progress(on_event, "fetch", len(todo), unit="files", source=hf_source(repo))
    local: dict[str, Path] = {}
    commit = None
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    try:
        for n in todo:
            if "tqdm_class" in params:
                kwargs["tqdm_class"] = _progress_tqdm(on_event, n)
            else:
                disable_progress_bars()
            try:
                p = huggingface_hub.hf_hub_download(repo, n, repo_type="dataset", revision=revision,
                                                    cache_dir=str(cache), **kwargs)
            except Exception as exc:
                raise _hub_errors(repo, revision, exc) from exc
            p = Path(p)
            local[n] = p
            parts = p.parts
            if commit is None and "snapshots" in parts:
                i = parts.index("snapshots")
                if i + 1 < len(parts) and re.match(r"^[0-9a-f]{40}$", parts[i + 1]):
                    commit = parts[i + 1]
            files_progress.update(1)
    finally:
        if not was_disabled:
            enable_progress_bars()
    files_progress.close()
    return HubFiles(repo, commit or revision, kind, {s: [local[n] for n in by_split[s]] for s in wanted})


# ----------------------------------------------------------------------------- parquet


def find_image_column(schema, metadata: dict | None, column: str | None, where: str) -> str:
    import pyarrow as pa

    names = list(schema.names)
    if column:
        if column not in names:
            raise UsageError(f"--column {column!r} is not in {where}; columns: {', '.join(names)}")
        return column
    feats = _features(metadata)
    for name, f in feats.items():
        if isinstance(f, dict) and f.get("_type") == "Image" and name in names:
            return name
    for field in schema:
        t = field.type
        if pa.types.is_struct(t):
            sub = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            if "bytes" in sub and (pa.types.is_binary(sub["bytes"]) or pa.types.is_large_binary(sub["bytes"])):
                return field.name
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    for name in binary:
        if re.search(r"im(a)?g|pic|photo|png|jpe?g", name, re.I):
            return name
    if binary:
        return binary[0]
    raise DataError(f"no image column in {where} (columns: {', '.join(names)}); name one with --column")


def _features(metadata: dict | None) -> dict:
    """The ``datasets`` features recorded in a parquet file's metadata ({} when absent or unreadable)."""
    if metadata and b"huggingface" in metadata:
        try:
            feats = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {}) or {}
            return feats if isinstance(feats, dict) else {}
        except (ValueError, AttributeError, RecursionError):
            return {}
    return {}


def parquet_labels(paths: list[Path], label_column: str | None) -> tuple[str, list[str], dict[str, int]] | None:
    """(label column, class names, {row name: class index}) of parquet files, row names as
    :func:`parquet_images` gives them. The column is ``label_column``, else the one the ``datasets``
    metadata marks as a ``ClassLabel`` (its names are the classes, in their order); None when there is
    neither. An explicit integer column without ClassLabel names gets the classes '0'..'max'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col, names = None, None
    for p in paths:
        schema = pq.ParquetFile(p).schema_arrow
        feats = _features(schema.metadata)
        if label_column:
            if label_column not in schema.names:
                raise UsageError(f"--label-column {label_column!r} is not in {p.name}; columns: "
                                 f"{', '.join(schema.names)}")
            c = label_column
        else:
            c = next((n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
                      and n in schema.names), None)
            if c is None:
                return None
        f = feats.get(c) if isinstance(feats.get(c), dict) else {}
        if f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list):
            names = [str(n) for n in f["names"]]
        elif not pa.types.is_integer(schema.field(c).type):
            raise DataError(f"label column {c!r} of {p.name} holds {schema.field(c).type}, not class indices")
        col = c
    rows: dict[str, int] = {}
    for p in paths:
        row = 0
        for batch in pq.ParquetFile(p).iter_batches(batch_size=65536, columns=[col]):
            for v in batch.column(0).to_pylist():
                if v is None or v < 0:
                    raise DataError(f"{p.name} row {row} has no class in column {col!r}")
                rows[f"{p.name}#{row}"] = int(v)
                row += 1
    top = max(rows.values(), default=-1)
    names = names or [str(i) for i in range(top + 1)]
    if top >= len(names):
        raise DataError(f"label column {col!r} has class {top}, but only {len(names)} class names")
    return col, names, rows


def parquet_images(paths: list[Path], column: str | None) -> tuple[int, str, Iterator[tuple[str, Source]]]:
    """(row count, image column, iterator of (row name, image bytes)) over parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total, col = 0, None
    for p in paths:
        try:
            pf = pq.ParquetFile(p)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{p} is not a readable parquet file: {exc}") from exc
        c = find_image_column(pf.schema_arrow, pf.schema_arrow.metadata, column, str(p.name))
        if col is not None and c != col:
            raise DataError(f"parquet files disagree on the image column ({col!r} vs {c!r}); use --column")
        col = c
        total += pf.metadata.num_rows

    def items() -> Iterator[tuple[str, Source]]:
        for p in paths:
            pf = pq.ParquetFile(p)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=[col]):
                arr = batch.column(0)
                if pa.types.is_struct(arr.type):
                    arr = arr.field("bytes")
                for b in arr.to_pylist():
                    yield f"{p.name}#{row}", (b if isinstance(b, bytes) else b"")
                    row += 1

    return total, col, items()
