"""Image decoding: bytes or files -> uint8 (C, S, S) arrays, on all CPU cores.

One decoder for every source (folders, archives, Hub parquet, downloads), so every
dataset gets the same treatment:

1. open with Pillow (header only) and refuse images over :data:`MAX_IMAGE_PIXELS`
   (decompression bombs: a tiny file that claims a huge canvas);
2. skip images with one side over :data:`MAX_ASPECT` times the other (their centred square is a
   sliver); apply the EXIF orientation; flatten transparency onto white;
3. crop (a fixed relative box, or the largest centred square), then resize to ``size`` x ``size``
   with Pillow's antialiased bicubic filter;
4. convert to L (ITU-R 601-2 luma) or RGB.

Truncated or undecodable files are skipped and counted, never fatal. Pillow releases the GIL
while decoding and resizing but parses headers in Python, so threads stop scaling at 2-3 cores:
large jobs run in worker processes (about 4x faster than threads on 16 cores), small ones in threads.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps

from ddpmctl.data._events import Event, Progress, emitter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Refuse images whose canvas exceeds this many pixels (8192 x 8192); Pillow's own default is 89.5M.
MAX_IMAGE_PIXELS = 1 << 26
CHUNK = 64  # images per task handed to a worker
PROCESS_MIN_IMAGES = 2048  # below this, threads (no process start-up cost)

Source = Union[bytes, str, os.PathLike]

# Skip reasons (keys of the ``skipped`` counters in dataset.json).
UNDECODABLE = "undecodable or truncated image"
BOMB = "decompression bomb (more than %d pixels)" % MAX_IMAGE_PIXELS
NOT_IMAGE = "not an image file"
# A centred square of a 500x1 strip is one pixel: upscaled, it is a flat colour, not a training image.
MAX_ASPECT = 8
EXTREME_ASPECT = "extreme aspect ratio (one side over %d times the other)" % MAX_ASPECT


class SkipImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def accepted_extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def is_image_name(name: str) -> bool:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base.startswith("."):  # .DS_Store, macOS "._x.png" resource forks
        return False
    return base.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Preprocess:
    """How raw images become training images."""

    size: int
    channels: int | None = None  # 1, 3, or None = auto (3 unless every image is grayscale)
    # Crop box as fractions of (width, height, width, height); None = the largest centred square.
    crop: tuple[float, float, float, float] | None = None
    crop_name: str = "center-square"

    def describe(self) -> dict:
        return {
            "crop": self.crop_name,
            "crop_box_fraction": list(self.crop) if self.crop else None,
            "resize": f"{self.size}x{self.size}, Pillow bicubic (antialiased)",
            "channels": {1: "L (ITU-R 601-2 luma)", 3: "RGB", None: "auto"}[self.channels],
            "exif_orientation": "applied",
            "alpha": "flattened onto white",
            "aspect_ratio": f"images with one side over {MAX_ASPECT}x the other are skipped",
        }


def _crop_box(w: int, h: int, pp: Preprocess) -> tuple[float, float, float, float]:
    if pp.crop is not None:
        l, t, r, b = pp.crop
        return (l * w, t * h, r * w, b * h)
    s = min(w, h)
    left, top = (w - s) / 2, (h - s) / 2
    return (left, top, left + s, top + s)


def decode_image(src: Source, pp: Preprocess) -> tuple[np.ndarray, bool]:
    """Decode one image. Returns (uint8 array (C, S, S), is_grayscale) or raises :class:`SkipImage`."""
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb")
    except OSError as exc:
        raise SkipImage(UNDECODABLE) from exc
    try:
        try:
            im = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SkipImage(BOMB) from exc  # (the warning is turned into an error while decoding)
        except Exception as exc:  # UnidentifiedImageError, SyntaxError, struct errors...
            raise SkipImage(UNDECODABLE) from exc
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise SkipImage(BOMB)
        if w < 1 or h < 1:
            raise SkipImage(UNDECODABLE)
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise SkipImage(EXTREME_ASPECT)
        try:
            box = _crop_box(w, h, pp)
            side = min(box[2] - box[0], box[3] - box[1])
            if im.format == "JPEG" and side >= 4 * pp.size:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping at least 2x the target size.
                scale = 2 * pp.size / side
                im.draft(im.mode if im.mode in ("L", "RGB") else "RGB", (int(w * scale) + 1, int(h * scale) + 1))
                sx, sy = im.size[0] / w, im.size[1] / h
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                w, h = im.size
            transposed = ImageOps.exif_transpose(im)
            if transposed is not im and transposed.size != (w, h):
                w, h = transposed.size
                box = _crop_box(w, h, pp)
            im = transposed
            gray_mode = im.mode in ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")
            if im.mode in ("I", "I;16", "I;16L", "I;16B", "F"):
                arr = np.asarray(im, dtype=np.float64)
                hi = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                flat.alpha_composite(rgba)
                im = flat.convert("L" if gray_mode else "RGB")
            target = pp.channels or (1 if gray_mode else 3)
            mode = "L" if target == 1 else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            # Crop first (resize(box=...) would let pixels outside the box bleed into the edges).
            left, top = (min(int(round(v)), n - 1) for v, n in zip(box[:2], (w, h)))
            ibox = (left, top, max(left + 1, int(round(box[2]))), max(top + 1, int(round(box[3]))))  # >= 1 px
            if ibox != (0, 0, w, h):
                im = im.crop(ibox)
            if im.size != (pp.size, pp.size):
                im = im.resize((pp.size, pp.size), Image.Resampling.BICUBIC)
            arr = np.asarray(im)
        except SkipImage:
            raise
        except Exception as exc:  # truncated data, broken chunks, decoder errors
            raise SkipImage(UNDECODABLE) from exc
    finally:
        fp.close()
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    out_c = pp.channels or 3
    if arr.shape[0] != out_c:  # auto mode decodes grayscale as L, stores RGB until the end
        arr = np.repeat(arr, out_c, axis=0)
        return np.ascontiguousarray(arr), True
    if out_c == 3 and pp.channels is None and not gray_mode:
        gray_mode = bool((arr[0] == arr[1]).all() and (arr[1] == arr[2]).all())
    return np.ascontiguousarray(arr), gray_mode or out_c == 1


@dataclass
class Skipped:
    """Skip counters: reason -> count, with a few example names per reason."""

    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, name: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5 and name:
            ex.append(name)

    def merge(self, other: "Skipped") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: 5 - len(ex)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_info(self) -> dict:
        return {r: {"count": n, "examples": self.examples.get(r, [])} for r, n in sorted(self.counts.items())}

    def report(self, on_event: Event | None, split: str | None = None) -> None:
        emit = emitter(on_event)
        for reason, n in sorted(self.counts.items()):
            ex = self.examples.get(reason, [])
            msg = f"skipped {n} file(s): {reason}" + (f" (e.g. {', '.join(ex[:3])})" if ex else "")
            ev = {"event": "skipped", "count": n, "reason": reason, "examples": ex, "message": msg}
            if split is not None:
                ev["split"] = split
            emit(ev)


@dataclass
class Decoded:
    array: np.ndarray  # (count, C, S, S) uint8 (a view of the buffer's first rows)
    count: int
    all_gray: bool
    skipped: Skipped
    images_per_s: float
    names: list[str]  # the name of every kept image, in array order (class folders give labels)


def _decode_chunk(chunk: list[tuple[str, Source]], pp: Preprocess) -> list:
    out = []
    for name, src in chunk:
        try:
            arr, gray = decode_image(src, pp)
            out.append((name, arr, gray, None))
        except SkipImage as exc:
            out.append((name, None, False, exc.reason))
    return out


def _chunks(items: Iterable[tuple[str, Source]], n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def workers() -> int:
    """CPU cores this process may use (container/affinity limits respected), at most 32."""
    n = None
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        n = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    return max(1, min(32, n or os.cpu_count() or 1))


def _quiet_pillow_warnings() -> None:
    # Pillow warns (on stderr) about odd files; a bomb warning becomes an error and a skip.
    warnings.filterwarnings("ignore", module=r"PIL(\..*)?")
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _process_pool(n: int):
    """Worker processes for decoding. Pillow parses image headers in Python, holding the GIL,
    so threads stop scaling at 2-3 cores; processes scale with the cores. "spawn" (or forkserver
    on Linux) never forks a parent that may hold threads or a CUDA context."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(method), initializer=_worker_init,
                               initargs=(os.getpid(),))


