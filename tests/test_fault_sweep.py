"""The fault-sweep cases of issue 17, kept as regression tests (docs/reliability.md).

Sections 1 and 2: files outside the run directory are never written through symlinks
(ddpmctl.safefile), and no output is lost to a second writer or to --overwrite (ddpmctl.outdir).
Every symlink points at a decoy file under tmp_path, never at a real system file; each test checks
that the decoy is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_run, run_main

from ddpmctl import checkpoint as ck
from ddpmctl.errors import CheckpointError, SymlinkError, UsageError
from ddpmctl.images import save_png

DECOY = "precious notes: ddpmctl must never write here\n" * 20


def _decoy(tmp_path: Path) -> Path:
    path = tmp_path / "decoy.txt"
    path.write_text(DECOY)
    return path


# ================================================================ 1. no writes through symlinks
def test_a_symlinked_run_lock_is_refused_and_its_target_untouched(trained_run, tmp_path, monkeypatch, capsys):
    """Issue 17: `ln -s FILE RUN/.lock; ddpmctl resume RUN` overwrote FILE with "pid=... host=..."."""
    run = copy_run(trained_run, tmp_path / "run")
    decoy = _decoy(tmp_path)
    (run / ".lock").symlink_to(decoy)
    code, _, err = run_main(monkeypatch, capsys, "resume", str(run))
    assert code == 2, err
    assert str(run / ".lock") in err and "symbolic link" in err and "taking over" not in err
    assert decoy.read_text() == DECOY
    assert (run / ".lock").is_symlink()  # refused, not removed either


def test_the_lock_takes_over_a_stale_regular_lock_file(tmp_path):
    """The O_NOFOLLOW open still takes over a real stale lock (the holder died without removing it)."""
    from ddpmctl.lock import RunLock

    (tmp_path / ".lock").write_text("pid=999999 host=gone\n")
    warnings: list[str] = []
    with RunLock(tmp_path, on_warning=warnings.append):
        assert (tmp_path / ".lock").read_text().startswith(f"pid={os.getpid()} ")
    assert warnings and "pid=999999" in warnings[0]
    assert not (tmp_path / ".lock").exists()


def test_a_symlinked_metrics_log_is_refused_on_resume(trained_run, tmp_path, monkeypatch, capsys):
    """Issue 17: `ln -s ~/notes RUN/metrics.jsonl; ddpmctl resume RUN` truncated the notes and appended."""
    run = copy_run(trained_run, tmp_path / "run")
    decoy = _decoy(tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(decoy)
    code, _, err = run_main(monkeypatch, capsys, "resume", str(run), "--max-steps", "6")
    assert code == 2, err
    assert str(run / "metrics.jsonl") in err and "symbolic link" in err and "step 5" not in err
    assert decoy.read_text() == DECOY
    assert ck.find_newest(run).step == 4  # nothing trained, nothing written


def test_appends_to_ddpmctl_logs_never_follow_a_symlink(tmp_path):
    """eval.jsonl (and metrics.jsonl, through the same safefile.open_append) refuse a link, even a dangling one."""
    from ddpmctl.rundir import EVAL_LOG, append_eval_log

    decoy = _decoy(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / EVAL_LOG).symlink_to(decoy)
    with pytest.raises(SymlinkError, match="eval.jsonl is a symbolic link"):
        append_eval_log(run, {"fid": 1.0})
    assert decoy.read_text() == DECOY
    (run / EVAL_LOG).unlink()
    (run / EVAL_LOG).symlink_to(tmp_path / "would-be-created")
    with pytest.raises(SymlinkError):
        append_eval_log(run, {"fid": 1.0})
    assert not (tmp_path / "would-be-created").exists()


def test_whole_file_writes_replace_a_link_and_refuse_a_planted_temporary(tmp_path):
    """spec.json, NEWEST, samples/index.json, PNGs: written new and renamed over the name, so a link
    there is replaced, not written through; a link planted at the temporary name is not followed."""
    from ddpmctl.safefile import atomic_write_text

    decoy = _decoy(tmp_path)
    target = tmp_path / "run" / "spec.json"
    target.parent.mkdir()
    target.symlink_to(decoy)
    atomic_write_text(target, "{}\n")
    assert not target.is_symlink() and target.read_text() == "{}\n"
    assert decoy.read_text() == DECOY

    planted = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    planted.symlink_to(decoy)
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n' and decoy.read_text() == DECOY
    assert not planted.exists() and not planted.is_symlink()


def test_a_checkpoint_never_writes_through_a_symlinked_newest_or_temporary_dir(tmp_path):
    """NEWEST is replaced, not written through; a link planted at the checkpoint's temporary
    directory name is removed, and the folder it points to keeps its files."""
    decoy = _decoy(tmp_path)
    decoy_dir = tmp_path / "decoy-dir"
    decoy_dir.mkdir()
    (decoy_dir / "keep.txt").write_text(DECOY)
    ckdir = tmp_path / "run" / ck.CKPT_DIR
    ckdir.mkdir(parents=True)
    (ckdir / ck.NEWEST).symlink_to(decoy)
    (ckdir / f".tmp-step_00000001-{os.getpid()}").symlink_to(decoy_dir, target_is_directory=True)
    tensors = {k: {"w": torch.zeros(2)} for k in ck.TENSOR_FILES}
    ck.save_checkpoint(tmp_path / "run", 1, tensors, {"step": 1})
    assert decoy.read_text() == DECOY
    assert [p.name for p in decoy_dir.iterdir()] == ["keep.txt"] and (decoy_dir / "keep.txt").read_text() == DECOY
    assert (ckdir / ck.NEWEST).read_text().strip() == "step_00000001"
    assert ck.find_newest(tmp_path / "run").step == 1


def test_a_download_never_writes_through_a_planted_part_file(tmp_path):
    from ddpmctl.data.fetch import download_file

    served = tmp_path / "served.bin"
    served.write_bytes(b"payload" * 100)
    import hashlib

    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    decoy = _decoy(tmp_path)
    dest = tmp_path / "root" / "file.bin"
    dest.parent.mkdir()
    dest.with_name(f"{dest.name}.part-{os.getpid()}").symlink_to(decoy)
    download_file(served.as_uri(), dest, sha256=sha)
    assert dest.read_bytes() == served.read_bytes() and not dest.is_symlink()
    assert decoy.read_text() == DECOY


def test_a_folder_skips_and_counts_symlinks_pointing_outside_it(tmp_path):
    """Issue 17: a link in an image folder to a file outside it was silently prepared. Now it is
    skipped and counted (named in the skip report); links that stay inside are read."""
    from ddpmctl.data.folder import OUTSIDE_LINK, scan_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    save_png(outside / "secret.png", img)
    save_png(outside / "more.png", img)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    save_png(folder / "a.png", img)
    (folder / "b.png").symlink_to(folder / "a.png")  # inside: kept
    (folder / "sub" / "leak.png").symlink_to(outside / "secret.png")
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    local = scan_folder(folder)
    names = [name for name, _ in local.items()]
    assert names == ["a.png", "b.png"]
    assert local.skipped.counts == {OUTSIDE_LINK: 2}
    assert set(local.skipped.examples[OUTSIDE_LINK]) == {"sub/leak.png", "linked"}


# ================================================================ 2. no output lost
def test_a_second_sampler_of_the_same_out_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    """Issue 17: two `sample --out same/` at once both said "wrote"; only one's images remained."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ddpmctl.lock import out_lock\n"
                               "out_lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "same")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_main(monkeypatch, capsys, "sample", str(trained_run), "--n", "1", "--steps", "1",
                                "--out", str(tmp_path / "same"))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, err
    assert "in use by another ddpmctl process (pid=" in err and f"pid={holder.pid} " in err
    assert not (tmp_path / "same").exists()
    assert not list(tmp_path.glob(".same.partial-*"))


