"""The datasets ddpmctl knows by name, and where each one comes from.

* ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's dataset classes (their mirrors and
  MD5 checks) download into ``ROOT/.cache/torchvision``; prepared at their native size.
* ``celeba``: the aligned-and-cropped CelebA images (178x218) from the Hub mirror
  :data:`CELEBA_HUB_REPO`, torchvision's ``CelebA`` as fallback; cropped as the DDIM code does
  (a 128x128 box centred on (x=89, y=121), see :data:`CELEBA_CROPS`) and resized to 64.
* ``celeba-hq``: the 30,000 CelebA-HQ faces from :data:`CELEBA_HQ_HUB_REPO`, resized to ``--size``.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddpmctl.data._events import Event, emitter
from ddpmctl.data.fetch import size_line
from ddpmctl.errors import DataError, NetworkError

# Hub mirrors (module constants so a mirror change is a one-line edit).
# flwrlabs/celeba: the official aligned 178x218 images with the official train/valid/test partition.
CELEBA_HUB_REPO = "flwrlabs/celeba"
# mattymchen/celeba-hq: the 30,000 CelebA-HQ images, 28,000 train / 2,000 validation.
CELEBA_HQ_HUB_REPO = "mattymchen/celeba-hq"

# Crop boxes for the 178x218 aligned CelebA images, as (left, top, right, bottom) pixels.
# "ddim": ermongroup/ddim datasets/__init__.py (from NCSN): 128x128 centred on (x=89, y=121).
# "center140": the 140x140 centre crop, another common CelebA-64 preprocessing.
CELEBA_SIZE = (178, 218)
CELEBA_CROPS = {
    "ddim": (25, 57, 153, 185),
    "center140": (19, 39, 159, 179),
}

# torchvision's CelebA fallback fetches img_align_celeba.zip (this many bytes) and five annotation files.
CELEBA_ZIP_BYTES = 1_443_490_838

ALIASES = {
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "celeba64": "celeba", "celeba-64": "celeba",
    "celeba_hq": "celeba-hq", "celebahq": "celeba-hq",
}


@dataclass(frozen=True)
class KnownDataset:
    name: str
    kind: str  # "torchvision" or "hub"
    size: int  # default prepared size
    channels: int
    splits: tuple[str, ...]
    licence: str
    description: str
    hub_repo: str | None = None
    hub_splits: dict = field(default_factory=dict)  # our split -> the Hub's split name
    crops: tuple[str, ...] = ()  # crop choices; the first is the default
    high_res: bool = False  # the source is larger than `size`, so other sizes are prepared, not upscaled
    # torchvision datasets: what torchvision fetches (every split at once), in bytes, and the files. Stated
    # before it starts, since its downloader shows no Content-Length to us. The Hub's listing gives its own sizes.
    download_bytes: int | None = None
    download_files: str = ""

    @property
    def source(self) -> str:
        if self.kind == "hub":
            return f"hf://datasets/{self.hub_repo}"
        return f"torchvision:{self.name}"


KNOWN: dict[str, KnownDataset] = {
    "mnist": KnownDataset(
        "mnist", "torchvision", 28, 1, ("train", "test"),
        "MNIST (LeCun, Cortes, Burges): commonly distributed under CC BY-SA 3.0",
        "70,000 handwritten digits, 28x28 grayscale",
        # train-images-idx3-ubyte.gz 9,912,422 + train-labels 28,881 + t10k-images 1,648,877 + t10k-labels 4,542
        download_bytes=11_594_722, download_files="4 gzipped IDX files"),
    "fashion-mnist": KnownDataset(
        "fashion-mnist", "torchvision", 28, 1, ("train", "test"),
        "Fashion-MNIST (Zalando Research): MIT licence",
        "70,000 clothing images, 28x28 grayscale",
        # train-images-idx3-ubyte.gz 26,421,880 + train-labels 29,515 + t10k-images 4,422,102 + t10k-labels 5,148
        download_bytes=30_878_645, download_files="4 gzipped IDX files"),
    "cifar10": KnownDataset(
        "cifar10", "torchvision", 32, 3, ("train", "test"),
        "CIFAR-10 (Krizhevsky 2009): no explicit licence; "
        "cite 'Learning Multiple Layers of Features from Tiny Images'",
        "60,000 small natural images, 32x32 RGB",
        download_bytes=170_498_071, download_files="cifar-10-python.tar.gz"),
    "celeba": KnownDataset(
        "celeba", "hub", 64, 3, ("train", "test"),
        "CelebA Dataset Release Agreement: non-commercial research and educational use only",
        "CelebA aligned faces (162,770 train / 19,962 test), DDIM crop, 64x64 RGB",
        hub_repo=CELEBA_HUB_REPO, hub_splits={"train": "train", "test": "test"},
        crops=("ddim", "center140"), high_res=True),
    "celeba-hq": KnownDataset(
        "celeba-hq", "hub", 64, 3, ("train", "test"),
        "CelebA-HQ (Karras et al. 2018, from CelebA): non-commercial research use only "
        "(CC BY-NC 4.0 / CelebA agreement)",
        "30,000 high-quality faces (28,000 train / 2,000 test), resized to --size (default 64)",
        hub_repo=CELEBA_HQ_HUB_REPO, hub_splits={"train": "train", "test": "validation"},
        high_res=True),
}


def canonical(name: str) -> str | None:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    return n if n in KNOWN else None


def variant_name(kd: KnownDataset, size: int, crop: str | None) -> str:
    """The prepared name: ``celeba`` at the default size and crop, else ``celeba-128``, ``celeba-64-center140``."""
    name = kd.name
    if size != kd.size or (crop and kd.crops and crop != kd.crops[0]):
        name = f"{name}-{size}"
    if crop and kd.crops and crop != kd.crops[0]:
        name = f"{name}-{crop}"
    return name


def crop_fraction(crop: str) -> tuple[float, float, float, float]:
    l, t, r, b = CELEBA_CROPS[crop]
    w, h = CELEBA_SIZE
    return (l / w, t / h, r / w, b / h)


@contextlib.contextmanager
def quiet():
    """Silence torchvision's prints and progress bars (the library never prints)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def torchvision_arrays(kd: KnownDataset, raw: Path, split: str,
                       on_event: Event | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Download (if needed, MD5-checked by torchvision) and return (uint8 (N, C, H, W) at native size,
    int64 (N,) labels, class names; MNIST's '3 - three' named '3').

    A ``download`` event states the size (:attr:`KnownDataset.download_bytes`) before torchvision
    starts fetching; files already in ``raw`` are read without one."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[kd.name]
    emit = emitter(on_event)
    retry = "check your connection and run the same command again"

    def dataset(download: bool):
        with quiet():
            return cls(str(raw), train=(split == "train"), download=download)

    try:
        ds = dataset(False)  # already in the raw cache (torchvision checks what it needs)
        emit({"event": "message", "message": f"{kd.name} {split}: reading torchvision's copy in {raw}"})
    except (RuntimeError, OSError):
        ds = None
    if ds is None:
        where = f"({kd.download_files}, every split) with torchvision into {raw}, MD5-checked"
        emit({"event": "download", "source": kd.source, "name": kd.name, "bytes": kd.download_bytes,
              "message": size_line(kd.name, kd.download_bytes, where, unknown="its size is not known in advance")})
        try:
            ds = dataset(True)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NetworkError(f"could not download {kd.name} with torchvision: {getattr(exc, 'reason', exc)}; "
                               f"{retry}") from exc
        except RuntimeError as exc:
            msg = str(exc)
            if "download" in msg.lower() or "not found" in msg.lower():
                raise NetworkError(f"could not download {kd.name} with torchvision: {msg}; {retry}") from exc
            raise DataError(f"torchvision could not read {kd.name} in {raw}: {msg}; delete that folder and retry") \
                from exc
        except OSError as exc:
            raise NetworkError(f"could not download {kd.name} with torchvision: {exc}; {retry}") from exc
    data = ds.data
    arr = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    if arr.dtype != np.uint8:
        raise DataError(f"unexpected {kd.name} data type {arr.dtype} from torchvision")
    if arr.ndim == 3:
        arr = arr[:, None]
    else:
        arr = arr.transpose(0, 3, 1, 2)
    targets = ds.targets
    labels = np.asarray(targets.numpy() if hasattr(targets, "numpy") else targets, dtype=np.int64)
    classes = [c.split(" - ")[0] if kd.name == "mnist" else c for c in ds.classes]
    if labels.shape != (arr.shape[0],):
        raise DataError(f"torchvision gave {labels.shape[0]} labels for {arr.shape[0]} {kd.name} images")
    return np.ascontiguousarray(arr), labels, classes


def torchvision_celeba_paths(raw: Path, split: str, on_event: Event | None = None) -> list[Path]:
    """Fallback for celeba: torchvision's CelebA (Google Drive; needs the `gdown` package). A
    ``download`` event states the size of img_align_celeba.zip before torchvision starts fetching."""
    import torchvision.datasets as tvd

    def dataset(download: bool):
        with quiet():
            return tvd.CelebA(str(raw), split="valid" if split == "validation" else split, target_type=[],
                              download=download)

    try:
        ds = dataset(False)  # already in the raw cache
    except Exception:
        ds = None
    if ds is None:
        emitter(on_event)({"event": "download", "source": "torchvision:celeba", "name": "celeba",
                           "bytes": CELEBA_ZIP_BYTES, "message": size_line(
                               "celeba", CELEBA_ZIP_BYTES, f"(img_align_celeba.zip, plus about 50 MB of annotation "
                               f"files) from Google Drive with torchvision into {raw}")})
        try:
            ds = dataset(True)
        except Exception as exc:  # gdown missing, quota exceeded, network down...
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "gdown" in first:  # installing gdown would not help: Drive's CelebA copy is rate-limited
                first = "it downloads from Google Drive, which needs the gdown package and is often over quota"
            raise NetworkError(f"torchvision could not download CelebA: {first}") from exc
    folder = Path(ds.root) / ds.base_folder / "img_align_celeba"
    return [folder / f for f in ds.filename]