def _worker_init(parent: int) -> None:
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the pool)
    _quiet_pillow_warnings()
    if os.name == "posix":
        def watchdog() -> None:  # a parent killed outright cannot stop its pool: leave on our own
            while True:
                time.sleep(1.0)
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    os._exit(0)
                except OSError:
                    pass

        threading.Thread(target=watchdog, daemon=True, name="ddpmctl-parent-watch").start()


def decode_many(items: Iterable[tuple[str, Source]], total: int, pp: Preprocess, *,
                out: np.ndarray | None = None, on_event: Event | None = None,
                stage: str = "prepare", split: str | None = None, processes: bool | None = None) -> Decoded:
    """Decode up to ``total`` images in order into ``out`` (or a new array), skipping bad ones.

    ``items`` yields ``(name, bytes-or-path)``; it is consumed lazily with a bounded number of
    chunks in flight, so a tar stream or a parquet file is never held in memory whole.
    ``processes``: decode in worker processes (default: ``$DDPMCTL_DECODE`` = threads | processes,
    else processes when there are at least :data:`PROCESS_MIN_IMAGES` images and 4 cores), else
    in threads. Worker processes are started with forkserver/spawn, so a script that prepares a
    large dataset needs the usual ``if __name__ == "__main__":`` guard.
    """
    c = pp.channels or 3
    if out is None:
        out = np.empty((total, c, pp.size, pp.size), dtype=np.uint8)
    assert out.shape[0] >= total and out.shape[1:] == (c, pp.size, pp.size), (out.shape, total)
    skipped = Skipped()
    progress = Progress(on_event, stage, total, split=split)
    count, all_gray = 0, True
    kept: list[str] = []
    nworkers = workers()
    if processes is None:
        mode = os.environ.get("DDPMCTL_DECODE", "auto").strip().lower()
        processes = {"threads": False, "processes": True}.get(
            mode, nworkers >= 4 and total >= PROCESS_MIN_IMAGES)
    with warnings.catch_warnings():
        _quiet_pillow_warnings()
        pool = (_process_pool(nworkers) if processes
                else ThreadPoolExecutor(max_workers=nworkers, thread_name_prefix="ddpmctl-decode"))
        try:
            pending: deque = deque()

            def drain_one() -> None:
                nonlocal count, all_gray
                for name, arr, gray, reason in pending.popleft().result():
                    if arr is None:
                        skipped.add(reason, name)
                    elif count >= out.shape[0]:
                        raise AssertionError("more images than announced")
                    else:
                        out[count] = arr
                        kept.append(name)
                        count += 1
                        all_gray = all_gray and gray
                    progress.update(1)

            for chunk in _chunks(items, CHUNK):
                pending.append(pool.submit(_decode_chunk, chunk, pp))
                if len(pending) >= 2 * nworkers:
                    drain_one()
            while pending:
                drain_one()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    rate = progress.close()
    return Decoded(out[:count], count, all_gray and count > 0, skipped, rate, kept)
