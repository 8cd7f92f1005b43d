"""End to end on the CPU with tiny specs: train -> checkpoint -> resume -> sample -> grid."""

import json

import pytest
import torch

from ddpmctl import spec as S
from ddpmctl.images import read_image, save_png
from ddpmctl.train import run

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

TINY = ["--set", "model.base_channels=16", "--set", "model.groups=8", "--set", "model.head_channels=16",
        "--set", "model.time_embed_dim=32", "--set", "sample.grid_size=4", "--set", "sample.steps=5",
        "--set", "diffusion.timesteps=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny shapes run of 12 steps shared by the tests below (they copy before mutating)."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("e2e")
    env = {"DDPMCTL_DATA": str(base / "data")}
    r = run_cli("train", "shapes", "--max-steps", "12", "--batch-size", "8", "--checkpoint-every", "5",
                "--sample-every", "1", "--out", "runs/tiny", "--json", *TINY, cwd=base, env=env)
    assert r.returncode == 0, r.stderr
    return base, json.loads(r.stdout), env


def test_train_writes_a_complete_run_dir(trained):
    base, summary, _ = trained
    run_dir = base / "runs" / "tiny"
    assert summary["steps"] == 12 and summary["run_dir"].endswith("tiny")
    assert summary["final_loss"] is not None and summary["final_loss"] > 0
    assert (run_dir / "spec.json").is_file()
    spec = S.load(run_dir / "spec.json")
    assert spec.model.base_channels == 16 and spec.train.max_steps == 12
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 12 and {"loss", "grad_norm", "lr", "images_per_s"} <= set(lines[-1])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_00000012"
    assert (run_dir / "checkpoints" / "NEWEST").read_text().strip() == "step_00000012"
    assert list((run_dir / "samples").glob("epoch_*.png"))


def test_resume_continues_from_newest(trained, cli, tmp_path):
    import shutil

    base, _, env = trained
    run_dir = tmp_path / "run"
    shutil.copytree(base / "runs" / "tiny", run_dir)
    r = cli("resume", str(run_dir), "--max-steps", "16", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 16
    assert "resuming from" in r.stderr and "step_00000012" in r.stderr
    state = json.loads((run_dir / "checkpoints" / "step_00000016" / "state.json").read_text())
    assert state["images_seen"] == 16 * 8 and state["ema_updates"] == 16
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 16


def test_resume_in_another_precision_says_so_and_records_it(trained, cli, tmp_path):
    """Each checkpoint records the precision it was trained in; resuming in another (here asked with
    `resume --precision`, or `auto` on a different machine) warns that the run is no longer bitwise
    an uninterrupted one, and says how to keep the old precision."""
    import shutil

    base, _, env = trained
    run_dir = tmp_path / "run"
    shutil.copytree(base / "runs" / "tiny", run_dir)
    was = json.loads((run_dir / "checkpoints" / "step_00000012" / "state.json").read_text())["precision"]
    other = "fp32" if was == "bf16" else "bf16"
    r = cli("resume", str(run_dir), "--max-steps", "14", "--precision", other, env=env)
    assert r.returncode == 0, r.stderr
    assert f"trained in {was} until step 12, continuing in {other}" in r.stderr
    assert f"--precision {was}` keeps it" in r.stderr
    state = json.loads((run_dir / "checkpoints" / "step_00000014" / "state.json").read_text())
    assert state["precision"] == other and S.load(run_dir / "spec.json").train.precision == other
    r = cli("resume", str(run_dir), "--max-steps", "15", env=env)  # the run's precision now: no warning
    assert r.returncode == 0 and "trained in" not in r.stderr, r.stderr
    r = cli("resume", str(run_dir), "--max-steps", "16", "--precision", "fp8", env=env)
    assert r.returncode == 2 and "precision" in r.stderr


def test_resume_with_smaller_total_is_an_error(trained, cli, tmp_path):
    import shutil

    base, _, env = trained
    shutil.copytree(base / "runs" / "tiny", tmp_path / "run")
    r = cli("resume", "run", "--max-steps", "5", env=env)
    assert r.returncode == 2 and "new total" in r.stderr


@pytest.mark.parametrize("sampler,steps", [("ddim", "4"), ("ddpm", None), ("dpm-solver++", "5")])
def test_sample_each_sampler(trained, cli, sampler, steps):
    base, _, env = trained
    args = ["sample", str(base / "runs" / "tiny"), "--n", "3", "--sampler", sampler, "--out", "imgs", "--json"]
    if steps:
        args += ["--steps", steps]
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    meta = json.loads((__import__("pathlib").Path("imgs") / "samples.json").read_text())
    assert meta["sampler"] == sampler and meta["seeds"] == [0, 1, 2]
    assert meta["network_evaluations"] == (100 if sampler == "ddpm" else int(steps))
    imgs = [read_image(__import__("pathlib").Path("imgs") / f"{i:06d}.png") for i in range(3)]
    assert all(i.shape == (3, 32, 32) for i in imgs)


def test_sample_defaults_come_from_the_runs_spec(trained, cli):
    """Without --sampler/--steps/--eta a run samples as its spec.sample says (shapes preset:
    SDE-DPM-Solver++, eta 1; TINY sets 5 steps); another sampler gets its usual steps and eta 0."""
    base, _, env = trained
    src = str(base / "runs" / "tiny")
    from pathlib import Path

    assert cli("sample", src, "--n", "2", "--out", "own", env=env).returncode == 0
    meta = json.loads(Path("own/samples.json").read_text())
    assert (meta["sampler"], meta["steps"], meta["eta"], meta["network_evaluations"]) == ("dpm-solver++", 5, 1.0, 5)
    assert cli("sample", src, "--n", "2", "--sampler", "ddim", "--out", "other", env=env).returncode == 0
    meta = json.loads(Path("other/samples.json").read_text())
    assert (meta["sampler"], meta["steps"], meta["eta"]) == ("ddim", 50, 0.0)
    assert cli("sample", src, "--n", "2", "--eta", "0", "--out", "ode", env=env).returncode == 0
    assert Path("ode/000000.png").read_bytes() != Path("own/000000.png").read_bytes()  # eta reaches the solver


def test_sample_images_depend_on_seed_not_batch(trained, cli, tmp_path):
    base, _, env = trained
    src = str(base / "runs" / "tiny")
    a = cli("sample", src, "--n", "4", "--steps", "3", "--batch-size", "4", "--out", "a", env=env)
    b = cli("sample", src, "--n", "2", "--steps", "3", "--batch-size", "1", "--out", "b", env=env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    for i in range(2):
        assert torch.equal(read_image(tmp_path / "a" / f"{i:06d}.png"), read_image(tmp_path / "b" / f"{i:06d}.png"))
    assert not torch.equal(read_image(tmp_path / "a" / "000000.png"), read_image(tmp_path / "a" / "000001.png"))


def test_sample_refuses_nonempty_out(trained, cli, tmp_path):
    base, _, env = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    r = cli("sample", str(base / "runs" / "tiny"), "--n", "1", "--out", "full", env=env)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_grid_evolution_and_trajectory(trained, cli, tmp_path):
    base, _, env = trained
    src = str(base / "runs" / "tiny")
    r = cli("grid", src, "--evolution", "--out", "evo.png", "--n", "2", env=env)
    assert r.returncode == 0, r.stderr
    evo = read_image(tmp_path / "evo.png")
    index = json.loads((base / "runs" / "tiny" / "samples" / "index.json").read_text())
    cols = len(index["grids"])
    strip = evo.shape[1] - (2 * 34 + 2)  # 32px images, 2px padding, under a strip of epoch labels
    assert evo.shape[2] == cols * 34 + 2 and 8 <= strip <= 40
    assert (evo[:, :strip] < 128).any() and (evo[:, strip:strip + 2] == 255).all()  # labels drawn, grid below
    r = cli("grid", src, "--out", "plain.png", env=env)  # no flag: a run holds no images of its own
    assert r.returncode == 2 and "is a run directory: add --evolution" in r.stderr and "--trajectory" in r.stderr
    r = cli("grid", src, "--trajectory", "--n", "2", "--frames", "4", "--steps", "6", "--out", "traj.png",
            "--gif", "traj.gif", env=env)
    assert r.returncode == 0, r.stderr
    traj = read_image(tmp_path / "traj.png")
    assert traj.shape[2] == 4 * 34 + 2 and traj.shape[1] == 2 * 34 + 2
    from PIL import Image

    with Image.open(tmp_path / "traj.gif") as g:
        assert g.n_frames > 2


def test_training_learns(tmp_path):
    """Overfit four images: the loss must fall well below where it starts."""
    folder = tmp_path / "four"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        img = torch.zeros(3, 16, 16, dtype=torch.uint8)
        img[i % 3, 4:12, 4:12] = 255
        img[(i + 1) % 3] = (torch.rand(16, 16, generator=g) * 60).to(torch.uint8)
        save_png(folder / f"{i}.png", img)
    spec = S.resolve("shapes", sets=["model.image_size=16", "model.base_channels=16", "model.channel_mult=1,2",
                                      "model.attention_resolutions=[8]", "model.head_channels=16",
                                      "model.time_embed_dim=32", "optim.warmup_steps=10", "train.log_every=10",
                                      "sample.grid_size=2", "sample.steps=2"],
                     overrides={"data": {"source": str(folder), "flip": False},
                                "train": {"max_steps": 200, "batch_size": 4, "device": "cpu",
                                          "checkpoint_every": 1000, "sample_every": 1000}})
    logs = []
    run(spec, tmp_path / "run", on_event=lambda e: logs.append(e) if e["event"] == "log" else None)
    first, last = logs[0]["loss"], sum(e["loss"] for e in logs[-3:]) / 3
    assert last < 0.5 * first, (first, last)
