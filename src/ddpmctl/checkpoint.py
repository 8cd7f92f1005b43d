"""Checkpoints: RUN_DIR/checkpoints/ (the run directory's other files belong to ddpmctl.rundir,
which imports this module, never the other way round).

    RUN_DIR/
      checkpoints/
        step_00001000/      model.safetensors ema.safetensors optim.safetensors rng.safetensors
                            state.json manifest.json (SHA-256 of every other file)
        epoch_0010/         milestone at a sample epoch: ema.safetensors state.json manifest.json
        NEWEST              name of the newest complete checkpoint, written last

Every file is written with ddpmctl.safefile (never through a symlink). A checkpoint is written
into a temporary directory, every file fsynced, the directory renamed
into place, and only then is NEWEST replaced (atomically). A crash at any moment leaves either the
old or the new checkpoint as the newest, never a half-written one. Nothing here unpickles.

Test hook (documented in docs/reliability.md): ``DDPMCTL_FAULT=write:STEP`` SIGKILLs the process
after the first file of checkpoint STEP is written (unpublished temporary directory), and
``DDPMCTL_FAULT=publish:STEP`` after it is renamed into place but before NEWEST names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ddpmctl import __version__
from ddpmctl.errors import CheckpointError, DdpmctlError, RunDirError
from ddpmctl.outdir import RUN_MARKER
from ddpmctl.safefile import atomic_write_text, clear, fsync_dir
from ddpmctl.smallfiles import read_object, read_text_lenient, sha256_file
from ddpmctl.writes import WriteError, writing

CKPT_DIR = "checkpoints"
NEWEST = "NEWEST"
TENSOR_FILES = ("model", "ema", "optim", "rng")
STEP_RE = re.compile(r"^step_\d{8,}$")
MILESTONE_RE = re.compile(r"^epoch_\d{4,}$")


class CheckpointWriteError(WriteError, CheckpointError):
    """A checkpoint could not be written (full disk, size limit, ...); the newest one is intact."""



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
    """Load what optimizer_to_tensors wrote. Moments take their parameter's memory layout (e.g.
    channels_last): safetensors stores them contiguous, and fused AdamW needs matching layouts."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        p = params[int(idx)] if int(idx) < len(params) else None
        if p is not None and v.shape == p.shape and v.dim() > 1:
            v = torch.empty_like(p, dtype=v.dtype, device=v.device).copy_(v)
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
        try:
            return load_file(str(f), device=str(device))
        except Exception as exc:  # noqa: BLE001 - a malformed header that was hashed into the manifest
            raise CheckpointError(f"{f} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------- tensors checked before torch sees them
def tensor_specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of live (or meta) tensors: what a loaded file must match."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, tuple[torch.dtype | None, tuple[int, ...]]],
                  where: str, *, error: type[DdpmctlError] = CheckpointError, optional: frozenset[str] = frozenset(),
                  hint: str = "") -> None:
    """Every tensor in ``found`` has the name, dtype and shape ``expected`` says, before any of it is
    handed to torch (a moment of the wrong shape crashes fused AdamW; a wrong dtype is cast silently).

    An expected dtype of None accepts any floating-point dtype (exported weights in fp16/bf16/fp32).
    ``optional`` names may be absent. The message names ``where``, the tensor, expected and found."""
    def show(dtype, shape) -> str:
        return f"{'a floating-point dtype' if dtype is None else str(dtype).removeprefix('torch.')} {list(shape)}"

    problems = []
    for name, (dtype, shape) in expected.items():
        t = found.get(name)
        if t is None:
            if name not in optional:
                problems.append(f"tensor {name!r} is missing (expected {show(dtype, shape)})")
            continue
        ok_dtype = t.is_floating_point() if dtype is None else t.dtype == dtype
        if not ok_dtype or tuple(t.shape) != tuple(shape):
            problems.append(f"tensor {name!r} is {show(t.dtype, t.shape)}, expected {show(dtype, shape)}")
    problems += [f"unexpected tensor {name!r}" for name in found if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise error(f"{where}: {problems[0]}{more}{hint}")


def check_fits_spec(ckpt: "Checkpoint", name: str, found: dict[str, torch.Tensor],
                    expected: dict[str, tuple[torch.dtype | None, tuple[int, ...]]],
                    optional: frozenset[str] = frozenset()) -> None:
    """A checkpoint's ``name`` tensors fit the network (or optimizer) built from spec.json: the one check
    `resume` and `sample` make before loading (CheckpointError naming the file and the tensor)."""
    check_tensors(found, expected, f"{ckpt.path / (name + '.safetensors')}", optional=optional,
                  hint="; the checkpoint does not fit spec.json: was spec.json edited?")


def optimizer_tensor_specs(opt: torch.optim.Optimizer) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What optimizer_to_tensors writes (after the first step), per parameter index: for AdamW
    ``step`` (float32 scalar) and the two moments, for SGD with momentum (the warm start) the momentum
    buffer, in the parameter's dtype and shape."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    params = [q for g in opt.param_groups for q in g["params"]]
    if isinstance(opt, torch.optim.SGD):
        if any(g.get("momentum", 0) for g in opt.param_groups):
            out.update({f"{i}.momentum_buffer": (p.dtype, tuple(p.shape)) for i, p in enumerate(params)})
        return out
    for i, p in enumerate(params):
        out[f"{i}.step"] = (torch.float32, ())
        out[f"{i}.exp_avg"] = (p.dtype, tuple(p.shape))
        out[f"{i}.exp_avg_sq"] = (p.dtype, tuple(p.shape))
    return out


def check_json_like(found, expected, where: str, *, error: type[DdpmctlError] = CheckpointError,
                    at: str = "") -> None:
    """``found`` (read from JSON) has the structure of ``expected`` (what the live object would write,
    e.g. an optimizer's param_groups): the same list lengths, and for keys present in both, values of
    the same JSON type (numbers interchangeable, booleans not; None in ``expected`` accepts anything)."""
    def kind(v):
        return "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else \
            "list" if isinstance(v, (list, tuple)) else "object" if isinstance(v, dict) else \
            "string" if isinstance(v, str) else "null" if v is None else type(v).__name__
    if expected is None:
        return
    if kind(found) != kind(expected):
        raise error(f"{where}: {at or 'value'} is {kind(found)} {str(found)[:40]!r}, expected {kind(expected)}")
    if isinstance(expected, dict):
        for k, v in expected.items():
            if k in found:
                check_json_like(found[k], v, where, error=error, at=f"{at}.{k}" if at else str(k))
    elif isinstance(expected, (list, tuple)):
        if len(found) != len(expected):
            raise error(f"{where}: {at or 'value'} has {len(found)} entries, expected {len(expected)}")
        for i, (a, b) in enumerate(zip(found, expected)):
            check_json_like(a, b, where, error=error, at=f"{at}[{i}]")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def milestone_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def _fault(phase: str, step: int) -> None:
    """Test hook: DDPMCTL_FAULT=PHASE:STEP SIGKILLs this process at PHASE of writing checkpoint STEP."""
    if os.environ.get("DDPMCTL_FAULT") == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_dir(ckdir: Path, name: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
               before_publish: Callable[[Path], None] | None = None, fault: bool = False) -> Path:
    """Write ckdir/name atomically: temporary directory, fsync every file, manifest last, rename."""
    final = ckdir / name
    tmp = ckdir / f".tmp-{name}-{os.getpid()}"
    old = ckdir / f".tmp-old-{name}-{os.getpid()}"
    clear(tmp)  # a leftover of this PID (a link planted there goes, not its target)
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        meta = {"ddpmctl": __version__, "step": str(step)}
        for kind, tdict in tensors.items():
            p = tmp / f"{kind}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in tdict.items()}, str(p), metadata=meta)
            _fsync_file(p)
            files[p.name] = sha256_file(p)
            if fault:
                _fault("write", step)
        st = dict(state, step=step, ddpmctl=__version__)
        (tmp / "state.json").write_text(json.dumps(st, indent=1))
        _fsync_file(tmp / "state.json")
        files["state.json"] = sha256_file(tmp / "state.json")
        (tmp / "manifest.json").write_text(json.dumps({"files": files, "step": step}, indent=1))
        _fsync_file(tmp / "manifest.json")
        fsync_dir(tmp)
        if before_publish is not None:  # fault-injection hook for tests of crash safety
            before_publish(tmp)
        if final.exists():  # the same step written again (a replay after a crash or a rollback)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(ckdir)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def save_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep_last: int = 3,
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoints/step_N atomically, then point NEWEST at it, then prune old ones.

    A failure to write (a full disk, a vanished directory) is a CheckpointError naming the newest
    checkpoint that is still intact.
    """
    ckdir = Path(run_dir) / CKPT_DIR
    name = checkpoint_name(step)
    try:
        with writing(f"checkpoint {name} in {ckdir}", kept=lambda: still_newest(ckdir),
                     error=CheckpointWriteError):
            ckdir.mkdir(parents=True, exist_ok=True)
            final = _write_dir(ckdir, name, step, tensors, state, before_publish, fault=True)
            _fault("publish", step)
            atomic_write_text(ckdir / NEWEST, name + "\n")
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {name} in {ckdir}: {exc.strerror or exc}; "
                              f"{still_newest(ckdir)}") from None
    _prune(ckdir, keep_last, protect=name)
    return final


def still_newest(ckdir: Path) -> str:
    """What a failed checkpoint write kept: the newest complete checkpoint, by name."""
    intact = _read_newest(ckdir)
    if not intact or "\ufffd" in intact:  # none, or damaged bytes that name no checkpoint
        return "there is no complete checkpoint yet"
    return f"the newest complete checkpoint is still {intact} (intact; `ddpmctl resume` continues from it)"


def save_milestone(run_dir: Path, epoch: int, step: int, ema: dict[str, torch.Tensor], state: dict) -> Path:
    """The EMA weights at a sample epoch, kept for good: checkpoints/epoch_NNNN (never pruned)."""
    ckdir = Path(run_dir) / CKPT_DIR
    try:
        with writing(f"milestone {milestone_name(epoch)} in {ckdir}", kept=lambda: still_newest(ckdir),
                     error=CheckpointWriteError):
            ckdir.mkdir(parents=True, exist_ok=True)
            return _write_dir(ckdir, milestone_name(epoch), step, {"ema": ema}, dict(state, epoch=epoch))
    except OSError as exc:
        raise CheckpointError(f"could not write milestone {milestone_name(epoch)} in {ckdir}: "
                              f"{exc.strerror or exc}") from None


def milestones(run_dir: Path) -> list[Path]:
    """Milestone directories (EMA weights at sample epochs), oldest first."""
    ckdir = Path(run_dir) / CKPT_DIR
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if p.is_dir() and MILESTONE_RE.match(p.name))


def has_checkpoints(run_dir: Path) -> bool:
    """Whether any step checkpoint was ever published here (valid or not)."""
    ckdir = Path(run_dir) / CKPT_DIR
    return ckdir.is_dir() and bool(_step_dirs(ckdir))


def discard_after(run_dir: Path, ckpt: "Checkpoint") -> list[str]:
    """Make `ckpt` the newest: point NEWEST at it, then delete every later step checkpoint and
    milestone (a diverged trajectory after a rollback, broken or orphaned ones after a crash).
    Returns the names removed."""
    ckdir = Path(run_dir) / CKPT_DIR
    pointer = ckdir / NEWEST
    if _read_newest(ckdir) != ckpt.path.name:
        atomic_write_text(pointer, ckpt.path.name + "\n")
    removed = []
    for p in _step_dirs(ckdir) + milestones(run_dir):
        if p.name == ckpt.path.name:
            continue
        step = _step_of(p)
        if step is None or step > ckpt.step:
            trash = ckdir / f".tmp-discard-{p.name}-{os.getpid()}"
            os.replace(p, trash)  # atomic: a half-deleted directory never looks like a checkpoint
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(p.name)
    if removed:
        fsync_dir(ckdir)
    return removed


def _read_newest(ckdir: Path) -> str | None:
    """The name in checkpoints/NEWEST (damaged bytes read as U+FFFD and match no checkpoint), or None."""
    try:
        return read_text_lenient(ckdir / NEWEST)
    except OSError:
        return None


def _step_of(path: Path) -> int | None:
    if STEP_RE.match(path.name):
        return int(path.name.split("_")[1])
    try:
        return int(read_object(path / "state.json", expect="a checkpoint state")["step"])
    except (DdpmctlError, ValueError, KeyError, TypeError):
        return None


def _step_dirs(ckdir: Path) -> list[Path]:
    return sorted((p for p in ckdir.glob("step_*") if p.is_dir() and STEP_RE.match(p.name)),
                  key=lambda p: int(p.name.split("_")[1]), reverse=True)


def _prune(ckdir: Path, keep_last: int, protect: str) -> None:
    """Keep the newest `keep_last` step checkpoints (milestones are never pruned)."""
    for p in _step_dirs(ckdir)[keep_last:]:
        if p.name != protect:
            trash = ckdir / f".tmp-prune-{p.name}-{os.getpid()}"
            try:
                os.replace(p, trash)  # atomic, so a crash mid-delete leaves no half checkpoint
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    for p in ckdir.glob(".tmp-*"):  # leftovers of a crashed writer
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path, required: tuple[str, ...] = ()) -> dict:
    """Check the manifest's SHA-256 of every file; return state.json. Raises CheckpointError.

    `required` names tensor files (e.g. "model") that the manifest must list."""
    man = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path.name}: missing")
    try:
        manifest = read_object(man, expect="a checkpoint manifest", error=CheckpointError)
        listed = dict(manifest["files"])
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
            raise TypeError
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: manifest unreadable ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: manifest unreadable ({exc.__class__.__name__})") from None
    for fname in ("state.json", *(f"{r}.safetensors" for r in required)):
        if fname not in listed:
            raise CheckpointError(f"{path.name}: manifest does not list {fname}")
    for fname, digest in listed.items():
        f = path / fname
        if not f.exists():
            raise CheckpointError(f"{path.name}: {fname} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{path.name}: {fname} fails its SHA-256 check (truncated or corrupted)")
    state = read_object(path / "state.json", expect="a checkpoint state", error=CheckpointError)
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise CheckpointError(f"{path / 'state.json'}: \"step\" is {state.get('step')!r}, expected a whole number >= 0")
    return state


def find_newest(run_dir: Path, on_warning: Callable[[str], None] | None = None,
                before_step: int | None = None) -> Checkpoint:
    """The newest checkpoint that verifies; a broken newer one is reported and skipped.

    NEWEST is tried first (a checkpoint renamed into place whose NEWEST update never happened is
    newer than NEWEST but was never published). `before_step`: only checkpoints with a smaller step.
    """
    ckdir = Path(run_dir) / CKPT_DIR
    candidates = _step_dirs(ckdir) if ckdir.is_dir() else []
    name = _read_newest(ckdir)
    if name is not None and STEP_RE.match(name):
        named = ckdir / name
        candidates = [named] + [c for c in candidates if c != named]
    elif name is not None and on_warning:
        on_warning(f"{ckdir / NEWEST} does not name a checkpoint (expected a name such as step_00001000); "
                   "using the newest one that verifies")
    if before_step is not None:
        candidates = [c for c in candidates if int(c.name.split("_")[1]) < before_step]
    problems = []
    for c in candidates:
        try:
            state = verify(c, required=TENSOR_FILES)
        except CheckpointError as exc:
            problems.append(str(exc))
            if on_warning:
                on_warning(f"skipping checkpoint {exc}; falling back to an older one")
            continue
        return Checkpoint(c, state)
    detail = f" ({'; '.join(problems)})" if problems else ""
    where = f" before step {before_step}" if before_step is not None else ""
    raise CheckpointError(f"no valid checkpoint{where} in {ckdir}{detail}")


# ---------------------------------------------------------------- run dirs
def check_run_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory")
    if not (path / RUN_MARKER).is_file():
        raise RunDirError(f"{path} is not a ddpmctl run directory (no spec.json)")
    return path


def newest_run(root: Path = Path("runs")) -> Path:
    """The most recently modified run directory under ./runs."""
    runs = [p for p in Path(root).glob("*") if (p / RUN_MARKER).is_file()] if Path(root).is_dir() else []
    if not runs:
        raise RunDirError(f"no run directories under {root}/; train one first (`ddpmctl train shapes`) or name one")
    return max(runs, key=lambda p: (p / RUN_MARKER).stat().st_mtime if not (p / CKPT_DIR / NEWEST).exists()
               else (p / CKPT_DIR / NEWEST).stat().st_mtime)
