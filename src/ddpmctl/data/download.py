"""``download``: fetch a dataset and prepare it under the data root, once.

Every kind of source ends in the same prepared format (see :mod:`ddpmctl.data.prepared`).
Asking again for a dataset that is already prepared the same way verifies the sha256 of its
array files and returns at once (``already_prepared=True``) without touching the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ddpmctl.data._events import Event, Progress, emitter
from ddpmctl.data.archive import archive_stem, is_archive
from ddpmctl.data.decode import Preprocess, Skipped, Source, accepted_extensions, decode_many
from ddpmctl.data.fetch import check_sha256, download_file, split_url_fragment, url_filename
from ddpmctl.data.folder import fingerprint, open_local
from ddpmctl.data.hub import HF_PREFIX, fetch_hub, hf_source, parquet_images, parquet_labels, parse_hf
from ddpmctl.data.prepared import (PreparedWriter, cache_dir, check_name, dir_bytes, read_info, resolve_root,
                                   sanitize_name, verify_dataset)
from ddpmctl.data.labels import folder_labels
from ddpmctl.data.sources import (KNOWN, KnownDataset, canonical, crop_fraction, torchvision_arrays,
                                  torchvision_celeba_paths, variant_name)
from ddpmctl.errors import DataError, DataNotFoundError, NetworkError, UsageError

DEFAULT_SIZE = 64  # prepared size for folders, archives, URLs and hf:// datasets unless --size
MIN_SIZE, MAX_SIZE = 4, 2048
BUILTIN = ("shapes",)


@dataclass
class DownloadResult:
    name: str
    path: Path
    info: dict
    already_prepared: bool

    def summary(self) -> dict:
        i = self.info
        return {
            "name": self.name, "path": str(self.path), "already_prepared": self.already_prepared,
            "source": i.get("source"), "revision": i.get("revision"), "size": i.get("size"),
            "channels": i.get("channels"), "counts": i.get("counts", {}),
            "skipped": {s: sum(v["count"] for v in d.values()) for s, d in i.get("skipped", {}).items()},
            "bytes": dir_bytes(self.path), "sha256": i.get("sha256", {}), "licence": i.get("licence"),
        }


# ----------------------------------------------------------------------------- source kinds


def looks_like_path(s: str) -> bool:
    return any(c in s for c in "/\\") or s.startswith((".", "~")) or is_archive(s)


def classify(source: str) -> tuple[str, Any]:
    """("builtin" | "hf" | "url" | "path" | "known" | "name", value)."""
    s = (source or "").strip()
    if not s:
        raise UsageError("no data source given")
    if s.lower() in BUILTIN:
        return "builtin", s.lower()
    if s.startswith("hf://"):
        return "hf", parse_hf(s)
    if s.lower().startswith(("http://", "https://")):
        return "url", s
    if "://" in s:
        raise UsageError(f"unsupported address {s!r}: use hf://datasets/OWNER/NAME or an https:// URL")
    if looks_like_path(s):
        return "path", Path(s).expanduser()
    known = canonical(s)
    if known:
        return "known", KNOWN[known]
    return "name", s  # a prepared dataset's name, else an existing folder/file of that name


def accepted_sources(root: Path) -> str:
    from ddpmctl.data.prepared import list_prepared

    prepared = [d["name"] for d in list_prepared(root) if "error" not in d]
    return (
        f"built in: {', '.join(BUILTIN)}; downloadable: {', '.join(KNOWN)}; "
        f"prepared under {root}: {', '.join(prepared) if prepared else 'none'}; "
        "or a folder of images, a .zip/.tar/.tar.gz archive, hf://datasets/OWNER/NAME (or NAME@REVISION), "
        "or an https:// URL of an archive"
    )


def not_found(source: str, root: Path) -> DataNotFoundError:
    """Unknown ``source``: "did you mean" the close built-in, downloadable or prepared names, then all
    that is accepted."""
    import difflib

    from ddpmctl.data.prepared import list_prepared
    from ddpmctl.data.sources import ALIASES

    names = [*BUILTIN, *KNOWN, *ALIASES, *(d["name"] for d in list_prepared(root) if "error" not in d)]
    close = difflib.get_close_matches(source.strip().lower(), list(dict.fromkeys(names)), n=3, cutoff=0.75)
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return DataNotFoundError(f"unknown data source {source!r}{hint}. Accepted: {accepted_sources(root)}")


def check_size(size: int | None, what: str = "--size") -> None:
    if size is not None and not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise UsageError(f"{what} must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")


def check_channels(channels: int | None, what: str = "--channels") -> None:
    if channels is not None and channels not in (1, 3):
        raise UsageError(f"{what} must be 1 (grayscale) or 3 (RGB), got {channels}")


def _forbid(source: str, **opts: Any) -> None:
    given = [k for k, v in opts.items() if v]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} does not apply to {source}")


# ----------------------------------------------------------------------------- idempotence


def _existing(root: Path, name: str, identity: dict, splits: Iterable[str] | None, force: bool,
              on_event: Event | None) -> tuple[str, Path | None, dict | None]:
    """("ok" | "splits" | "none", dir, info): prepared the same way, lacking splits, or not usable."""
    ds = root / name
    try:
        info = read_info(ds)
    except DataError:
        info = None
    if info is None:
        if ds.exists() and any(ds.iterdir()) and not force:
            raise UsageError(f"{ds} exists but is not a prepared dataset; choose another --name or remove it")
        return "none", None, None
    if info.get("source") != identity.get("source") and not force:
        raise UsageError(
            f"a dataset named {name!r} already exists under {root} (from {info.get('source')}); "
            "choose another --name, or add --force to replace it"
        )
    if force or any(info.get(k) != v for k, v in identity.items()):
        return "none", ds, info
    if splits and not set(splits) <= set(info.get("files", {})):
        return "splits", ds, info
    if not verify_dataset(ds, info):
        emitter(on_event)({"event": "message", "message": f"{ds} fails its checksum: preparing it again"})
        return "none", ds, info
    return "ok", ds, info


def _already(ds: Path, info: dict, on_event: Event | None) -> DownloadResult:
    msg = f"{info['name']} is already prepared in {ds} (checksums verified)"
    emitter(on_event)({"event": "message", "message": msg})
    return DownloadResult(info["name"], ds, info, True)


# ----------------------------------------------------------------------------- decoding into a writer


def _decode_split(w: PreparedWriter, split: str, total: int, items: Iterable[tuple[str, Source]],
                  pp: Preprocess, on_event: Event | None, pre: Skipped, where: str,
                  labeller: Callable[[list[str]], tuple[np.ndarray, list[str]] | None] = folder_labels,
                  ) -> tuple[Preprocess, Skipped]:
    """Decode one split into the writer; fixes ``pp.channels`` after the first split when it was auto.
    ``labeller`` gives the kept images' (labels, class names) from their names, or None (no labels):
    by default the class folders of :func:`~ddpmctl.data.labels.folder_labels`."""
    if total == 0:
        raise _no_images(where, pre)
    c = pp.channels or 3
    buf = w.buffer(split, total, c, pp.size)
    res = decode_many(items, total, pp, out=buf, on_event=on_event, split=split)
    count, all_gray, skipped = res.count, res.all_gray, Skipped()
    found = labeller(res.names)
    skipped.merge(pre)
    skipped.merge(res.skipped)
    del res, buf  # drop every view of the memory map before the file is shrunk
    skipped.report(on_event, split)
    if count == 0:
        w.finish_buffer(split, 0)
        raise _no_images(where, skipped)
    keep = None
    if pp.channels is None:
        keep = 1 if all_gray else 3
        pp = dataclasses.replace(pp, channels=keep)
    w.finish_buffer(split, count, keep_channels=keep)
    if found is not None:
        w.write_labels(split, *found)
    return pp, skipped


def _no_images(where: str, skipped: Skipped) -> DataError:
    detail = ""
    if skipped.total:
        detail = "; skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.counts.items()))
    return DataError(f"no usable image in {where} (accepted: {accepted_extensions()}){detail}")


def _prepare_hub(w: PreparedWriter, repo: str, revision: str | None, split_map: dict | None, column: str | None,
                 pp: Preprocess, root: Path, on_event: Event | None, label: str | None = None,
                 label_column: str | None = None) -> dict:
    files = fetch_hub(repo, revision, cache_dir(root, "hf"),
                      splits=list(split_map.values()) if split_map else None, on_event=on_event, name=label)
    split_map = split_map or {s: s for s in files.files}
    skipped, col, label_col = {}, None, None
    for ours, theirs in split_map.items():
        paths = files.files[theirs]
        where = f"{hf_source(repo)} split {theirs!r}"
        labeller = folder_labels
        if files.kind == "parquet":
            total, col, items = parquet_images(paths, column)
            found = parquet_labels(paths, label_column)  # the ClassLabel column, or --label-column
            if found is not None:
                label_col, classes, rows = found
                labeller = _row_labeller(classes, rows)
        else:
            total, items = len(paths), ((p.name, str(p)) for p in paths)
        pp, sk = _decode_split(w, ours, total, items, pp, on_event, Skipped(), where, labeller)
        skipped[ours] = sk.to_info()
    return {"revision": files.revision, "image_column": col, "label_column": label_col, "hub_format": files.kind,
            "skipped": skipped, "_pp": pp}


def _row_labeller(classes: list[str], rows: dict[str, int]):
    """A labeller for :func:`_decode_split`: the kept rows' class indices, by row name."""
    return lambda names: (np.array([rows[n] for n in names], dtype=np.int64), classes)


