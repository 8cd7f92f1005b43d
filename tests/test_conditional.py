"""Class-conditional generation end to end, through the CLI: a short conditional `shapes` run draws the
class it is asked for measurably more often than chance, its grids have a row per class, and every
misuse exits 2 with a message naming what is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl.data.shapes import KINDS, classify_shapes, make_shapes

# 16x16 shapes, 300 steps (about 40 s): the class signal is learnt well before the shapes are clean
TRAIN = ["train", "shapes", "--conditional", "--max-steps", "300", "--set", "model.image_size=16",
         "--set", "train.sample_every=100", "--quiet"]


def test_the_shape_classifier_names_real_shapes():
    for size in (16, 32):
        arr, kinds = make_shapes(300, size, 3, seed=5)
        assert (classify_shapes(arr) == kinds).mean() > 0.95


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> tuple[Path, dict]:
    from conftest import run_cli

    base = tmp_path_factory.mktemp("cond")
    env = {"DDPMCTL_DATA": str(base / "data-root"), "HF_HOME": str(base / "hf"), "HF_HUB_OFFLINE": "1"}
    # one thread: these 16x16 steps are too small for two (42 s instead of 60 s on 2 cores)
    r = run_cli(*TRAIN, "--out", "run", cwd=base, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return base / "run", env


def test_samples_are_the_asked_class_more_often_than_chance(cond_run, cli, tmp_path):
    run, env = cond_run
    r = cli("sample", str(run), "--class", "all", "--n", "16", "--guidance", "1", "--out", "s", "--json", env=env)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["classes"] == list(KINDS) and meta["guidance"] == 1 and meta["n"] == 48
    labels = np.array(meta["labels"])
    assert labels.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    assert meta["seeds"][:16] == meta["seeds"][16:32] == list(range(16))  # the same noise in every class
    images = np.stack([np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png")).transpose(2, 0, 1)
                       for i in range(48)])
    pred = classify_shapes(images)
    # chance is 1/3; a network that ignored its class input would draw the same image in every row
    assert (pred == labels).mean() > 0.45, pred.reshape(3, 16)
    assert not np.array_equal(images[:16], images[16:32])


def test_training_grids_have_a_row_per_class(cond_run):
    run, _ = cond_run
    spec = json.loads((run / "spec.json").read_text())
    assert spec["model"]["conditional"] and spec["model"]["classes"] == list(KINDS)
    grid = json.loads((run / "samples" / "index.json").read_text())["grids"][-1]
    assert grid["rows"] == "class" and grid["classes"] == list(KINDS) and grid["n"] == 3 * grid["nrow"]
    w, h = Image.open(run / "samples" / grid["file"]).size
    assert (w, h) == (2 + grid["nrow"] * 18, 2 + 3 * 18)  # 16-pixel images with 2-pixel padding


def test_class_errors_exit_2_naming_what_is_accepted(cond_run, cli, trained_run, monkeypatch, capsys):
    from conftest import run_main

    run, env = cond_run
    cases = [
        (["sample", str(run), "--class", "hexagon"], "unknown class 'hexagon'; accepted: all, 0..2, or a name: "
                                                      "circle, square, triangle"),
        (["sample", str(run), "--guidance", "2"], "--guidance needs --class"),
        (["sample", str(trained_run), "--class", "0"], "--class needs a class-conditional model"),
        (["grid", str(trained_run), "--per-class"], "--class needs a class-conditional model"),
    ]
    for args, message in cases:
        code, _, err = run_main(monkeypatch, capsys, *args, "--out", "never" if args[0] == "sample" else "g.png")
        assert code == 2 and message in err, (args, err)
    r = cli("sample", str(run), "--class", "circle", "--guidance", "-1", "--out", "never", env=env)
    assert r.returncode == 2 and "--guidance" in r.stderr and "greater than or equal to 0" in r.stderr, r.stderr
    assert not Path("never").exists() and not Path("g.png").exists()


def test_conditional_training_on_unlabelled_data_is_a_usage_error(cli, tmp_path):
    (tmp_path / "loose").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "loose" / f"{i}.png")
    r = cli("train", "loose", "--preset", "shapes", "--conditional", "--max-steps", "2", "--out", "r")
    assert r.returncode == 2, r.stderr
    assert "loose has no class labels" in r.stderr and "one sub-folder per class" in r.stderr
    assert not (tmp_path / "r").exists()


def test_dry_run_names_the_classes(cli):
    r = cli("train", "shapes", "--conditional", "--dry-run", "--json", "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["spec"]["model"]["classes"] == list(KINDS)


@pytest.mark.numerics  # a bitwise promise: runs again under the AVX2 cap in .ci/run
def test_a_conditional_run_resumes_bitwise_and_keeps_its_classes(tmp_path, one_thread):
    """Labels and label dropout come from the checkpointed streams: a run stopped after every step and
    resumed ends bitwise where an uninterrupted one ends. A spec naming other classes is refused."""
    from safetensors.torch import load_file

    from ddpmctl import spec as S
    from ddpmctl.errors import UsageError
    from ddpmctl.train import run

    tiny = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
            "model.base_channels=16", "model.num_res_blocks=1", "model.groups=8", "model.head_channels=16",
            "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2", "train.sample_every=1000",
            "train.log_every=1000", "diffusion.timesteps=100", "model.conditional=true", "train.label_dropout=0.5"]

    def spec(**train):
        return S.resolve("shapes", sets=tiny, overrides={"train": {"max_steps": 4, "batch_size": 4,
                                                                   "device": "cpu", **train}})

    run(spec(), tmp_path / "ref")
    for _ in range(3):
        run(spec(time_limit=1e-9), tmp_path / "chunked", resume=(tmp_path / "chunked").exists())
    assert run(spec(), tmp_path / "chunked", resume=True).steps == 4
    for name in ("model", "ema", "optim"):
        a = load_file(tmp_path / "ref" / "checkpoints" / "step_00000004" / f"{name}.safetensors")
        b = load_file(tmp_path / "chunked" / "checkpoints" / "step_00000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "class_emb.weight" in load_file(tmp_path / "ref" / "checkpoints" / "step_00000004" / "model.safetensors")
    saved = S.load(tmp_path / "ref" / "spec.json")
    assert saved.model.classes == KINDS
    other = spec(max_steps=6)
    other.model.classes = ("a", "b", "c")
    with pytest.raises(UsageError, match=r"the spec's classes \['a', 'b', 'c'\] differ from the data's"):
        run(other, tmp_path / "ref", resume=True)
