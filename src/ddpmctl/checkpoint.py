"""Run-dir layout, atomic file writes and checkpoints.

    RUN_DIR/
      spec.json             the resolved RunSpec
      metrics.jsonl         one JSON object per logged step
      samples/epoch_0005.png, samples/index.json
      checkpoints/
        step_00001000/      model.safetensors ema.safetensors optim.safetensors rng.safetensors
                            state.json manifest.json (SHA-256 of every other file)
        NEWEST              name of the newest complete checkpoint, written last

A checkpoint is written into a temporary directory, every file fsynced, the directory renamed
into place, and only then is NEWEST replaced (atomically). A crash at any moment leaves either the
old or the new checkpoint as the newest, never a half-written one. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ddpmctl import __version__
from ddpmctl.errors import CheckpointError, RunDirError

CKPT_DIR = "checkpoints"
NEWEST = "NEWEST"
TENSOR_FILES = ("model", "ema", "optim", "rng")


# ---------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------- optimizer <-> tensors
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors (safetensors) and JSON-able groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    path: Path
    state: dict  # state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        f = self.path / f"{name}.safetensors"
        if not f.exists():
            raise CheckpointError(f"checkpoint {self.path} has no {f.name}")
        return load_file(str(f), device=str(device))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep_last: int = 3,
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoints/step_N atomically, then point NEWEST at it, then prune old ones."""
    ckdir = Path(run_dir) / CKPT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = ckdir / name
    tmp = ckdir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        meta = {"ddpmctl": __version__, "step": str(step)}
        for kind, tdict in tensors.items():
            p = tmp / f"{kind}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, str(p), metadata=meta)
            _fsync_file(p)
            files[p.name] = sha256_file(p)
        st = dict(state, step=step, ddpmctl=__version__)
        (tmp / "state.json").write_text(json.dumps(st, indent=1))
        _fsync_file(tmp / "state.json")
        files["state.json"] = sha256_file(tmp / "state.json")
        (tmp / "manifest.json").write_text(json.dumps({"files": files, "step": step}, indent=1))
        _fsync_file(tmp / "manifest.json")
        _fsync_dir(tmp)
        if before_publish is not None:  # fault-injection hook for tests of crash safety
            before_publish(tmp)
        if final.exists():  # same step saved twice (e.g. epoch end == step checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ckdir / NEWEST, name + "\n")
    _prune(ckdir, keep_last, protect=name)
    return final


def _step_dirs(ckdir: Path) -> list[Path]:
    return sorted((p for p in ckdir.glob("step_*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def _prune(ckdir: Path, keep_last: int, protect: str) -> None:
    for p in _step_dirs(ckdir)[keep_last:]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckdir.glob(".tmp-*"):  # leftovers of a crashed writer
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> dict:
    """Check the manifest's SHA-256 of every file; return state.json. Raises CheckpointError."""
    man = path / "manifest.json"
    try:
        manifest = json.loads(man.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name}: manifest unreadable ({exc.__class__.__name__})") from None
    for fname, digest in manifest.get("files", {}).items():
        f = path / fname
        if not f.exists():
            raise CheckpointError(f"{path.name}: {fname} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path.name}: {fname} fails its SHA-256 check (truncated or corrupted)")
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name}: state.json unreadable ({exc})") from None


def find_newest(run_dir: Path, on_warning: Callable[[str], None] | None = None) -> Checkpoint:
    """The newest checkpoint that verifies; a broken newer one is reported and skipped."""
    ckdir = Path(run_dir) / CKPT_DIR
    candidates = _step_dirs(ckdir) if ckdir.is_dir() else []
    pointer = ckdir / NEWEST
    if pointer.exists():
        named = ckdir / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    problems = []
    for c in candidates:
        try:
            state = verify(c)
        except CheckpointError as exc:
            problems.append(str(exc))
            if on_warning:
                on_warning(f"skipping checkpoint {exc}; falling back to an older one")
            continue
        return Checkpoint(c, state)
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"no valid checkpoint in {ckdir}{detail}")


# ---------------------------------------------------------------- run dirs
def check_run_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory")
    if not (path / "spec.json").is_file():
        raise RunDirError(f"{path} is not a ddpmctl run directory (no spec.json)")
    return path


def newest_run(root: Path = Path("runs")) -> Path:
    """The most recently modified run directory under ./runs."""
    runs = [p for p in Path(root).glob("*") if (p / "spec.json").is_file()] if Path(root).is_dir() else []
    if not runs:
        raise RunDirError(f"no run directories under {root}/; train one first (`ddpmctl train shapes`) or name one")
    return max(runs, key=lambda p: (p / "spec.json").stat().st_mtime if not (p / CKPT_DIR / NEWEST).exists()
               else (p / CKPT_DIR / NEWEST).stat().st_mtime)