# ----------------------------------------------------------------------------- the entry point


def download(source: str, *, root: Path | str | None = None, name: str | None = None, size: int | None = None,
             channels: int | None = None, split: str | None = None, column: str | None = None,
             sha256: str | None = None, crop: str | None = None, force: bool = False,
             on_event: Event | None = None, label_column: str | None = None) -> DownloadResult:
    """Fetch and prepare ``source`` under ``root`` (default :func:`default_data_root`).

    ``source``: a known name (mnist, fashion-mnist, cifar10, celeba, celeba-hq),
    ``hf://datasets/OWNER/NAME[@REVISION]``, an ``https://`` URL of an archive (``sha256`` required,
    or given as ``URL#sha256=HEX``), or a local folder / .zip / .tar / .tar.gz. ``label_column``: a Hub
    parquet dataset's class column (default: its ``ClassLabel`` feature, if any).
    """
    root = resolve_root(root)
    check_size(size)
    check_channels(channels)
    if name is not None:
        check_name(name)
    if split is not None and not split.replace("_", "").replace("-", "").isalnum():
        raise UsageError(f"invalid split name {split!r}")
    kind, val = classify(source)
    if kind == "builtin":
        raise UsageError(f"{val} is built in: it is generated when used and needs no download")
    with _no_new_empty_caches(root):
        if label_column is not None and kind != "hf":
            raise UsageError("--label-column applies to hf://datasets/... sources only (a folder's labels are its "
                             "class sub-folders)")
        return _dispatch(source, kind, val, root, name, size, channels, split, column, sha256, crop, force, on_event,
                         label_column)


