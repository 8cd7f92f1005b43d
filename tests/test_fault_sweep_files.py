"""Fault-sweep cases of issue 17 §4: bad or hostile files give one message and exit 1 or 2, never a
traceback, a segfault or silence (docs/reliability.md, "Bad and hostile files").

One tiny real run (and a model folder exported from it) is made once for the module; each test copies
what it damages into its own tmp_path. Damaged checkpoints have their manifest re-hashed, as a forger
would, so only the content checks can catch them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_main
from ddpmctl import checkpoint as ck
from ddpmctl import rundir
from ddpmctl import spec as S
from ddpmctl.images import save_png
from ddpmctl.lock import RunLock
from ddpmctl.train import run

SETS = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=8", "model.num_res_blocks=1", "model.groups=8", "model.head_channels=8",
        "model.time_embed_dim=16", "sample.grid_size=2", "sample.steps=2", "sample.sampler=ddim",
        "train.sample_every=1", "train.log_every=1", "train.milestones=false", "train.compile=off"]
BAD_UTF8 = b'{"step": "\xff\xfe"}\n'
DEEP = 100_000


def _spec(images: Path, steps: int) -> S.RunSpec:
    return S.resolve("shapes", sets=SETS, overrides={
        "data": {"source": str(images)},
        "train": {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "device": "cpu"}})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 4-step run over 8 images (2 steps per epoch: sample grids at steps 2 and 4) and its export."""
    from ddpmctl.export import export_model_folder

    root = tmp_path_factory.mktemp("sweep")
    images = root / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        save_png(images / f"{i}.png", (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_spec(images, 4), root / "run", data_root=root / "data")
        export_model_folder(root / "run", root / "folder")
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "images": images, "run": root / "run", "folder": root / "folder",
            "data": root / "data"}


def _copy(base, what: str, tmp_path: Path) -> Path:
    dest = tmp_path / what
    shutil.copytree(base[what], dest)
    return dest


def _one_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def _newest_dir(run_dir: Path) -> Path:
    return run_dir / ck.CKPT_DIR / (run_dir / ck.CKPT_DIR / ck.NEWEST).read_text().strip()


def _rehash(ckpt_dir: Path) -> None:
    """What a forger does after editing a checkpoint: recompute the manifest so it verifies."""
    man = json.loads((ckpt_dir / "manifest.json").read_text())
    man["files"] = {f: ck.sha256_file(ckpt_dir / f) for f in man["files"]}
    (ckpt_dir / "manifest.json").write_text(json.dumps(man))


def _forge_tensor(ckpt_dir: Path, kind: str, edit) -> None:
    path = ckpt_dir / f"{kind}.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _rehash(ckpt_dir)


def _resume_args(run_dir: Path, base) -> list[str]:
    return ["resume", str(run_dir), "--max-steps", "6", "--data-root", str(base["data"])]


# ---------------------------------------------------------------- files that are not UTF-8
def test_spec_json_not_utf8_names_the_file(base, tmp_path, monkeypatch, capsys):
    run_dir = _copy(base, "run", tmp_path)
    (run_dir / "spec.json").write_bytes(BAD_UTF8)
    code, _, err = run_main(monkeypatch, capsys, "sample", str(run_dir), "--n", "1", "--out", "out")
    _one_error(code, err, 2, "spec.json: not UTF-8 text (byte 0xff at offset 10)", "expected a ddpmctl run spec")


