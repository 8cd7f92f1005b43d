"""The files of a run directory: their names, and the one reader and writer of each.

    RUN_DIR/
      spec.json             the resolved RunSpec        spec_path, load_spec, save_spec (format: ddpmctl.spec)
      metrics.jsonl         one JSON object per logged  append_metrics (whole or rolled back),
                            step                        truncate_metrics (cut back to a checkpoint on resume)
      samples/epoch_NNNN.png the fixed-seed grid of an  written by ddpmctl.train._sample_grid (ddpmctl.images)
                            epoch
      samples/index.json    the grids saved so far      read_sample_index, add_sample_grid (a damaged index
                                                        is moved aside, never costs a training step)
      eval.jsonl            one record per `ddpmctl     append_eval_log, read_eval_log (also a model
                            eval`                       folder's)
      .lock                 the process training it     ddpmctl.lock.RunLock
      checkpoints/          step_*/, epoch_*/, NEWEST   ddpmctl.checkpoint

Every write goes through ddpmctl.safefile / ddpmctl.writes: files written whole are replaced
atomically, the two logs are appended in place, whole or rolled back, never through a symlink.
ddpmctl.checkpoint does not import this module (the dependency is one way); the name spec.json
is ``ddpmctl.outdir.RUN_MARKER``, which checkpoint and outdir use too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from ddpmctl import checkpoint as ck
from ddpmctl import spec as specmod
from ddpmctl.errors import DdpmctlError, RunDirError
from ddpmctl.outdir import RUN_MARKER
from ddpmctl.safefile import atomic_write_text, open_update, refuse_symlink
from ddpmctl.smallfiles import read_jsonl, read_object
from ddpmctl.spec import RunSpec
from ddpmctl.writes import append_bytes

METRICS_LOG = "metrics.jsonl"
SAMPLES_DIR = "samples"
SAMPLE_INDEX = Path(SAMPLES_DIR) / "index.json"
EVAL_LOG = "eval.jsonl"


# ---------------------------------------------------------------------------------------------
# spec.json
# ---------------------------------------------------------------------------------------------


def spec_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / RUN_MARKER


def load_spec(run_dir: Path | str) -> RunSpec:
    """RUN_DIR/spec.json -> RunSpec (any problem is a UsageError naming the file)."""
    return specmod.load(spec_path(run_dir))


def save_spec(spec: RunSpec, run_dir: Path | str) -> None:
    specmod.save(spec, spec_path(run_dir))


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------


def metrics_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / METRICS_LOG


def append_metrics(run_dir: Path | str, rec: dict) -> int:
    """Append one record; return the file's length (saved in checkpoints to truncate on resume)."""
    path = metrics_path(run_dir)
    try:
        return append_bytes(path, (json.dumps(rec) + "\n").encode("utf-8"), kept=lambda: (
            f"{path.name} keeps its earlier records; {ck.still_newest(path.parent / ck.CKPT_DIR)}"))
    except OSError as exc:
        raise DdpmctlError(f"cannot write {path}: {exc.strerror or exc}") from None


def truncate_metrics(run_dir: Path | str, state: dict) -> int:
    """Drop what was logged after the checkpoint we resume from (it will be logged again, identically
    in deterministic mode); return the new length. The file is cut to the length the checkpoint
    recorded, and then to its last complete line: a line torn by a crash (even one the checkpoint
    counted, when the file lost its unsynced tail) never has the next record glued onto it."""
    path = metrics_path(run_dir)
    refuse_symlink(path)  # before anything is read or trained: the log is appended to in place
    if not path.exists():
        return 0
    keep_bytes = state.get("metrics_bytes")
    if keep_bytes is not None:
        size = path.stat().st_size
        keep = _complete_lines_length(path, min(size, keep_bytes))
        if size > keep:
            with open_update(path) as f:  # never through a symlink (ddpmctl.safefile)
                f.truncate(keep)
        return path.stat().st_size
    keep = []  # checkpoints of older versions: truncate by step
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), (int, float)) and rec.get("step", 0) <= state["step"]:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))
    return path.stat().st_size


def _complete_lines_length(path: Path, limit: int) -> int:
    """The length of the longest prefix of ``path``, at most ``limit`` bytes, that ends with a newline."""
    with open(path, "rb") as f:
        end = limit
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            i = f.read(end - start).rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0


# ---------------------------------------------------------------------------------------------
# samples/index.json
# ---------------------------------------------------------------------------------------------

_GRID_FIELDS = {"epoch": int, "file": str, "n": int, "nrow": int, "padding": int}


def read_sample_index(run_dir: Path | str) -> list[dict]:
    """The grids listed in RUN_DIR/samples/index.json ([] when there is none yet), each checked to have
    epoch, file (a name inside samples/), n, nrow and padding. A damaged file is a RunDirError naming it."""
    path = Path(run_dir) / SAMPLE_INDEX
    if not path.exists():
        return []
    expect = 'the sample-grid index {"grids": [{"epoch", "file", "n", "nrow", "padding", ...}]}'
    grids = read_object(path, expect=expect, error=RunDirError).get("grids")
    if not isinstance(grids, list):
        raise RunDirError(f"{path}: \"grids\" is {type(grids).__name__}, expected a list; expected {expect}")
    for i, g in enumerate(grids):
        bad = (not isinstance(g, dict)) or next(
            (k for k, t in _GRID_FIELDS.items() if not isinstance(g.get(k), t) or isinstance(g.get(k), bool)), None)
        if bad is None and (Path(g["file"]).name != g["file"] or g["n"] < 1 or g["nrow"] < 1 or g["padding"] < 0):
            bad = "file" if Path(g["file"]).name != g["file"] else "n/nrow/padding"
        if bad:
            what = f"field {bad!r} of" if isinstance(g, dict) else ""
            raise RunDirError(f"{path}: {what} grid {i} is malformed; expected {expect}")
    return grids


def add_sample_grid(run_dir: Path | str, grid: dict, on_warning: Callable[[str], None]) -> None:
    """List ``grid`` ({"epoch", "file", "n", "nrow", "padding", ...}) in samples/index.json, replacing
    the entry of the same epoch. An index that cannot be read never costs the training step: it is
    moved aside (samples/index.json.unreadable-DATE-TIME, ``on_warning`` says where) and a new one begun."""
    index_path = Path(run_dir) / SAMPLE_INDEX
    try:
        grids = read_sample_index(run_dir)
    except RunDirError as exc:
        aside = index_path.with_name(f"index.json.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(index_path, aside)
        on_warning(f"{exc}; moved it to {aside} and started a new index (the grid images are kept)")
        grids = []
    index = {"grids": [g for g in grids if g["epoch"] != grid["epoch"]] + [grid]}
    atomic_write_text(index_path, json.dumps(index, indent=1))


# ---------------------------------------------------------------------------------------------
# eval.jsonl (a run directory's or a model folder's)
# ---------------------------------------------------------------------------------------------


def append_eval_log(directory: Path | str, record: dict) -> Path:
    """Append one JSON line to ``DIRECTORY/eval.jsonl`` (flushed and fsynced)."""
    path = Path(directory) / EVAL_LOG
    line = json.dumps(record, default=str, allow_nan=False) + "\n"
    append_bytes(path, line.encode("utf-8"), fsync=True,
                 kept=f"{path.name} keeps its earlier records; this result is printed but not recorded")
    return path


def read_eval_log(directory: Path | str) -> list[dict]:
    """The records of ``DIRECTORY/eval.jsonl`` ([] when there is none); a torn or damaged line is skipped."""
    path = Path(directory) / EVAL_LOG
    if not path.is_file():
        return []
    return read_jsonl(path)