@contextlib.contextmanager
def _no_new_empty_caches(root: Path):
    """A failed download leaves none of the cache folders it made (ROOT/.cache/hf, .../torchvision)
    behind empty; what holds files (a partly fetched mirror to resume from) stays."""
    cache = root / ".cache"
    before = {p.name for p in cache.iterdir()} if cache.is_dir() else None
    try:
        yield
    except BaseException:
        if cache.is_dir() and not cache.is_symlink():
            for p in cache.iterdir():
                new = before is None or p.name not in before
                if new and p.is_dir() and not p.is_symlink() and not any(f.is_file() for f in p.rglob("*")):
                    shutil.rmtree(p, ignore_errors=True)
            if before is None and not any(cache.iterdir()):
                cache.rmdir()
        raise


def _dispatch(source, kind, val, root, name, size, channels, split, column, sha256, crop, force,
              on_event, label_column=None) -> DownloadResult:
    if kind == "name":
        if not Path(val).exists():
            raise not_found(source, root)
        kind, val = "path", Path(val)
    if kind == "known":
        _forbid(source, column=column, sha256=sha256)
        return _download_known(val, root, name, size, channels, split, crop, force, on_event)
    if kind == "hf":
        _forbid(source, sha256=sha256, crop=crop)
        return _download_hf(val[0], val[1], root, name, size, channels, split, column, force, on_event, label_column)
    if kind == "url":
        _forbid(source, crop=crop)
        return _download_url(val, root, name, size, channels, split, column, sha256, force, on_event)
    _forbid(source, sha256=sha256, column=column, crop=crop)
    return _download_local(val, root, name, size, channels, split, force, on_event)


