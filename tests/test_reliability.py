"""Fault injection on the CPU (docs/reliability.md).

One uninterrupted reference run, then one chain of processes over a second run dir that is
SIGKILLed at random steps, mid-checkpoint-write and between publishing a checkpoint and naming it
NEWEST, stopped with SIGTERM, SIGINT and a double SIGINT, and whose newest checkpoint is truncated,
flipped and stripped of a file between resumes. The chain's final model and EMA (and milestones and
metrics) must be bitwise identical to the reference. Then a divergence (NaN forward passes injected
at chosen steps through torch's module hook), the lock, the pre-flight checks, non-finite sampling, and user mistakes as messages.

Subprocesses run with OMP_NUM_THREADS=1: bitwise equality needs the same thread count in every
process, and one thread is also much faster than two on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmctl import checkpoint as ck
from ddpmctl import spec as S
from ddpmctl.errors import CheckpointError, NonFiniteError, UsageError
from ddpmctl.train import run
from nan_injection import nan_forward
from conftest import make_images as _make_images

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

STEPS = 40  # 16 images, batch 4: 4 steps per epoch; checkpoints at multiples of 3 and at epoch ends
SETS = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=16", "model.num_res_blocks=1", "model.dropout=0.1", "model.groups=8",
        "model.head_channels=16", "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2",
        "train.sample_every=3", "train.log_every=1", "train.keep_last=3",
        "diffusion.prediction=eps"]  # eps, as the chain was written with; divergence comes from nan_injection.py
ARGS = ["--preset", "shapes", "--batch-size", "4", "--checkpoint-every", "3", "--max-steps", str(STEPS),
        *[a for s in SETS for a in ("--set", s)]]
RECORD_KEYS = ("step", "loss", "grad_norm", "lr", "skipped")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data folder, the subprocess environment and one uninterrupted reference run.

    The reference runs in this process (one thread, like the subprocesses): the chain's processes
    must match it bit for bit, which also shows the CLI and the library train identically."""
    base = tmp_path_factory.mktemp("reliability")
    images = _make_images(base / "images")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DDPMCTL_DATA": str(base / "data"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("DDPMCTL_FAULT", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(_spec(images, STEPS, device="auto"), base / "ref", data_root=base / "data")
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "images": images, "env": env, "ref": base / "ref"}


class Proc:
    """A training process whose stderr goes to a file we can poll."""

    def __init__(self, world, *args: str, fault: str | None = None, tag: str = "p"):
        env = dict(world["env"])
        if fault:
            env["DDPMCTL_FAULT"] = fault
        self.err_path = world["base"] / f"{tag}.stderr"
        self.err = open(self.err_path, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "ddpmctl", *args], env=env, stdout=subprocess.DEVNULL,
                                  stderr=self.err, text=True)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self.err.close()

    def kill(self, sig: int) -> None:
        self.p.send_signal(sig)


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _wait_for(cond, proc: Proc, what: str, timeout: float = 120, poll: float = 0.01) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.p.poll() is not None:
            pytest.fail(f"process exited ({proc.p.returncode}) before {what}:\n{proc.stderr}")
        if time.monotonic() > end:
            proc.kill(signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n{proc.stderr}")
        time.sleep(poll)


def _newest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "NEWEST").read_text().strip()


def _newest_step(run_dir: Path) -> int:
    p = run_dir / "checkpoints" / "NEWEST"
    return int(p.read_text().split("_")[1]) if p.exists() else 0


def _next_checkpoint_step(after: int) -> int:
    return next(s for s in range(after + 1, STEPS) if s % 3 == 0 or s % 4 == 0)


def _records(run_dir: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r.get(k) for k in RECORD_KEYS) for r in recs]


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    for name in ("model", "ema", "optim"):
        ta, tb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert ta.keys() == tb.keys()
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"{name}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def _started(p: Proc, run_dir: Path, after: int = 0) -> int:
    """Wait until the process trains (its start line is out, metrics are truncated) and has logged
    `after` more steps; return the step it started from."""
    _wait_for(lambda: "steps/epoch" in p.stderr, p, "the start line")
    start = int(p.stderr.split("steps/epoch")[0].rsplit("resuming from", 1)[-1].split("(step ")[-1].split(")")[0]) \
        if "resuming from" in p.stderr else 0
    _wait_for(lambda: _logged_step(run_dir) >= start + after, p, f"step {start + after}")
    return start