@pytest.mark.parametrize("case", ["run", "parent-of-run", "source-folder", "cwd", "parent-of-cwd", "run-samples"])
def test_overwrite_never_replaces_a_run_a_source_or_the_cwd(case, trained_run, tmp_path, monkeypatch, capsys):
    """Issue 17: `sample runs/victim --out runs/victim --overwrite` deleted the run; `--out .` was a
    ValueError traceback. Every such --out exits 2 naming why, and nothing is removed."""
    run = copy_run(trained_run, tmp_path / "runs" / "victim", with_export=True)
    (tmp_path / "work").mkdir()
    source, out = str(run), {"run": run, "parent-of-run": tmp_path / "runs", "cwd": Path("."),
                             "run-samples": run / "samples", "source-folder": run / "export",
                             "parent-of-cwd": Path("..")}.get(case)
    if case == "source-folder":
        source = str(run / "export")
    if case in ("cwd", "parent-of-cwd"):
        monkeypatch.chdir(tmp_path / "work")
        (tmp_path / "work" / "keep.txt").write_text("x")
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    code, _, err = run_main(monkeypatch, capsys, "sample", source, "--n", "1", "--steps", "1",
                            "--out", str(out), "--overwrite")
    assert code == 2, err
    assert "is not replaced" in err and "Traceback" not in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_overwrite_refusals_name_the_reason(tmp_path):
    from ddpmctl.outdir import check_out_dir

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "spec.json").write_text("{}")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="it is a run directory"):
        check_out_dir(run, True)
    with pytest.raises(UsageError, match="it holds r/, a run directory"):
        check_out_dir(tmp_path / "runs", True)
    with pytest.raises(UsageError, match="it is a model folder"):
        check_out_dir(model, True)
    check_out_dir(model, True, model_folder=True)  # `export --overwrite` replaces an earlier export
    with pytest.raises(UsageError, match="holds the source being read"):
        check_out_dir(tmp_path / "m", True, reading=[model / "config.json"], model_folder=True)
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    with pytest.raises(UsageError, match="is a symbolic link"):
        check_out_dir(tmp_path / "link", True)
    old = tmp_path / "old-samples"
    old.mkdir()
    (old / "000000.png").write_bytes(b"x")
    check_out_dir(old, True)  # an earlier output folder: replaced


def test_export_overwrite_refuses_the_run_it_reads(trained_run, tmp_path, monkeypatch, capsys):
    run = copy_run(trained_run, tmp_path / "runs" / "victim")
    code, _, err = run_main(monkeypatch, capsys, "export", str(run), "--out", str(tmp_path / "runs"), "--overwrite")
    assert code == 2, err
    assert "is not replaced" in err and (run / "spec.json").is_file()


def test_a_refused_preflight_leaves_nothing_behind(tmp_path, monkeypatch):
    """Issue 17: a pre-flight refusal (no room for two checkpoints) left spec.json and an empty
    checkpoints/, so the identical retry said "already holds a run"."""
    from test_reliability import _make_images, _spec

    from ddpmctl.train import run

    images = _make_images(tmp_path / "images")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    spec = _spec(images, 1, "train.sample_every=1000")
    with pytest.raises(CheckpointError, match="not enough free space"):
        run(spec, tmp_path / "runs" / "new")
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert run(spec, tmp_path / "runs" / "new").steps == 1  # the identical retry works
    assert json.loads((tmp_path / "runs" / "new" / "spec.json").read_text())