def _download_known(kd: KnownDataset, root: Path, name: str | None, size: int | None, channels: int | None,
                    split: str | None, crop: str | None, force: bool, on_event: Event | None) -> DownloadResult:
    emit = emitter(on_event)
    if channels is not None and channels != kd.channels:
        raise UsageError(f"{kd.name} has {kd.channels} channel(s); training converts channels on load, "
                         "so download it without --channels")
    if crop and not kd.crops:
        raise UsageError(f"--crop applies to celeba only, not {kd.name}")
    if crop and crop not in kd.crops:
        raise UsageError(f"--crop must be one of {', '.join(kd.crops)}, got {crop!r}")
    crop = crop or (kd.crops[0] if kd.crops else None)
    size = size or kd.size
    name = check_name(name or variant_name(kd, size, crop))
    if split and split not in kd.splits:
        raise UsageError(f"{kd.name} has splits {', '.join(kd.splits)}, not {split!r}")
    splits = [split] if split else list(kd.splits)
    identity = {"source": kd.source, "dataset": kd.name, "request": {"size": size, "crop": crop}}
    state, ds, info = _existing(root, name, identity, splits, force, on_event)
    if state == "ok":
        return _already(ds, info, on_event)
    if state == "splits":
        splits = sorted(set(splits) | set(info.get("files", {})))

    extra: dict = {}
    with PreparedWriter(root, name) as w:
        if kd.kind == "torchvision":
            import torch

            from ddpmctl.data.convert import convert_images

            raw = cache_dir(root, "torchvision")
            for sp in splits:
                arr, labels, classes = torchvision_arrays(kd, raw, sp, on_event)
                progress = Progress(on_event, "prepare", int(arr.shape[0]), split=sp)
                x = convert_images(torch.from_numpy(arr), size, kd.channels).numpy()
                w.write_array(sp, x)
                w.write_labels(sp, labels, classes)
                progress.update(int(arr.shape[0]))
                progress.close()
            native = int(arr.shape[-1])
            extra = {
                "revision": None, "raw_cache": str(raw),
                "preprocessing": {"resize": "none (native size)" if size == native else
                                  f"{native}x{native} -> {size}x{size}, antialiased bicubic (torch)"},
            }
        else:
            pp = Preprocess(size, kd.channels, crop_fraction(crop) if crop else None, crop or "center-square")
            try:
                extra = _prepare_hub(w, kd.hub_repo, None, {sp: kd.hub_splits[sp] for sp in splits}, None, pp,
                                     root, on_event, label=kd.name)
            except (NetworkError, DataNotFoundError) as exc:
                if kd.name != "celeba":
                    raise
                emit({"event": "message", "message": f"Hub mirror failed ({exc}); trying torchvision's CelebA"})
                extra = _celeba_torchvision(w, root, splits, pp, on_event, exc)
            extra["preprocessing"] = pp.describe()
            if crop:
                extra["preprocessing"]["crop_box_178x218"] = list(_crop_px(crop))
        extra.pop("_pp", None)
        path, info = w.commit({
            **identity, "size": size, "channels": kd.channels, "licence": kd.licence,
            "description": kd.description, **extra,
        })
    return DownloadResult(name, path, info, False)


def _crop_px(crop: str) -> tuple:
    from ddpmctl.data.sources import CELEBA_CROPS

    return CELEBA_CROPS[crop]


def _celeba_torchvision(w: PreparedWriter, root: Path, splits: list[str], pp: Preprocess, on_event: Event | None,
                        hub_error: Exception) -> dict:
    raw = cache_dir(root, "torchvision")
    skipped = {}
    for sp in splits:
        try:
            paths = torchvision_celeba_paths(raw, sp, on_event)
        except NetworkError as exc:
            raise NetworkError(
                f"could not download celeba from the Hub ({hub_error}) nor with torchvision ({exc}). "
                "With a local copy of the images: `ddpmctl train ./img_align_celeba/ --preset celeba`; or run "
                "`ddpmctl download celeba` on a connected machine and copy its data root (DDPMCTL_DATA) here"
            ) from exc
        pp, sk = _decode_split(w, sp, len(paths), ((p.name, str(p)) for p in paths), pp, on_event, Skipped(),
                               f"torchvision CelebA {sp}")
        skipped[sp] = sk.to_info()
    return {"source_used": "torchvision:celeba", "revision": None, "skipped": skipped}