def test_kill_signal_and_damage_chain_is_bitwise_identical(world, tmp_path):
    """SIGKILL x5 (three at random steps, one mid-write, one between publishing a checkpoint and
    naming it NEWEST), SIGTERM, SIGINT, a double SIGINT, and a truncated, a flipped and a deleted
    file in the newest checkpoint between resumes."""
    rnd = random.Random(1234)
    run_dir = tmp_path / "chain"
    ckdir = run_dir / "checkpoints"
    train = ("train", str(world["images"]), "--out", str(run_dir), *ARGS)
    resume = ("resume", str(run_dir))

    # 1. SIGKILL at a random step of a fresh run
    p = Proc(world, *train, tag="1")
    _started(p, run_dir, after=rnd.randint(2, 6))
    p.kill(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL

    # 2. SIGKILL in the middle of writing a checkpoint: a temporary directory, NEWEST untouched
    c = _next_checkpoint_step(max(_newest_step(run_dir), _logged_step(run_dir)))
    p = Proc(world, *resume, fault=f"write:{c}", tag="2")
    assert p.wait() == -signal.SIGKILL, p.stderr
    assert "taking over the stale lock" in p.stderr
    assert list(ckdir.glob(f".tmp-step_{c:08d}-*"))
    assert not (ckdir / f"step_{c:08d}").exists() and _newest_step(run_dir) < c

    # 3. SIGKILL after the rename into place, before NEWEST names it
    d = _next_checkpoint_step(c)
    p = Proc(world, *resume, fault=f"publish:{d}", tag="3")
    assert p.wait() == -signal.SIGKILL, p.stderr
    assert (ckdir / f"step_{d:08d}").is_dir() and _newest(run_dir) == f"step_{c:08d}"

    # 4. resume from NEWEST, drop the checkpoint it never named; SIGKILL at a random step
    p = Proc(world, *resume, tag="4")
    assert _started(p, run_dir, after=rnd.randint(1, 3)) == c
    p.kill(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert "removed" in p.stderr and f"step_{d:08d}" in p.stderr.split("removed")[1]
    newest = _newest(run_dir)
    f = ckdir / newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated

    # 5. fall back past the truncated one; SIGTERM: finish the step, checkpoint, exit 143, say how to resume
    p = Proc(world, *resume, tag="5")
    _started(p, run_dir, after=2)
    p.kill(signal.SIGTERM)
    assert p.wait() == 143, p.stderr
    assert f"skipping checkpoint {newest}: model.safetensors fails its SHA-256 check" in p.stderr
    term_step = _newest_step(run_dir)
    assert f"SIGTERM at step {term_step}: checkpoint step_{term_step:08d} written; " \
           f"continue with `ddpmctl resume {run_dir}`" in p.stderr

    # 6. the SIGTERM checkpoint is resumable; SIGINT exits 130 the same way
    p = Proc(world, *resume, tag="6")
    assert _started(p, run_dir, after=1) == term_step
    p.kill(signal.SIGINT)
    assert p.wait() == 130, p.stderr
    assert "SIGINT at step" in p.stderr and "continue with `ddpmctl resume" in p.stderr
    newest = _newest(run_dir)
    f = ckdir / newest / "ema.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01  # one flipped bit
    f.write_bytes(bytes(b))

    # 7. fall back past the flipped one; SIGKILL at a random step
    p = Proc(world, *resume, tag="7")
    _started(p, run_dir, after=rnd.randint(1, 3))
    p.kill(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert f"skipping checkpoint {newest}: ema.safetensors fails its SHA-256 check" in p.stderr
    newest = _newest(run_dir)
    (ckdir / newest / "optim.safetensors").unlink()

    # 8. fall back past the one missing a file; a second SIGINT as soon as the first is seen: it stops
    #    at once (or, if the step and checkpoint won the race, the first already did); either way exit
    #    130 and a complete newest checkpoint
    p = Proc(world, *resume, tag="8")
    _started(p, run_dir, after=1)
    p.kill(signal.SIGINT)
    _wait_for(lambda: "finishing the current step" in p.stderr, p, "the first SIGINT", poll=0.001)
    p.kill(signal.SIGINT)
    assert p.wait() == 130, p.stderr
    assert f"skipping checkpoint {newest}: optim.safetensors is missing" in p.stderr
    assert "stopped at once" in p.stderr or "SIGINT at step" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    warnings: list[str] = []
    ck.find_newest(run_dir, on_warning=warnings.append)
    assert not warnings and not (run_dir / ".lock").exists()

    # 9. to the end: bitwise identical to the run that was never interrupted
    p = Proc(world, *resume, tag="9")
    assert p.wait() == 0, p.stderr
    ref, got = world["ref"], run_dir
    final = f"step_{STEPS:08d}"
    _assert_bitwise_equal(ref / "checkpoints" / final, got / "checkpoints" / final)
    assert [m.name for m in ck.milestones(got)] == [m.name for m in ck.milestones(ref)] != []
    for m in ck.milestones(ref):
        ta, tb = load_file(str(m / "ema.safetensors")), load_file(str(ckdir / m.name / "ema.safetensors"))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), m.name
    assert _records(got) == _records(ref)  # loss, grad_norm, lr of every step, each logged once
    assert not list(ckdir.glob(".tmp-*"))
    assert sorted(x.name for x in ckdir.glob("step_*")) == sorted(x.name for x in (ref / "checkpoints").glob("step_*"))


# ---------------------------------------------------------------- in-process tests
def _spec(images: Path, steps: int, *extra: str, **train) -> S.RunSpec:
    return S.resolve("shapes", sets=[*SETS, *extra],
                     overrides={"data": {"source": str(images)},
                                "train": {"max_steps": steps, "batch_size": 4, "checkpoint_every": 3,
                                          "device": "cpu", **train}})


def test_divergence_skips_rolls_back_and_ends_finite(tmp_path, one_thread):
    """One NaN step is skipped; ten in a row (steps 5-14) roll back to the checkpoint before the
    streak with half the learning rate; training then ends at step 40 with finite weights."""
    images = _make_images(tmp_path / "images")
    spec = _spec(images, 40, "optim.warmup_steps=0", "train.rollback_after=10", "train.max_rollbacks=3",
                 "optim.lr_backoff=0.5", "train.sample_every=1000", "train.precision=fp32")
    events: list[dict] = []
    with nan_forward({2, *range(5, 15)}):
        result = run(spec, tmp_path / "run", on_event=events.append)
    assert result.steps == 40 and result.skipped_steps == 11
    assert result.rollbacks == 1 and result.lr_scale == 0.5
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r for r in recs if r.get("event") == "rollback"]
    assert [(r["step"], r["streak_from"]) for r in rollbacks] == [(14, 5)]
    assert all(r["to_step"] < r["streak_from"] - 1 for r in rollbacks)  # weights from before the streak
    assert [r["step"] for r in recs if r.get("skipped")][:1] == [2] and any(e["event"] == "rollback" for e in events)
    assert [r["lr"] for r in recs if "lr" in r][-1] == pytest.approx(spec.optim.lr * 0.5)
    newest = ck.find_newest(tmp_path / "run")
    assert newest.step == 40 and newest.state["rollbacks"] == 1
    for name in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in newest.tensors(name).values())


