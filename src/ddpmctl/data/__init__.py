"""Image data: the built-in shapes, local folders/archives, prepared and downloadable datasets.

``load_images`` returns the whole split as one uint8 (N, C, H, W) tensor;
:class:`ddpmctl.data.loader.DeviceLoader` turns it into device-resident batches.
Downloads and preparation live in :func:`download`. Nothing here prints: progress and notices
go to ``on_event`` (see :mod:`ddpmctl.data._events`), failures raise ``ddpmctl.errors`` types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ddpmctl.data._events import emitter
from ddpmctl.data.decode import Preprocess, Skipped, decode_many
from ddpmctl.data.download import (DEFAULT_SIZE, DownloadResult, check_channels, check_size, classify, download,
                                   not_found)
from ddpmctl.data.fetch import split_url_fragment
from ddpmctl.data.folder import no_images_error, open_local
from ddpmctl.data.hub import hf_source
from ddpmctl.data.labels import folder_labels, load_labels
from ddpmctl.data.prepared import default_data_root, list_prepared, load_array, read_info, resolve_root
from ddpmctl.data.shapes import DEFAULT_COUNT, KINDS, SEEDS, make_shapes, shapes_info
from ddpmctl.data.sources import KNOWN, KnownDataset, variant_name
from ddpmctl.errors import DataError, DataNotFoundError, UsageError

if TYPE_CHECKING:
    import torch

# torch is imported on first use, so `ddpmctl download` and `--list` start quickly.

__all__ = [
    "ImageData", "load_images", "default_data_root", "download", "DownloadResult", "list_prepared",
    "KNOWN", "DEFAULT_SIZE", "make_shapes", "check_source",
]


@dataclass
class ImageData:
    name: str  # e.g. "shapes", "cifar10", "my_photos"
    images: "torch.Tensor"  # uint8, (N, C, H, W), contiguous, CPU
    info: dict  # dataset.json contents, with split/count/size/channels describing `images`
    labels: "torch.Tensor | None" = None  # int64 (N,) class indices, when the data has classes
    classes: list[str] | None = None  # class names, in label order


def load_images(source: str, *, image_size: int, channels: int, split: str = "train", root: Path | None = None,
                allow_download: bool = True, on_event: Callable[[dict], None] | None = None) -> ImageData:
    """Load one split of ``source`` as uint8 (N, channels, image_size, image_size).

    ``source`` is, in this order of precedence: ``shapes`` (built in); ``hf://datasets/OWNER/NAME[@REV]``;
    an ``http(s)://`` URL of an archive; a path (anything with a ``/``, starting with ``.`` or ``~``,
    or ending in .zip/.tar/.tar.gz) to a folder of images or an archive; the name of a dataset prepared
    under ``root``; a downloadable name (mnist, fashion-mnist, cifar10, celeba, celeba-hq); finally an
    existing folder or file of that name.

    A prepared dataset whose size or channels differ from the request is converted on load
    (antialiased bicubic resize, luma or channel repetition); an ``on_event({"event": "convert"})``
    says so. Unprepared downloadable datasets are downloaded and prepared first when
    ``allow_download``, else :class:`DataNotFoundError` names the ``ddpmctl download`` to run.
    """
    check_size(image_size, "image_size")
    check_channels(channels, "channels")
    root_given = root is not None
    root = resolve_root(root)
    emit = emitter(on_event)
    kind, val = classify(source)
    root_opt = f" --root {root}" if root_given else ""

    if kind == "builtin":
        return _load_shapes(split, image_size, channels)

    if kind == "path":
        return _load_local(Path(val), split, image_size, channels, on_event)

    if kind == "hf":
        repo, rev = val
        hit = _find_prepared(root, hf_source(repo), image_size, channels, revision=rev)
        if hit is None:
            cmd = f"ddpmctl download {source}{root_opt}"
            if not allow_download:
                raise DataNotFoundError(f"{source} is not prepared under {root}; run: {cmd}")
            emit({"event": "download", "source": source,
                  "message": f"{source} is not prepared yet: downloading and preparing it (once) under {root}"})
            res = download(source, root=root, size=image_size, channels=channels, on_event=on_event)
            hit = (res.path, res.info)
        return _from_prepared(*hit, split, image_size, channels, on_event)

    if kind == "url":
        url, sha = split_url_fragment(val)
        hit = _find_prepared(root, url, image_size, channels, sha256=sha)
        if hit is None:
            if not sha or not allow_download:
                raise _url_not_prepared(url, root, root_opt)
            emit({"event": "download", "source": url,
                  "message": f"{url} is not prepared yet: downloading and preparing it (once) under {root}"})
            res = download(val, root=root, size=image_size, channels=channels, on_event=on_event)
            hit = (res.path, res.info)
        return _from_prepared(*hit, split, image_size, channels, on_event)

    # A prepared name (including a known dataset's default or size-specific preparation).
    names = [source.strip()]
    if kind == "known":
        kd: KnownDataset = val
        crop = kd.crops[0] if kd.crops else None
        names = [variant_name(kd, image_size, crop), kd.name, source.strip()]
    hit = _prepared_by_name(root, names)
    if hit is not None:
        return _from_prepared(*hit, split, image_size, channels, on_event)

    if kind == "known":
        size = image_size if kd.high_res else kd.size
        cmd = f"ddpmctl download {kd.name}" + (f" --size {size}" if size != kd.size else "") + root_opt
        if not allow_download:
            raise DataNotFoundError(f"{kd.name} is not prepared under {root}; run: {cmd}")
        emit({"event": "download", "source": kd.name, "name": kd.name,
              "message": f"{kd.name} is not prepared yet: downloading and preparing it (once) under {root}"})
        res = download(kd.name, root=root, size=size, on_event=on_event)
        return _from_prepared(res.path, res.info, split, image_size, channels, on_event)

    if kind == "name" and Path(val).exists():
        return _load_local(Path(val), split, image_size, channels, on_event)
    raise not_found(source, root)


def check_source(source: str, *, root: Path | None = None) -> str:
    """The kind of ``source`` (see :func:`~ddpmctl.data.download.classify`) if :func:`load_images` could
    use it, without reading an image or touching the network; else the error :func:`load_images` raises
    for it (an unknown name, with close matches; a missing path; an unsupported address). A known
    dataset, an ``hf://`` source or an ``https://...#sha256=HEX`` URL passes whether or not it is
    prepared yet: the real run downloads it."""
    root_given = root is not None
    root = resolve_root(root)
    kind, val = classify(source)
    if kind == "path":
        _check_local(Path(val))
    elif kind == "url":  # without #sha256= the run does not download it: it must be prepared
        url, sha = split_url_fragment(val)
        if not sha and _find_prepared(root, url, 0, 0, sha256=None) is None:
            raise _url_not_prepared(url, root, f" --root {root}" if root_given else "")
    elif kind == "name" and _prepared_by_name(root, [source.strip()]) is None and not Path(val).exists():
        raise not_found(source, root)
    return kind


# ----------------------------------------------------------------------------- helpers


def _prepared_by_name(root: Path, names: list[str]) -> tuple[Path, dict] | None:
    """The first of ``names`` prepared under ``root``: (folder, dataset.json)."""
    for n in dict.fromkeys(names):
        if "/" in n or "\\" in n or n.startswith("."):
            continue
        d = root / n
        info = read_info(d)
        if info is not None:
            return d, info
    return None


def _url_not_prepared(url: str, root: Path, root_opt: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{url} is not prepared under {root}; run: ddpmctl download {url} --sha256 HEX --name NAME"
        f"{root_opt} (or use {url}#sha256=HEX as the source to download it automatically)")


def _check_local(path: Path) -> Path:
    path = path.expanduser()
    if not path.exists():
        raise UsageError(f"no such folder or archive: {path}")
    return path


def _find_prepared(root: Path, source: str, size: int, channels: int, **request) -> tuple[Path, dict] | None:
    """The best prepared dataset from ``source``: same size and channels, else same size, else any."""
    best, best_score = None, -1
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            info = read_info(d)
        except DataError:
            continue
        if not info or info.get("source") != source:
            continue
        req = info.get("request", {})
        if any(v is not None and req.get(k) != v for k, v in request.items()):
            continue
        score = 2 * (info.get("size") == size) + (info.get("channels") == channels)
        if score > best_score:
            best, best_score = (d, info), score
    return best


def _from_prepared(ds: Path, info: dict, split: str, image_size: int, channels: int, on_event) -> ImageData:
    import torch

    from ddpmctl.data.convert import convert_images

    arr = load_array(ds, info, split)
    x = torch.from_numpy(arr)
    n, c, h, _ = x.shape
    if c != channels or h != image_size:
        emitter(on_event)({
            "event": "convert", "name": info.get("name"), "from_size": h, "to_size": image_size,
            "from_channels": c, "to_channels": channels,
            "message": f"{info.get('name')}: converting {n} images from {h}x{h}x{c} to "
                       f"{image_size}x{image_size}x{channels} on load",
        })
        x = convert_images(x, image_size, channels)
    out = dict(info)
    out.update(split=split, count=int(n), size=image_size, channels=channels, path=str(ds),
               prepared_size=info.get("size"), prepared_channels=info.get("channels"))
    labels, classes = None, None
    label_name = (info.get("labels") or {}).get(split)
    if label_name:
        classes = list(info.get("classes") or [])
        labels = torch.from_numpy(load_labels(ds, info, split, int(n), info.get("sha256", {}).get(label_name)))
    return ImageData(info.get("name", ds.name), x.contiguous(), out, labels, classes)


def _load_shapes(split: str, image_size: int, channels: int) -> ImageData:
    import torch

    if split not in DEFAULT_COUNT:
        raise UsageError(f"shapes has splits {', '.join(DEFAULT_COUNT)}, not {split!r}")
    n, seed = DEFAULT_COUNT[split], SEEDS[split]
    arr, kinds = make_shapes(n, image_size, channels, seed)
    return ImageData("shapes", torch.from_numpy(arr), shapes_info(split, n, image_size, channels, seed, kinds),
                     torch.from_numpy(kinds.astype("int64")), list(KINDS))


def _load_local(path: Path, split: str, image_size: int, channels: int, on_event) -> ImageData:
    import torch

    path = _check_local(path)
    if split != "train":
        if path.is_dir() and (path / split).is_dir():
            path = path / split
        else:
            raise UsageError(f"{path} has no split {split!r} (a folder may hold one subfolder per split)")
    local = open_local(path)
    pp = Preprocess(image_size, channels)
    if local.total == 0:
        raise no_images_error(local)
    res = decode_many(local.items(), local.total, pp, on_event=on_event, stage="decode", split=split)
    skipped = Skipped()
    skipped.merge(local.skipped)
    skipped.merge(res.skipped)
    skipped.report(on_event, split)
    if res.count == 0:
        raise no_images_error(local, skipped)
    arr = res.array if res.count == local.total else res.array.copy()
    name = path.name
    from ddpmctl.data.archive import archive_stem

    if path.is_file():
        name = archive_stem(path)
    info = {
        "format": "local", "name": name, "source": str(path.resolve()), "revision": None, "split": split,
        "splits": [split], "count": res.count, "counts": {split: res.count}, "size": image_size,
        "channels": channels, "sha256": None, "preprocessing": pp.describe(), "skipped": {split: skipped.to_info()},
        "licence": "your own data",
    }
    found = folder_labels(res.names)
    labels, classes = (torch.from_numpy(found[0]), found[1]) if found else (None, None)
    if classes:
        info["classes"] = classes
    return ImageData(name, torch.from_numpy(arr), info, labels, classes)