def _download_hf(repo: str, revision: str | None, root: Path, name: str | None, size: int | None,
                 channels: int | None, split: str | None, column: str | None, force: bool,
                 on_event: Event | None, label_column: str | None = None) -> DownloadResult:
    size = size or DEFAULT_SIZE
    name = check_name(name or sanitize_name(repo.replace("/", "--")))
    request = {"revision": revision, "size": size, "channels": channels or "auto", "column": column}
    if label_column is not None:
        request["label_column"] = label_column
    identity = {"source": hf_source(repo), "request": request}
    splits = [split] if split else None
    state, ds, info = _existing(root, name, identity, splits, force, on_event)
    if state == "ok":
        return _already(ds, info, on_event)
    if state == "splits":
        splits = sorted(set(splits) | set(info.get("files", {})))
    pp = Preprocess(size, channels)
    with PreparedWriter(root, name) as w:
        extra = _prepare_hub(w, repo, revision, {s: s for s in splits} if splits else None, column, pp, root,
                             on_event, label_column=label_column)
        pp = extra.pop("_pp")
        path, info = w.commit({
            **identity, **extra, "size": size, "channels": pp.channels, "preprocessing": pp.describe(),
            "licence": f"see the dataset card: https://huggingface.co/datasets/{repo}",
        })
    return DownloadResult(name, path, info, False)


def _download_url(url: str, root: Path, name: str | None, size: int | None, channels: int | None,
                  split: str | None, column: str | None, sha256: str | None, force: bool,
                  on_event: Event | None) -> DownloadResult:
    url, frag_sha = split_url_fragment(url)
    sha = check_sha256(sha256 or frag_sha, url)
    fname = url_filename(url)
    size = size or DEFAULT_SIZE
    stem = archive_stem(fname) if is_archive(fname) else Path(fname).stem
    name = check_name(name or sanitize_name(stem))
    split = split or "train"
    identity = {"source": url,
                "request": {"sha256": sha, "size": size, "channels": channels or "auto", "column": column}}
    state, ds, info = _existing(root, name, identity, [split], force, on_event)
    if state == "ok":
        return _already(ds, info, on_event)
    dest = cache_dir(root, "url") / sha[:16] / fname
    download_file(url, dest, sha256=sha, on_event=on_event)
    pp = Preprocess(size, channels)
    with PreparedWriter(root, name) as w:
        if fname.lower().endswith(".parquet"):
            total, col, items = parquet_images([dest], column)
            pre = Skipped()
        else:
            if column:
                raise UsageError("--column applies to parquet files only")
            local = open_local(dest)
            total, items, pre, col = local.total, local.items(), local.skipped, None
        pp, sk = _decode_split(w, split, total, items, pp, on_event, pre, f"{fname} from {url}")
        path, info = w.commit({
            **identity, "url": url, "revision": sha, "downloaded_file": str(dest), "image_column": col,
            "size": size, "channels": pp.channels, "preprocessing": pp.describe(), "skipped": {split: sk.to_info()},
            "licence": "unknown: check the terms where you found the file",
        })
    return DownloadResult(name, path, info, False)


def _download_local(path: Path, root: Path, name: str | None, size: int | None, channels: int | None,
                    split: str | None, force: bool, on_event: Event | None) -> DownloadResult:
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"no such folder or archive: {path}")
    path = path.resolve()
    size = size or DEFAULT_SIZE
    stem = archive_stem(path) if path.is_file() else path.name
    name = check_name(name or sanitize_name(stem))
    split = split or "train"
    identity = {"source": str(path),
                "request": {"size": size, "channels": channels or "auto", "fingerprint": fingerprint(path)}}
    state, ds, info = _existing(root, name, identity, [split], force, on_event)
    if state == "ok":
        return _already(ds, info, on_event)
    local = open_local(path)
    pp = Preprocess(size, channels)
    with PreparedWriter(root, name) as w:
        pp, sk = _decode_split(w, split, local.total, local.items(), pp, on_event, local.skipped,
                               f"{local.kind} {path}")
        path_out, info = w.commit({
            **identity, "revision": None, "size": size, "channels": pp.channels, "preprocessing": pp.describe(),
            "skipped": {split: sk.to_info()}, "licence": "your own data",
        })
    return DownloadResult(name, path_out, info, False)


__all__ = ["DownloadResult", "download", "classify", "DEFAULT_SIZE", "HF_PREFIX"]