def test_divergence_without_rollbacks_left_is_an_error_naming_the_step(tmp_path, one_thread):
    images = _make_images(tmp_path / "images")
    spec = _spec(images, 40, "optim.warmup_steps=0", "train.rollback_after=5", "train.max_rollbacks=0",
                 "train.sample_every=1000", "train.precision=fp32")
    with nan_forward("5-"), pytest.raises(NonFiniteError, match=r"5 non-finite steps in a row at step 9\b"):
        run(spec, tmp_path / "run")
    assert ck.find_newest(tmp_path / "run").step == 4  # the last good checkpoint is intact


def test_nonfinite_sample_grid_names_the_training_step(tmp_path, one_thread):
    images = _make_images(tmp_path / "images")
    run_dir = tmp_path / "run"
    run(_spec(images, 2, "train.sample_every=1000"), run_dir)
    c = ck.find_newest(run_dir)
    tensors = {name: c.tensors(name) for name in ck.TENSOR_FILES}
    next(iter(tensors["ema"].values())).fill_(float("inf"))  # EMA weights that sample to NaN
    state = {k: v for k, v in c.state.items() if k not in ("step", "ddpmctl")}
    ck.save_checkpoint(run_dir, 2, tensors, state)
    with pytest.raises(NonFiniteError, match="sample grid at training step 3"):
        run(_spec(images, 3, "train.sample_every=1000"), run_dir, resume=True)