def test_spec_file_not_utf8_or_a_list_or_too_deep(tmp_path, monkeypatch, capsys):
    cases = {"latin1.json": (BAD_UTF8, "not UTF-8 text"),
             "list.json": (b"[1, 2]", "its top level is a list, not an object"),
             "deep.json": (b'{"model": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply to be valid JSON"),
             "deep.toml": (b"model = " + b"[" * DEEP + b"]" * DEEP + b"\n", "nested too deeply to be valid TOML")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--spec", name, "--dry-run")
        _one_error(code, err, 2, f"{name}: {needle}", "expected a (partial) run spec")
        assert out == ""


def test_spec_json_too_deep_names_the_file(base, tmp_path, monkeypatch, capsys):
    run_dir = _copy(base, "run", tmp_path)
    (run_dir / "spec.json").write_bytes(b'{"model": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 2, "spec.json: nested too deeply to be valid JSON")


def test_model_config_not_utf8_too_deep_or_wrong_types(base, tmp_path, monkeypatch, capsys):
    folder = _copy(base, "folder", tmp_path)
    good = json.loads((folder / "config.json").read_text())
    cases = [(BAD_UTF8, "config.json: not UTF-8 text"),
             (b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", "config.json: nested too deeply"),
             (b"[]", "config.json: its top level is a list"),
             (json.dumps({**good, "format_version": "abc"}).encode(), '"format_version" is "abc", expected a whole number'),
             (json.dumps({**good, "training": "x"}).encode(), '"training" is "x", expected an object'),
             (json.dumps({**good, "weights": {"kind": 3}}).encode(), '"weights.kind" is 3, expected a string')]
    for data, needle in cases:
        (folder / "config.json").write_bytes(data)
        code, _, err = run_main(monkeypatch, capsys, "sample", str(folder), "--n", "1", "--out", "out")
        _one_error(code, err, 2, str(folder), needle)
    assert not (tmp_path / "out").exists()


def test_newest_not_utf8_falls_back_with_a_warning(base, tmp_path, monkeypatch, capsys):
    """NEWEST is only a pointer: the checkpoints describe themselves, so a damaged one is reported
    and the newest checkpoint that verifies is used (as for a NEWEST that names a broken one)."""
    run_dir = _copy(base, "run", tmp_path)
    (run_dir / ck.CKPT_DIR / ck.NEWEST).write_bytes(b"step_\xff\xfe\n")
    code, _, err = run_main(monkeypatch, capsys, "sample", str(run_dir), "--n", "1", "--out", "out")
    assert code == 0, err
    assert "NEWEST does not name a checkpoint" in err and "Traceback" not in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_stale_lock_not_utf8_is_taken_over(base, tmp_path):
    run_dir = _copy(base, "run", tmp_path)
    (run_dir / ".lock").write_bytes(b"pid=\xff\xfe host=x\n")  # left by a process that died
    warnings: list[str] = []
    with RunLock(run_dir, on_warning=warnings.append):
        assert (run_dir / ".lock").read_text().startswith("pid=")
    assert len(warnings) == 1 and "taking over the stale lock" in warnings[0]


# ---------------------------------------------------------------- forged checkpoints (manifest re-hashed)
def test_forged_rng_dtype_is_refused_naming_the_tensor(base, tmp_path, monkeypatch, capsys, one_thread):
    run_dir = _copy(base, "run", tmp_path)
    _forge_tensor(_newest_dir(run_dir), "rng", lambda t: t.update(cpu=t["cpu"].to(torch.int32)))
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 1, "rng.safetensors: tensor 'cpu' is int32 [5056], expected uint8 [5056]")


@pytest.mark.parametrize("field,value,needle", [
    ("images_seen", "16", "field 'images_seen'"),
    ("optimizer", [], "field 'optimizer'"),
    ("retreat", "x", "field 'retreat'"),
    ("window", {"loss_sum": "x"}, "field 'window.loss_sum'"),
    ("step", "4", '"step" is \'4\', expected a whole number'),
])
def test_forged_state_json_types_are_refused(base, tmp_path, monkeypatch, capsys, one_thread, field, value, needle):
    run_dir = _copy(base, "run", tmp_path)
    newest = _newest_dir(run_dir)
    state = json.loads((newest / "state.json").read_text())
    state[field] = value
    (newest / "state.json").write_text(json.dumps(state))
    _rehash(newest)
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    if field == "step":  # what makes it a checkpoint at all: skipped like a corrupted one, named, older one used
        assert code == 0 and f"skipping checkpoint {newest / 'state.json'}: {needle}" in err, err
        assert "falling back to an older one" in err and "Traceback" not in err
        return
    _one_error(code, err, 1, f"{newest / 'state.json'}", needle)


def test_forged_param_groups_are_refused(base, tmp_path, monkeypatch, capsys, one_thread):
    run_dir = _copy(base, "run", tmp_path)
    newest = _newest_dir(run_dir)
    state = json.loads((newest / "state.json").read_text())
    state["optimizer"]["param_groups"][0]["lr"] = "fast"
    (newest / "state.json").write_text(json.dumps(state))
    _rehash(newest)
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 1, "optimizer.param_groups[0].lr is string 'fast', expected number")
    state["optimizer"]["param_groups"][0]["lr"] = 1e-3
    state["optimizer"]["param_groups"][0]["params"][:2] = [1, 0]  # would pair moments with the wrong weights
    (newest / "state.json").write_text(json.dumps(state))
    _rehash(newest)
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 1, "optimizer.param_groups[0].params does not list the parameters")


def test_forged_optimizer_moment_shape_is_refused_not_a_segfault(base, tmp_path, cli):
    """Fused AdamW reads a moment of the wrong shape out of bounds (SIGSEGV on 539e9eb): in a
    subprocess, so a regression cannot take pytest down with it."""
    run_dir = _copy(base, "run", tmp_path)
    newest = _newest_dir(run_dir)

    def shrink(t):  # every moment one element long: SIGSEGV (-11) on 539e9eb
        t.update({k: torch.zeros(1) for k in t if "exp_avg" in k})
    _forge_tensor(newest, "optim", shrink)
    r = cli(*_resume_args(run_dir, base), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"{newest / 'optim.safetensors'}: tensor '0.exp_avg' is float32 [1], expected float32 [" in r.stderr
    assert "more); the checkpoint does not fit spec.json" in r.stderr and "Traceback" not in r.stderr
    assert ck.find_newest(run_dir).step == 4  # refused before anything was written


def test_forged_model_and_ema_weights_are_refused(base, tmp_path, monkeypatch, capsys, one_thread):
    run_dir = _copy(base, "run", tmp_path)
    newest = _newest_dir(run_dir)
    name = next(iter(load_file(str(newest / "model.safetensors"))))
    _forge_tensor(newest, "model", lambda t: t.update({name: t[name].to(torch.float64)}))
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 1, f"model.safetensors: tensor {name!r} is float64", "expected float32")
    _forge_tensor(newest, "model", lambda t: t.update({name: t[name].float()}))
    _forge_tensor(newest, "ema", lambda t: t.update(extra=torch.zeros(1)))
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    _one_error(code, err, 1, "ema.safetensors: unexpected tensor 'extra'")


# ---------------------------------------------------------------- run files and model folders
def test_sample_index_not_json_is_moved_aside_and_training_checkpoints(base, tmp_path, monkeypatch, capsys,
                                                                     one_thread):
    run_dir = _copy(base, "run", tmp_path)
    index = run_dir / "samples" / "index.json"
    index.write_text("{not json")
    code, _, err = run_main(monkeypatch, capsys, *_resume_args(run_dir, base))
    assert code == 0, err
    assert "samples/index.json: not valid JSON" in err and "moved it to" in err
    assert ck.find_newest(run_dir).step == 6  # the step after the bad index still got its checkpoint
    aside = list((run_dir / "samples").glob("index.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"  # nothing lost
    assert [g["epoch"] for g in rundir.read_sample_index(run_dir)] == [3]


def test_grid_evolution_with_a_bad_sample_index_names_it(base, tmp_path, monkeypatch, capsys):
    run_dir = _copy(base, "run", tmp_path)
    index = run_dir / "samples" / "index.json"
    for data, needle in [(b"\xff", "not UTF-8"), (b'{"grids": 3}', '"grids" is int, expected a list'),
                         (b'{"grids": [{"epoch": 1, "file": "../../x.png", "n": 2, "nrow": 8, "padding": 2}]}',
                          "field 'file' of grid 0 is malformed")]:
        index.write_bytes(data)
        code, _, err = run_main(monkeypatch, capsys, "grid", str(run_dir), "--evolution", "--out", "g.png")
        _one_error(code, err, 2, "index.json", needle)


def test_spec_edited_after_training_is_a_message_in_sample_and_resume(base, tmp_path, monkeypatch, capsys,
                                                                      one_thread):
    run_dir = _copy(base, "run", tmp_path)
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["model"]["base_channels"] = 16
    (run_dir / "spec.json").write_text(json.dumps(spec))
    for args in (["sample", str(run_dir), "--n", "1", "--out", "out"], _resume_args(run_dir, base),
                 ["export", str(run_dir), "--out", "out"]):
        code, _, err = run_main(monkeypatch, capsys, *args)
        _one_error(code, err, 1, "does not fit spec.json: was spec.json edited?", "safetensors: tensor ", "expected float32 [")
    assert not (tmp_path / "out").exists()


def test_integer_weights_in_a_model_folder_are_refused(base, tmp_path, monkeypatch, capsys):
    folder = _copy(base, "folder", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    code, _, err = run_main(monkeypatch, capsys, "sample", str(folder), "--n", "1", "--out", "out")
    _one_error(code, err, 2, f"model.safetensors: tensor {name!r} is int32", "expected a floating-point dtype")
    assert not (tmp_path / "out").exists()


def test_torn_metrics_line_is_cut_before_appending(base, tmp_path, one_thread):
    """A crash tore the last line, and the file lost its unsynced tail: it is now shorter than the
    length the checkpoint recorded. Resume cuts it to its last complete line before appending."""
    run_dir = _copy(base, "run", tmp_path)
    metrics = run_dir / "metrics.jsonl"
    recorded = ck.find_newest(run_dir).state["metrics_bytes"]
    assert recorded == metrics.stat().st_size
    with open(metrics, "r+b") as f:
        f.truncate(recorded - 10)  # mid-way through the last record
    spec = S.load(run_dir / "spec.json")
    spec.train.max_steps = 6
    run(spec, run_dir, resume=True, data_root=base["data"])
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    steps = [r["step"] for r in recs]
    assert steps == [1, 2, 3, 5, 6]  # step 4's torn record is gone, the rest follow on their own lines


def test_extreme_aspect_ratios_are_skipped_and_counted(tmp_path):
    from ddpmctl.data import load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (500, 1), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (1, 500), (200, 30, 30)).save(folder / "tall.png")
    Image.new("RGB", (8, 1), (200, 30, 30)).save(folder / "ok-8to1.png")  # the limit itself is kept
    Image.new("RGB", (12, 10), (200, 30, 30)).save(folder / "ok.png")
    events: list[dict] = []
    data = load_images(str(folder), image_size=8, channels=3, root=tmp_path / "root", on_event=events.append)
    assert data.images.shape[0] == 2
    assert (data.images[:, 0] > 150).all()  # the 8:1 strip is its centred pixel upscaled, not black
    skipped = [e for e in events if e.get("event") == "skipped"]
    assert len(skipped) == 1 and skipped[0]["count"] == 2
    assert "extreme aspect ratio" in skipped[0]["message"] and "tall.png" in skipped[0]["message"]


def test_damaged_eval_log_and_model_card(base, tmp_path, monkeypatch, capsys):
    """The other readers of files a crash or a user can damage: eval.jsonl is read around a torn or
    non-UTF-8 line (by `eval` and by the exported card); a model card that is not UTF-8 is named."""
    from ddpmctl.rundir import read_eval_log

    (tmp_path / "eval.jsonl").write_bytes(b'{"a": 1}\n\xff\xfe\n[1]\n' + b"[" * DEEP + b'\n{"a": 2}\n{"a": 3, "ti')
    assert [r["a"] for r in read_eval_log(tmp_path)] == [1, 2]
    folder = _copy(base, "folder", tmp_path)
    (folder / "README.md").write_bytes(b"---\nlibrary_name: ddpmctl\n\xff\n")
    code, _, err = run_main(monkeypatch, capsys, "hub-push", str(folder), "--dry-run")
    _one_error(code, err, 2, "README.md: not UTF-8 text; expected the model card")
