"""Quality numbers for a trained model: bits/dim, FID and KID.

* **bits/dim** — the variational bound of Ho et al. 2020 (eq. 5) on held-out images, as in
  improved-diffusion: the decoder NLL at t = 0, the KL terms for t > 0 and the prior term,
  each in bits per dimension (:func:`ddpmctl.diffusion.calc_bpd_loop` does the maths).
* **FID** (Heusel et al. 2017) — the Fréchet distance between Gaussians fitted to the 2048-d
  pool features of the TensorFlow Inception-v3 ("2015-12-05", the network of the original TF
  FID code, of pytorch-fid and of torch-fidelity), here through torch-fidelity's port
  (the optional ``eval`` extra).
* **KID** (Bińkowski et al. 2018) — the unbiased MMD² estimate with the cubic polynomial kernel
  on the same features, averaged over random subsets.

Reference statistics of a dataset split are cached in an ``.npz`` file (read with
``allow_pickle=False``) named after a hash of the images and of the Inception weights, next to
the prepared data. Results are appended to ``RUN_DIR/eval.jsonl`` (ddpmctl.rundir.append_eval_log).

The library never prints: progress goes through ``on_event(dict)``, problems are raised as
:class:`~ddpmctl.errors.DdpmctlError` subclasses.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ddpmctl import __version__
from ddpmctl.data._events import Progress, emitter
from ddpmctl.data.loader import to_unit_range
from ddpmctl.diffusion import ModelFn, Prediction, Schedule, calc_bpd_loop
from ddpmctl.errors import DataError, DdpmctlError, NonFiniteError, UsageError
from ddpmctl.extras import install_hint
from ddpmctl.rundir import EVAL_LOG, append_eval_log
from ddpmctl.safefile import atomic_write
from ddpmctl.writes import WriteError

Event = Callable[[dict], None]

METRICS = ("bpd", "fid", "kid")
FID_UNBIASED_N = 50_000  # FID from fewer samples is biased upward (Bińkowski et al. 2018, sec. 3)
FEATURE_DIM = 2048
EXTRA_INSTALL = install_hint("eval")
EXTRA_HINT = (f"FID and KID need the optional 'eval' extra (torch-fidelity's Inception-v3): {EXTRA_INSTALL}; "
              "--metric bpd works without it")
STATS_FORMAT = "ddpmctl-inception-stats/1"
# Default split per metric: the likelihood is measured on held-out images (Ho et al., table 2), FID
# against the training images (Ho et al. sec. 4: "FID ... computed with respect to the training set").
DEFAULT_SPLIT = {"bpd": "test", "fid": "train", "kid": "train"}


# ---------------------------------------------------------------------------------------------
# bits/dim
# ---------------------------------------------------------------------------------------------


@dataclass
class BpdResult:
    """Means over images, in bits/dim; ``total = prior + kl + decoder``."""

    total: float
    prior: float
    kl: float
    decoder: float
    total_sem: float | None  # standard error of the mean of ``total`` over images (None for one image)
    n: int
    stride: int
    timesteps: int
    evaluated: int  # network evaluations per image (the prior term needs none)

    @property
    def exact(self) -> bool:
        """Every t evaluated (stride 1, or a stride so large that calc_bpd_loop evaluates all t)."""
        return self.evaluated >= self.timesteps

    @property
    def note(self) -> str:
        if self.exact:
            return (f"every t of {self.timesteps} evaluated (one noise draw per t and image): an unbiased "
                    "estimate of the bound")
        k = self.stride
        return (f"strided (--stride {k}): {self.evaluated} of {self.timesteps} terms evaluated per image, t = 0..{k} "
                f"exactly and one random t per block of {k} steps weighted by {k} (stratified); unbiased in "
                "expectation but noisier per image, so the ± is wider; use --stride 1 for numbers to report")

    def to_dict(self) -> dict:
        return {"bits_per_dim": self.total, "sem": self.total_sem,
                "terms": {"prior": self.prior, "kl": self.kl, "decoder": self.decoder},
                "n": self.n, "stride": self.stride, "timesteps": self.timesteps,
                "network_evaluations_per_image": self.evaluated, "exact": self.exact, "note": self.note}


def bits_per_dim(
    model_fn: ModelFn,
    schedule: Schedule,
    images: Tensor,
    *,
    prediction: Prediction = "eps",
    device: torch.device | str = "cpu",
    stride: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    on_event: Event | None = None,
) -> BpdResult:
    """The variational bound (Ho eq. 5) in bits/dim over uint8 ``images`` (N, C, H, W), in batches.

    Each batch goes through :func:`~ddpmctl.diffusion.calc_bpd_loop` (prior + sum of KL terms +
    decoder NLL, with ``stride`` as documented there); noise comes from one generator on ``device``
    seeded with ``seed``. Progress: ``{"event": "progress", "stage": "bits/dim", ...}``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UsageError(f"bits/dim needs uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise DataError("no images to measure bits/dim on")
    if not isinstance(stride, int) or stride < 1:
        raise UsageError(f"--stride {stride}: must be a positive integer")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    device = torch.device(device)
    s = schedule.to(device, torch.float32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    n = int(images.shape[0])
    parts: dict[str, list[Tensor]] = {"total": [], "prior": [], "kl": [], "decoder": []}
    calls = 0

    def counted(x: Tensor, t: Tensor, cond=None) -> Tensor:
        nonlocal calls
        calls += 1
        return model_fn(x, t, cond)

    progress = Progress(on_event, "bits/dim", n)
    for start in range(0, n, batch_size):
        x0 = to_unit_range(images[start : start + batch_size].to(device))  # the scaling training uses
        calls = 0
        out = calc_bpd_loop(counted, s, x0, gen, stride, prediction=prediction)
        for k in parts:
            parts[k].append(out[k].detach().to("cpu", torch.float64))
        progress.update(x0.shape[0])
    progress.close()
    terms = {k: torch.cat(v) for k, v in parts.items()}
    if not all(bool(torch.isfinite(v).all()) for v in terms.values()):
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
        raise NonFiniteError(f"bits/dim: non-finite {', '.join(bad)} term(s); the checkpoint's weights are "
                             "probably broken (did training diverge?)")
    total = terms["total"]
    sem = float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else None  # JSON null: one image has no spread
    return BpdResult(total=float(total.mean()), prior=float(terms["prior"].mean()), kl=float(terms["kl"].mean()),
                     decoder=float(terms["decoder"].mean()), total_sem=sem, n=n, stride=stride,
                     timesteps=schedule.T, evaluated=calls)


# ---------------------------------------------------------------------------------------------
# Fréchet distance and KID (pure maths, no Inception needed)
# ---------------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray | Tensor, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64; the covariance is unbiased (divides by N - 1)."""
    f = features.numpy() if isinstance(features, Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise UsageError(f"feature statistics need at least 2 feature vectors, got shape {tuple(f.shape)}")
    n = f.shape[0]
    mu = f.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((f.shape[1], f.shape[1]), dtype=np.float64)
    for i in range(0, n, chunk):  # two passes (centre, then accumulate) keep the float64 sum accurate
        c = f[i : i + chunk].astype(np.float64) - mu
        sigma += c.T @ c
    return mu, sigma / (n - 1)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_eig(m: np.ndarray) -> float:
    """Tr m^{1/2} for a symmetric PSD ``m``: the sum of the square roots of its eigenvalues."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (sigma1 sigma2)^{1/2} for symmetric PSD matrices.

    With sigma1 = B B^T (Cholesky; the symmetric square root when sigma1 is singular), sigma1 sigma2
    has the eigenvalues of the symmetric PSD B^T sigma2 B, so one symmetric eigenvalue problem in
    float64 replaces the general ``sqrtm`` / ``eigvals`` of the TF and PyTorch FID codes (no complex
    parts, no offset for ill-conditioned products).
    """
    try:
        b = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        b = _psd_sqrt(sigma1)
    return _trace_sqrt_eig(b.T @ sigma2 @ b)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})   (Dowson & Landau 1982;
    Heusel et al. 2017, eq. 6), with :func:`trace_sqrt_product` for the last term.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UsageError(f"Fréchet distance: mismatched statistics {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def frechet_distance_from_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """:func:`frechet_distance` between the Gaussian fitted to (N, D) ``features`` and N(mu2, sigma2).

    For N <= D the sample covariance is X^T X with X the centred features / sqrt(N - 1), and
    sigma1 sigma2 shares its non-zero eigenvalues with the N x N matrix X sigma2 X^T, so the
    D x D eigenproblem shrinks to N x N (the same number, much faster for quick checks).
    """
    f = np.asarray(features)
    n, d = f.shape
    if n < 2:
        raise UsageError(f"FID needs at least 2 samples, got {n}")
    if n > d:
        mu1, s1 = feature_stats(f)
        return frechet_distance(mu1, s1, mu2, sigma2)
    mu1 = f.mean(axis=0, dtype=np.float64)
    x = (f.astype(np.float64) - mu1) / math.sqrt(n - 1)
    s2 = np.asarray(sigma2, np.float64)
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + (x * x).sum() + np.trace(s2) - 2.0 * _trace_sqrt_eig(x @ s2 @ x.T))


def polynomial_kernel(x, y):
    """k(x, y) = (x . y / d + 1)^3, the KID kernel (Bińkowski et al. 2018, sec. 2.4). NumPy arrays or tensors."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with :func:`polynomial_kernel`, for NumPy arrays or tensors:

    1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise UsageError("KID needs at least 2 feature vectors on each side")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    f1: np.ndarray | Tensor,
    f2: np.ndarray | Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """KID: the mean (and std) of :func:`mmd2_unbiased` over ``subsets`` random subsets of each set.

    Subsets of ``min(subset_size, len(f1), len(f2))`` vectors are drawn without replacement from a
    NumPy generator seeded with ``seed``; the kernel runs in float64, with NumPy on the CPU (the BLAS
    the FID maths uses too, so the two never fight over cores) or with torch on a CUDA ``device``.
    The mean is unbiased for MMD^2, so it can be slightly negative when both sets come from one
    distribution.
    """
    a = np.asarray(f1.cpu().numpy() if isinstance(f1, Tensor) else f1, dtype=np.float64)
    b = np.asarray(f2.cpu().numpy() if isinstance(f2, Tensor) else f2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise UsageError(f"KID: feature arrays must be (N, D) with one D, got {a.shape} and {b.shape}")
    if subsets < 1:
        raise UsageError(f"--kid-subsets {subsets}: must be at least 1")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise UsageError(f"KID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    if device.type == "cuda":
        a, b = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    values = np.empty(subsets)
    for i in range(subsets):
        ia, ib = rng.choice(a.shape[0], m, replace=False), rng.choice(b.shape[0], m, replace=False)
        if device.type == "cuda":
            ia, ib = torch.from_numpy(ia).to(device), torch.from_numpy(ib).to(device)
        values[i] = mmd2_unbiased(a[ia], b[ib])
    return {"value": float(values.mean()), "std": float(values.std()), "subsets": int(subsets), "subset_size": m}


# ---------------------------------------------------------------------------------------------
# Inception-v3 features (torch-fidelity's port of the TF FID network)
# ---------------------------------------------------------------------------------------------


def _torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 class, or a UsageError naming the extra to install."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise UsageError(f"{EXTRA_HINT} ({exc})") from None
    return FeatureExtractorInceptionV3


def default_weights_url() -> str:
    """The URL torch-fidelity downloads its Inception-v3 weights from (a plain state dict, .pth)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    return fe.URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where torch-fidelity (through ``torch.hub``) caches those weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default_weights_url())


def read_weights(path: Path | str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a plain PyTorch file (``torch.load(weights_only=True)``).

    Nothing is unpickled: a ``.pth`` that holds anything but tensors is refused.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--inception-weights {path}: no such file; give the Inception-v3 FID weights "
                         f"(torch-fidelity's {os.path.basename(_safe_url())} or a .safetensors copy of it)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault
        raise UsageError(f"--inception-weights {path}: not a safetensors file or a plain PyTorch state dict "
                         f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UsageError(f"--inception-weights {path}: expected a state dict of tensors")
    return dict(sd)


def _safe_url() -> str:
    try:
        return default_weights_url()
    except ImportError:
        return "weights-inception-2015-12-05-6726825d.pth"


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the same weights give the same id in any file format."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fetch_default_weights(*, allow_download: bool = True, on_event: Event | None = None) -> Path:
    """torch-fidelity's weights in the torch.hub cache, downloaded (sha256-prefix checked) if missing."""
    url = default_weights_url()
    dest = default_weights_path()
    if dest.is_file():
        return dest
    if not allow_download:
        raise UsageError(f"the Inception-v3 weights are not cached at {dest} and downloads are off; "
                         "pass --inception-weights PATH")
    emitter(on_event)({"event": "download", "name": dest.name,
                       "message": f"downloading the Inception-v3 FID weights (~95 MB) to {dest}"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    m = re.search(r"-([a-f0-9]{6,})\.", dest.name)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=m.group(1) if m else None, progress=False)
    except Exception as exc:  # noqa: BLE001 - URLError, hash mismatch, disk full ...
        raise DdpmctlError(f"could not download the Inception-v3 weights from {url}: {exc}; download that file "
                           f"elsewhere and pass --inception-weights PATH") from None
    return dest


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` for the duration (torch-fidelity asks for False)."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


class InceptionFeatures:
    """uint8 images (B, C, H, W), any size, 1 or 3 channels -> float32 (B, 2048) pool features on the CPU.

    torch-fidelity's network resizes to 299x299 with TF1-compatible bilinear interpolation and
    scales to [-1, 1] itself; grayscale images are repeated to RGB, as the TF and PyTorch FID codes do.
    """

    dim = FEATURE_DIM

    def __init__(self, module: torch.nn.Module, weights_id: str, device: torch.device | str):
        self.module = module.to(device).eval()
        self.weights_id = weights_id
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UsageError(f"Inception features need uint8 (B, 1|3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (f,) = self.module(x.contiguous())
        return f.detach().to("cpu", torch.float32)


def load_inception(
    weights: Path | str | None = None,
    *,
    device: torch.device | str = "cpu",
    allow_download: bool = True,
    on_event: Event | None = None,
) -> InceptionFeatures:
    """The FID Inception-v3 from ``weights`` (.safetensors or .pth state dict), else torch-fidelity's download.

    A missing extra or weights file raises :class:`UsageError` naming what to install or pass.
    """
    if weights is not None and not Path(weights).expanduser().is_file():
        read_weights(weights)  # raises the error naming --inception-weights before anything slow
    cls = _torch_fidelity_inception()
    path = Path(weights) if weights is not None else fetch_default_weights(allow_download=allow_download,
                                                                           on_event=on_event)
    sd = read_weights(path)
    # torch-fidelity's constructor loads its weights with torch.load; hand it a buffer we serialised
    # ourselves from plain tensors, and force weights_only so that nothing is ever unpickled.
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    try:
        with _weights_only_loads():
            module = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UsageError(f"--inception-weights {path}: not the FID Inception-v3 weights torch-fidelity expects "
                         f"({first})") from None
    return InceptionFeatures(module, weights_digest(sd), device)


def extract_features(
    extractor: Callable[[Tensor], Tensor],
    batches: Iterator[Tensor] | Sequence[Tensor],
    total: int,
    *,
    stage: str = "features",
    on_event: Event | None = None,
) -> np.ndarray:
    """Features of every uint8 batch, stacked into a float32 (total, D) array."""
    out: np.ndarray | None = None
    done = 0
    progress = Progress(on_event, stage, total)
    for imgs in batches:
        f = extractor(imgs).numpy()
        if out is None:
            out = np.empty((total, f.shape[1]), dtype=np.float32)
        out[done : done + f.shape[0]] = f
        done += f.shape[0]
        progress.update(f.shape[0])
    progress.close()
    if out is None or done != total:
        raise DdpmctlError(f"{stage}: expected {total} feature vectors, got {done}")
    if not np.isfinite(out).all():
        raise NonFiniteError(f"{stage}: non-finite Inception features")
    return out


def iter_batches(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size]


# ---------------------------------------------------------------------------------------------
# Reference statistics cache
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (N, D) float32, for KID
    path: Path | None = None
    cached: bool = False  # read from the cache rather than computed now

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def images_digest(images: Tensor) -> str:
    h = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}\n".encode())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_cache_dir(data: object, root: Path | str | None = None) -> Path:
    """Where reference statistics go: ``DATASET_DIR/inception-stats/`` next to the prepared arrays when
    the dataset is prepared on disk (``ImageData.info["path"]``), else ``ROOT/.cache/inception-stats/``
    (the built-in shapes, local folders)."""
    info = getattr(data, "info", None)
    p = info.get("path") if isinstance(info, dict) else None
    if isinstance(p, (str, Path)) and Path(p).is_dir():
        return Path(p) / "inception-stats"
    from ddpmctl.data.prepared import resolve_root

    return resolve_root(root) / ".cache" / "inception-stats"


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _read_npz(path: Path, weights_id: str, digest: str) -> ReferenceStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if (meta.get("format") != STATS_FORMAT or meta.get("weights") != weights_id
                    or meta.get("images") != digest):
                return None
            return ReferenceStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                                  z["features"].astype(np.float32), path, True)
    except (OSError, ValueError, KeyError, AttributeError, RecursionError):
        return None  # unreadable or foreign: recompute and replace


def reference_stats(
    images: Tensor,
    extractor: InceptionFeatures,
    *,
    cache_dir: Path | None,
    label: str = "reference",
    batch_size: int = 200,
    on_event: Event | None = None,
) -> ReferenceStats:
    """Inception statistics of uint8 ``images``, read from or written to ``cache_dir``.

    The file is ``inception-LABEL-HASH.npz`` where HASH covers the images' bytes and the Inception
    weights, so a changed dataset or network never reuses stale statistics. Written atomically.
    """
    digest = images_digest(images)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "reference"
    key = hashlib.sha256(f"{digest}|{extractor.weights_id}".encode()).hexdigest()[:16]
    path = cache_dir / f"inception-{safe}-{key}.npz" if cache_dir is not None else None
    emit = emitter(on_event)
    if path is not None and path.is_file():
        got = _read_npz(path, extractor.weights_id, digest)
        if got is not None:
            emit({"event": "message", "message": f"reference statistics ({got.n:,} images) from the cache: {path}"})
            return got
    feats = extract_features(extractor, iter_batches(images, batch_size), int(images.shape[0]),
                             stage=f"{label} features", on_event=on_event)
    mu, sigma = feature_stats(feats)
    if path is not None:
        meta = {"format": STATS_FORMAT, "weights": extractor.weights_id, "images": digest, "n": int(feats.shape[0]),
                "label": label, "ddpmctl": __version__}
        try:
            _write_npz(path, mu=mu, sigma=sigma, features=feats, meta=np.array(json.dumps(meta)))
            emit({"event": "message", "message": f"cached reference statistics at {path}"})
        except OSError as exc:
            emit({"event": "warning", "message": f"could not cache reference statistics at {path}: {exc}"})
            path = None
    return ReferenceStats(mu, sigma, feats, path, False)


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """"bpd,fid" -> ["bpd", "fid"] in canonical order; unknown names are a UsageError."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [m.strip().lower() for m in items if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UsageError(f"--metric {','.join(names) or repr(text)}: expected a comma-separated list of "
                         f"{', '.join(METRICS)}")
    return [m for m in METRICS if m in names]


@dataclass
class EvalOptions:
    metrics: list[str] = field(default_factory=lambda: ["bpd"])
    data: str | None = None  # default: the run's training data
    split: str | None = None  # default: DEFAULT_SPLIT per metric
    n: int | None = None  # bpd: held-out images (default all); fid/kid: samples (default 50,000)
    sampler: str | None = None  # default: the run's spec.sample (generate.run_defaults), as `sample` draws
    steps: int | None = None
    eta: float | None = None
    guidance: float | None = None  # conditional models: classifier-free guidance (default the run's sample.guidance)
    variance: str = "beta_tilde"  # ddpm's sigma_t^2: beta_tilde or beta
    seed: int = 0
    batch_size: int = 64
    stride: int = 1
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_weights: Path | None = None
    device: str | torch.device = "auto"  # the CLI hands a resolved torch.device
    precision: str = "auto"
    use_ema: bool = True
    data_root: Path | None = None
    allow_download: bool = True
    log: bool = True


def _subset(images: Tensor, n: int | None, seed: int) -> Tensor:
    """The first ``n`` images of a seeded permutation (all of them, in order, when n is None or >= N)."""
    if n is None or n >= images.shape[0]:
        return images
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(images.shape[0], generator=g)[:n].sort().values
    return images[idx]


def evaluate(source: str | Path | None, opts: EvalOptions, *, on_event: Event | None = None) -> dict:
    """Evaluate a run dir (or model folder): returns the record appended to ``eval.jsonl``.

    Order: check FID prerequisites first (extra, weights) so nothing slow runs before a
    predictable failure; then bits/dim, then samples -> features -> FID and KID.
    """
    from ddpmctl.devices import choose_precision, describe, resolve
    from ddpmctl.generate import generate, model_fn_for, run_defaults
    from ddpmctl.modelfolder import load_source
    from ddpmctl.sampler_registry import get_sampler

    emit = emitter(on_event)
    metrics = parse_metrics(opts.metrics)
    if opts.n is not None and opts.n < 1:
        raise UsageError(f"--n {opts.n}: must be at least 1")
    t0 = time.perf_counter()
    device = resolve(opts.device)
    precision = choose_precision(opts.precision, device)
    den = load_source(source, use_ema=opts.use_ema, device=device,
                      on_warning=lambda m: emit({"event": "warning", "message": m}))
    spec = den.spec
    data_source = opts.data or spec.data.source
    T = spec.diffusion.timesteps
    want_fid = [m for m in metrics if m in ("fid", "kid")]
    extractor = None
    if want_fid:
        extractor = load_inception(opts.inception_weights, device=device, allow_download=opts.allow_download,
                                   on_event=on_event)
    emit({"event": "start", "source": den.source, "checkpoint": den.checkpoint, "weights": den.weights,
          "device": describe(device), "metrics": metrics, "data": data_source})

    from ddpmctl.data import load_images

    def images_of(split: str):
        return load_images(data_source, image_size=spec.model.image_size, channels=spec.model.channels,
                           split=split, root=opts.data_root, allow_download=opts.allow_download, on_event=on_event)

    results: dict[str, dict] = {}
    record: dict = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "source": den.source, "checkpoint": den.checkpoint, "step": _step_of(den.checkpoint),
                    "weights": den.weights, "data": data_source}

    # ---- bits/dim on held-out images (fp32: the likelihood is sensitive to rounding)
    if "bpd" in metrics:
        split = opts.split or DEFAULT_SPLIT["bpd"]
        available = images_of(split).images
        held_out = _subset(available, opts.n, opts.seed)
        if opts.n is not None and opts.n > held_out.shape[0]:
            emit({"event": "warning", "message": f"--n {opts.n:,}: the {split} split holds {held_out.shape[0]:,} "
                                                 f"images, so bits/dim uses all {held_out.shape[0]:,}"})
        schedule = Schedule.create(spec.diffusion.schedule, T, spec.diffusion.beta_range)
        res = bits_per_dim(model_fn_for(den.model, None, device), schedule, held_out, prediction=spec.diffusion.prediction, device=device, stride=opts.stride,
                           batch_size=opts.batch_size, seed=opts.seed, on_event=on_event)
        results["bpd"] = {**res.to_dict(), "split": split}

    # ---- FID / KID: generated samples vs the reference split
    if want_fid:
        assert extractor is not None
        split = opts.split or DEFAULT_SPLIT["fid"]
        data = images_of(split)
        ref = reference_stats(data.images, extractor, cache_dir=reference_cache_dir(data, opts.data_root),
                              label=f"{_label(data_source)}-{split}-{spec.model.image_size}px",
                              batch_size=max(opts.batch_size, 50), on_event=on_event)
        n = opts.n or FID_UNBIASED_N
        sampler, run_steps, run_eta = run_defaults(spec, opts.sampler)
        how = get_sampler(sampler)
        steps = how.lenient_steps(T, opts.steps or run_steps,
                                  lambda message: emit({"event": "warning", "message": message}))
        eta = run_eta if opts.eta is None else opts.eta
        seeds = list(range(opts.seed, opts.seed + n))
        nfe = 0
        # a conditional model: image i of class i mod K (the classes equally often), guided
        k = spec.model.num_classes
        labels = [i % k for i in range(n)] if k else None
        guidance = (spec.sample.guidance if opts.guidance is None else opts.guidance) if k else None

        def sample_batches() -> Iterator[Tensor]:
            nonlocal nfe
            for _, imgs, nfe in generate(den, seeds, sampler=sampler, steps=steps, eta=eta,
                                         batch_size=opts.batch_size, device=device, precision=precision,
                                         variance=opts.variance, labels=labels, guidance=guidance or 0.0):
                yield imgs

        feats = extract_features(extractor, sample_batches(), n, stage="samples", on_event=on_event)
        ref_info = {"split": split, "n": ref.n, "cache": str(ref.path) if ref.path else None, "cached": ref.cached}
        record.update({"sampler": sampler, "steps": steps, "network_evaluations": nfe,
                       "eta": how.eta_or_none(eta),
                       "variance": how.variance_or_none(opts.variance), "n_samples": n, "seed": opts.seed,
                       "precision": precision.name, "inception_weights": extractor.weights_id[:16]})
        if k:
            record["guidance"] = guidance
        if "fid" in metrics:
            fid = frechet_distance_from_features(feats, ref.mu, ref.sigma)
            if not math.isfinite(fid):
                raise NonFiniteError("FID is not finite (degenerate feature statistics)")
            results["fid"] = {"value": fid, "n": n, "reference": ref_info, "biased_upward": n < FID_UNBIASED_N,
                              "note": (f"fewer than {FID_UNBIASED_N:,} samples: biased upward" if n < FID_UNBIASED_N
                                       else f"{n:,} samples, as in the papers")}
        if "kid" in metrics:
            kid = kernel_inception_distance(feats, ref.features, subsets=opts.kid_subsets,
                                            subset_size=opts.kid_subset_size, seed=opts.seed, device=device)
            results["kid"] = {**kid, "n": n, "reference": ref_info}
        if k:
            per_class = _per_class(feats, np.array(labels), ref.features, data.labels, data.classes,
                                   spec.model.classes, metrics, opts, device)
            for m, values in per_class.items():
                results[m]["per_class"] = values
            if data.labels is None:
                emit({"event": "warning", "message": f"{data_source} has no class labels: FID/KID overall only"})

    record.update({"metrics": results, "device": str(device), "ddpmctl": __version__,
                   "seconds": round(time.perf_counter() - t0, 3)})
    if opts.log:
        where = Path(den.source)
        if where.is_dir():  # a run dir or a local model folder; never a Hub download's cache
            try:
                record["log"] = str(append_eval_log(where, record))
            except WriteError as exc:  # the result is still reported (stdout): only its record is lost
                emit({"event": "warning", "message": str(exc)})
            except OSError as exc:
                emit({"event": "warning", "message": f"could not append to {where / EVAL_LOG}: {exc}"})
        else:
            emit({"event": "message", "message": f"{den.source} is not a local directory: nothing appended to "
                                                 f"{EVAL_LOG} (use --json to keep the result)"})
    return record


def _per_class(feats: np.ndarray, labels: np.ndarray, ref_feats: np.ndarray, ref_labels: Tensor | None,
               ref_classes: Sequence[str] | None, classes: Sequence[str], metrics: list[str], opts: EvalOptions,
               device) -> dict[str, dict]:
    """{metric: {class name: value}}: each class's samples against the reference images of the class of that
    name (classes with fewer than two images on either side are left out); {} without reference labels."""
    if ref_labels is None or not ref_classes:
        return {}
    ref_labels = ref_labels.numpy()
    out: dict[str, dict] = {m: {} for m in metrics if m in ("fid", "kid")}
    for c, name in enumerate(classes):
        if name not in ref_classes:
            continue
        mine, theirs = feats[labels == c], ref_feats[ref_labels == list(ref_classes).index(name)]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        if "fid" in out:
            mu, sigma = feature_stats(theirs)
            out["fid"][name] = frechet_distance_from_features(mine, mu, sigma)
        if "kid" in out:
            out["kid"][name] = kernel_inception_distance(mine, theirs, subsets=opts.kid_subsets,
                                                         subset_size=opts.kid_subset_size, seed=opts.seed,
                                                         device=device)["value"]
    return out


def _step_of(checkpoint: str | None) -> int | None:
    m = re.search(r"(\d+)$", checkpoint or "")
    return int(m.group(1)) if m else None


def _label(source: str) -> str:
    return Path(str(source).rstrip("/")).name.split("@")[0] or "data"


__all__ = [
    "METRICS", "FID_UNBIASED_N", "EXTRA_INSTALL", "BpdResult", "bits_per_dim", "feature_stats",
    "frechet_distance", "frechet_distance_from_features", "trace_sqrt_product", "polynomial_kernel",
    "mmd2_unbiased", "kernel_inception_distance", "InceptionFeatures", "load_inception", "read_weights",
    "weights_digest", "fetch_default_weights", "extract_features", "ReferenceStats", "reference_stats",
    "reference_cache_dir", "parse_metrics", "EvalOptions", "evaluate",
]
