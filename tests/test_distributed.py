"""Distributed training and sampling on the CPU: gloo, two worker processes started by `--nproc 2`
through torch.distributed's launcher (docs/distributed.md).

A tiny network on 8x8 images keeps every step cheap: the cost of these tests is process start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmctl.data.loader import DeviceLoader
from ddpmctl.dist import check_batch
from ddpmctl.errors import UsageError
from ddpmctl.images import save_png
from ddpmctl.launch import worker_argv

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

SETS = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=16", "model.num_res_blocks=1", "model.groups=8", "model.head_channels=16",
        "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2", "train.sample_every=1000",
        "train.log_every=1", "optim.warmup_steps=0"]
# fp32: these tests compare a 2-rank job with one process to float32 rounding, which bf16 rounding (the
# auto precision on CPUs with native bf16) would swamp; the precision itself is tested in test_devices.py.
TRAIN = ["--preset", "shapes", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
         *[a for s in SETS for a in ("--set", s)]]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _make_images(folder: Path, n: int) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_png(folder / f"{i:03d}.png", (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8))
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return _make_images(tmp_path / "imgs", 32)  # batch 8: 4 steps per epoch, a checkpoint at each


@pytest.fixture
def many_images(tmp_path) -> Path:
    return _make_images(tmp_path / "many", 800)  # 100 steps per epoch: no epoch-end checkpoint early on


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpmctl", *args], env={**os.environ, **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("\n") >= 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no training step logged in {timeout}s")


def _weights(run: Path, step: int, part: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / f"{part}.safetensors")


def _reorder_tolerance(run: Path, steps: int) -> float:
    """How far float32 summation order may move a weight in ``steps`` AdamW steps of ``run``.

    A 2-rank job and one process sum the same float32 gradients in different orders (two backward
    passes over half the batch and an all-reduce, against one backward pass over all of it), so they
    differ by rounding. AdamW makes that visible where |g| is near its eps (1e-8): there the update is
    about lr * g / eps, so a rounding error of 1e-11 in g moves the weight by ~1e-3 * lr. Measured:
    1.03e-6 after two steps at lr 1e-3 with torch 2.14's AVX2 kernels, under 1e-6 with AVX-512
    (issue 18). The tolerance is 1e-2 * lr per step; a real fault (a rank's rows missing, an update
    skipped on one rank) moves weights by ~lr per step."""
    return 1e-2 * json.loads((run / "spec.json").read_text())["optim"]["lr"] * steps


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------- pure pieces, in process
def test_loader_shards_are_the_global_batch_split_in_rank_order():
    imgs = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    whole = DeviceLoader(imgs, 8, "cpu", seed=3)
    parts = [DeviceLoader(imgs, 8, "cpu", seed=3, shard=(r, 4)) for r in range(4)]
    assert [p.steps_per_epoch for p in parts] == [whole.steps_per_epoch] * 4
    for epoch, index in [(0, 0), (2, 4)]:
        pieces = [p.batch(epoch, index) for p in parts]
        assert [x.shape[0] for x in pieces] == [2, 2, 2, 2]
        assert torch.equal(torch.cat(pieces), whole.batch(epoch, index))


def test_global_batch_must_split_evenly():
    check_batch(32, 4)
    with pytest.raises(UsageError, match=r"batch_size 30 .* multiple of 4 \(e\.g\. 28 or 32\)"):
        check_batch(30, 4)


def test_worker_argv_drops_nproc_and_adds():
    assert worker_argv(["train", "x", "--nproc", "2", "--json"], add=["--out", "r"]) == \
        ["train", "x", "--json", "--out", "r"]
    assert worker_argv(["sample", "--nproc=4", "--n", "3"]) == ["sample", "--n", "3"]


def test_nproc_refuses_a_batch_that_does_not_split(cli, images):
    r = cli("train", str(images), *TRAIN, "--nproc", "3", "--max-steps", "2", "--out", "run", env=ENV)
    assert r.returncode == 2, r.stderr
    assert "must split evenly over 3 ranks" in r.stderr
    assert not Path("run").exists()


# ---------------------------------------------------------------- two real ranks
def test_two_ranks_train_like_one_process_and_write_once(cli, images):
    """World size 2 with global batch 8 = one process with batch 8 on the same data, within float
    tolerance; both ranks hold the same weights at every checkpoint; one metrics stream."""
    args = [str(images), *TRAIN, "--max-steps", "6", "--checkpoint-every", "2", "--json"]
    two = cli("train", *args, "--nproc", "2", "--out", "two", env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr
    one = cli("train", *args, "--out", "one", env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    assert json.loads(two.stdout)["steps"] == 6  # one JSON object: only rank 0 prints
    assert "Traceback" not in two.stderr and two.stderr.count("run dir two") == 1

    # An unaveraged gradient would hide from AdamW's scale invariance: the loss and gradient-norm
    # checks below catch that.
    for step in (2, 4, 6):
        tol = _reorder_tolerance(Path("one"), step)
        assert _max_diff(_weights(Path("two"), step), _weights(Path("one"), step)) < tol
        assert _max_diff(_weights(Path("two"), step, "ema"), _weights(Path("one"), step, "ema")) < tol
        ranks = json.loads((Path("two") / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())["ranks"]
        assert ranks["world_size"] == 2 and len(ranks["fingerprints"]) == 2
        assert ranks["fingerprints"][0] == ranks["fingerprints"][1]
    assert sorted(p.name for p in (Path("two") / "checkpoints").iterdir()) == \
        sorted(p.name for p in (Path("one") / "checkpoints").iterdir())

    recs2 = [json.loads(x) for x in (Path("two") / "metrics.jsonl").read_text().splitlines()]
    recs1 = [json.loads(x) for x in (Path("one") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs2] == [r["step"] for r in recs1] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(recs2, recs1):  # the loss is the global batch's, averaged over ranks
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_sigterm_stops_every_rank_with_one_checkpoint_then_one_rank_resumes(cli, many_images):
    """SIGTERM to the job: one checkpoint, exit 143. The run then continues in one process and ends
    where a run that never had two ranks ends, within float tolerance."""
    total = 400
    args = [str(many_images), *TRAIN, "--max-steps", str(total), "--checkpoint-every", "100000"]
    proc = _popen("train", *args, "--nproc", "2", "--out", "two")
    _wait_for_line(Path("two") / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    ckpts = [p.name for p in (Path("two") / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(ckpts) == 1, ckpts
    stopped = int(ckpts[0].split("_")[1])
    assert 0 < stopped < 100, stopped  # before the first epoch end
    assert err.count("SIGTERM at step") == 1  # rank 0 speaks for both

    more = stopped + 3
    res = cli("resume", "two", "--max-steps", str(more), env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    ref = cli("train", *[a if a != str(total) else str(more) for a in args], "--out", "one", env=ENV, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert _max_diff(_weights(Path("two"), more), _weights(Path("one"), more)) < _reorder_tolerance(Path("one"), more)
    steps = [json.loads(x)["step"] for x in (Path("two") / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, more + 1))


def test_a_killed_rank_ends_the_job_quickly_with_a_message(images):
    proc = _popen("train", str(images), *TRAIN, "--max-steps", "100000", "--nproc", "2", "--out", "two")
    _wait_for_line(Path("two") / "metrics.jsonl", proc)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    rank1 = [p for p in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1, workers
    os.kill(rank1[0], signal.SIGKILL)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1
    assert "rank 1 was killed by SIGKILL" in err
    assert "Traceback" not in err


def test_sample_nproc_writes_what_one_process_writes(cli, images):
    run = cli("train", str(images), *TRAIN, "--max-steps", "2", "--out", "run", env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    common = ["run", "--n", "7", "--batch-size", "2", "--steps", "4", "--device", "cpu"]
    two = cli("sample", *common, "--out", "two", "--nproc", "2", "--json", env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr
    one = cli("sample", *common, "--out", "one", env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    names = sorted(p.name for p in Path("one").iterdir())
    assert names == sorted(p.name for p in Path("two").iterdir())
    assert len([n for n in names if n.endswith(".png")]) == 7
    for n in names:
        if n.endswith(".png"):
            assert (Path("one") / n).read_bytes() == (Path("two") / n).read_bytes(), n
    meta = json.loads((Path("two") / "samples.json").read_text())
    assert meta["processes"] == 2 and meta["seeds"] == list(range(7))
    assert json.loads(two.stdout)["n"] == 7
    assert not [p for p in Path(".").iterdir() if ".partial" in p.name]


def test_ranks_skip_and_roll_back_together(cli, images):
    """NaN forward passes on rank 1 only (steps 2 and 7-16, injected through torch's module hook by
    tests/faults/sitecustomize.py): both ranks skip the same steps, roll back together to the same
    checkpoint and end with identical, finite weights."""
    tests = Path(__file__).parent
    faults = {"PYTHONPATH": os.pathsep.join([str(tests / "faults"), str(tests), os.environ.get("PYTHONPATH", "")]),
              "DDPMCTL_TEST_NAN_CALLS": "2,7-16", "DDPMCTL_TEST_NAN_RANK": "1"}
    r = cli("train", str(images), *TRAIN, "--max-steps", "40", "--checkpoint-every", "2", "--nproc", "2",
            "--set", "train.rollback_after=10", "--set", "train.max_rollbacks=3", "--out", "two", "--json",
            env={**ENV, **faults}, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["steps"] == 40 and result["skipped_steps"] == 11 and result["rollbacks"] == 1
    recs = [json.loads(x) for x in (Path("two") / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["streak_from"]) for x in recs if x.get("event") == "rollback"] == [(16, 7)]  # once
    state = json.loads((Path("two") / "checkpoints" / "step_00000040" / "state.json").read_text())
    assert state["ranks"]["fingerprints"][0] == state["ranks"]["fingerprints"][1]
    assert all(torch.isfinite(t).all() for t in _weights(Path("two"), 40).values())


def test_plain_torchrun_then_resume_on_two_ranks(images):
    """The multi-node form (`torchrun ... -m ddpmctl train`, no --out: rank 0 names the run dir for
    all), then `resume --nproc 2`."""
    env = {**os.environ, **ENV}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "ddpmctl", "train", str(images), *TRAIN, "--max-steps", "3", "--checkpoint-every",
                        "3"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = list(Path("runs").iterdir())
    assert len(runs) == 1, runs
    res = subprocess.run([sys.executable, "-m", "ddpmctl", "resume", str(runs[0]), "--max-steps", "5",
                          "--nproc", "2", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == 5
    state = json.loads((runs[0] / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert state["ranks"]["world_size"] == 2
    steps = [json.loads(x)["step"] for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_bad_source_for_sample_nproc_is_one_usage_error(cli):
    r = cli("sample", "nope", "--nproc", "2", "--out", "s", env=ENV)
    assert r.returncode == 2
    assert r.stderr.count("run directory nope does not exist") == 1 and "distributed job" not in r.stderr
    assert not Path("s").exists()


def test_two_nodes_on_one_machine(images):
    """The multi-node form: two torchrun agents (--nnodes 2, one worker each) meeting at a c10d
    rendezvous. Both workers are local rank 0 of their node, so both prepare the data into the same
    root at once (prepared writes are atomic), and they train as one job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
           "-m", "ddpmctl", "train", "shapes", *TRAIN, "--max-steps", "2", "--out", "run", "--json"]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert sum(bool(o[0].strip()) for o in outs) == 1  # one rank 0, one JSON result
    state = json.loads(Path("run/checkpoints/step_00000002/state.json").read_text())
    assert state["ranks"]["world_size"] == 2
    assert state["ranks"]["fingerprints"][0] == state["ranks"]["fingerprints"][1]