def test_preflight_refuses_a_disk_without_room_for_two_checkpoints(tmp_path, monkeypatch, one_thread):
    images = _make_images(tmp_path / "images")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match="not enough free space.*two checkpoints need"):
        run(_spec(images, 5), tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert not (tmp_path / "run" / ".lock").exists()


def test_run_dir_under_a_file_is_a_usage_error(tmp_path, one_thread):
    images = _make_images(tmp_path / "images")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="a parent of it is a file"):
        run(_spec(images, 1), tmp_path / "file" / "run")


def test_resume_without_any_checkpoint_starts_again(tmp_path, one_thread):
    """A run killed before its first checkpoint: spec.json is there, resume starts from step 0."""
    images = _make_images(tmp_path / "images")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    S.save(_spec(images, 2, "train.sample_every=1000"), run_dir / "spec.json")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # torn by the kill
    events: list[dict] = []
    result = run(S.load(run_dir / "spec.json"), run_dir, resume=True, on_event=events.append)
    assert result.steps == 2
    assert any("no complete checkpoint yet" in e.get("message", "") for e in events)
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---------------------------------------------------------------- the lock and user mistakes (CLI)
def test_second_process_on_a_run_dir_is_refused(world, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(world["ref"], run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ddpmctl.lock import RunLock\n"
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        spec_before = (run_dir / "spec.json").read_text()
        r = cli("resume", str(run_dir), "--max-steps", "50", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "in use by another ddpmctl process" in r.stderr
        assert f"pid={holder.pid}" in r.stderr and "Traceback" not in r.stderr
        assert (run_dir / "spec.json").read_text() == spec_before  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()


def test_user_mistakes_are_messages(tmp_path):
    """Each exits 2 with one `error:` line and no traceback (all run at once, to save time)."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "spec.json").write_text("{not json")
    (tmp_path / "new").mkdir()
    d = S.dump(S.resolve("shapes"))
    d["version"] = S.SPEC_VERSION + 1
    d["train"]["a_field_from_the_future"] = 1
    (tmp_path / "new" / "spec.json").write_text(json.dumps(d))
    (tmp_path / "file").write_text("x")
    cases = {
        "unknown data": (["train", "no-such-dataset", "--max-steps", "1", "--device", "cpu", "--out", "runs/x"],
                         "unknown data source 'no-such-dataset'"),
        "foreign run dir": (["resume", "other"], "not valid JSON"),
        "newer spec": (["resume", "new"], "written by a newer ddpmctl"),
        "out under a file": (["train", "shapes", "--out", "file/run", "--max-steps", "1"], "file is a file"),
        "no such device": (["train", "shapes", "--device", "mps", "--max-steps", "1"], "MPS is not available"),
    }
    if torch.backends.mps.is_available():
        cases["no such device"] = (["train", "shapes", "--device", "cuda", "--max-steps", "1"],
                                   "CUDA is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "ddpmctl", *args], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (name, err)
        assert cases[name][1] in err, (name, err)
        assert "Traceback" not in err and err.count("error:") == 1 and out == "", (name, err)
    assert not (tmp_path / "runs").exists()  # nothing left behind by a run that never started


def test_first_signal_asks_to_stop_second_sigint_stops_at_once():
    from ddpmctl.cli.progress import signals_to
    from ddpmctl.train import StopFlag

    stop = StopFlag()
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_to(stop):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs between bytecodes
                assert stop.signum == signal.SIGTERM  # asked to stop; nothing raised
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
                pytest.fail("a second signal must stop at once")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # exiting: late Ctrl-C is ignored
    finally:
        signal.signal(signal.SIGINT, previous)
