"""Class labels of a dataset: int64 (N,) indices into a list of class names.

Where they come from: the built-in ``shapes`` (circle, square, triangle), torchvision's MNIST,
Fashion-MNIST and CIFAR-10 targets (kept at prepare time), and a folder (or archive) laid out as
torchvision's ImageFolder: one sub-folder per class, the images directly inside them. A prepared
dataset keeps them beside its images as ``labels_SPLIT.npy`` (a plain int64 .npy file, read with
``allow_pickle=False``, its sha256 in dataset.json) and the names as dataset.json's ``classes``;
datasets prepared before labels existed simply have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddpmctl.errors import DataError


def label_file(split: str) -> str:
    return f"labels_{split}.npy"


def folder_labels(names: Sequence[str]) -> tuple[np.ndarray, list[str]] | None:
    """(labels, class names sorted) when every image sits directly in a class folder (CLASS/FILE,
    after one common top folder, as archives often have) and there are at least two classes; else None."""
    parts = [n.split("/") for n in names]
    if parts and all(len(p) == 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # archive.zip holding photos/CLASS/FILE
    if not parts or any(len(p) != 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    if len(classes) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), classes


def why_unlabelled(info: dict) -> str:
    """Why a dataset has no labels, and what has them: for the message of a conditional run."""
    name = info.get("name", "this dataset")
    return (f"{name} has no class labels, so it cannot train a conditional model; labelled sources: shapes, "
            "mnist, fashion-mnist, cifar10, or a folder with one sub-folder per class (CLASS/image.png, "
            "at least two classes); a dataset prepared before ddpmctl kept labels needs "
            "`ddpmctl download NAME --force` once")


def load_labels(ds_dir: Path, info: dict, split: str, count: int, sha256: str | None) -> np.ndarray:
    """labels_SPLIT.npy checked: int64 (count,), every value an index into info['classes'], sha256."""
    from ddpmctl.smallfiles import sha256_file

    path = ds_dir / label_file(split)
    redo = f"delete {ds_dir} and run the download again"
    k = len(info.get("classes") or [])
    if sha256 and sha256_file(path) != sha256:
        raise DataError(f"{path} fails its checksum (expected sha256 {sha256}); {redo}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; {redo}") from exc
    if arr.dtype != np.int64 or arr.shape != (count,):
        raise DataError(f"{path} holds {arr.dtype} {arr.shape}, expected int64 ({count},); {redo}")
    if count and (arr.min() < 0 or arr.max() >= k):
        raise DataError(f"{path} has labels outside 0..{k - 1} (the {k} classes of dataset.json); {redo}")
    return arr
