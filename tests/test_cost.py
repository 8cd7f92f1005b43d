"""Runs that know their cost: --time-limit, the wall-time estimate, progress lines on a pipe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main, make_images as _images
from ddpmctl import checkpoint as ck
from ddpmctl import spec as S
from ddpmctl.durations import human_duration, parse_duration, short_duration
from ddpmctl.errors import UsageError
from ddpmctl.train import run

TINY = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=16", "model.num_res_blocks=1", "model.groups=8", "model.head_channels=16",
        "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2", "train.sample_every=1000",
        "train.log_every=1000", "diffusion.timesteps=100"]
TINY_ARGS = [a for s in TINY for a in ("--set", s)]


# ---------------------------------------------------------------- durations
@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                          ("1h30m", 5400), ("1.5h", 5400), ("45", 45), (" 2H ", 7200)])
def test_parse_duration_accepts_the_usual_forms(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(short_duration(seconds)) == seconds  # the hint printed at a stop reads back


@pytest.mark.parametrize("text", ["", "3x", "h", "-5m", "0", "10 minutes", "1h 2", "nan", "inf"])
def test_parse_duration_refuses_the_rest_naming_what_works(text):
    with pytest.raises(UsageError, match=r"--time-limit: .*30m, 2h, 1d"):
        parse_duration(text, "--time-limit")


def test_human_duration_gives_two_units():
    assert human_duration(37200) == "10 h 20 min" and human_duration(200000) == "2 d 8 h"
    assert human_duration(45) == "45 s"


# ---------------------------------------------------------------- --time-limit
def _spec(images: Path, steps: int, **train) -> S.RunSpec:
    return S.resolve("shapes", sets=TINY, overrides={"data": {"source": str(images)}, "train": {
        "max_steps": steps, "batch_size": 4, "checkpoint_every": 100, "device": "cpu", **train}})


def test_time_limit_stops_at_a_step_with_a_checkpoint_and_chunks_resume_bitwise(tmp_path, one_thread):
    """A limit already past stops after one step, with a checkpoint of it; chunks of one step each
    and a last unlimited resume end bitwise where an uninterrupted run ends."""
    images = _images(tmp_path / "images")
    run(_spec(images, 5), tmp_path / "ref")
    chunked = tmp_path / "chunked"
    first = run(_spec(images, 5, time_limit=1e-9), chunked)
    assert (first.stopped, first.steps, first.total_steps) == ("time_limit", 1, 5)
    assert ck.find_newest(chunked).step == 1 and first.checkpoint.endswith("step_00000001")
    second = run(_spec(images, 5, time_limit=1e-9), chunked, resume=True)
    assert (second.stopped, second.steps) == ("time_limit", 2)
    last = run(_spec(images, 5), chunked, resume=True)
    assert (last.stopped, last.steps) == (None, 5)
    for name in ("model", "ema", "optim"):
        a = load_file(tmp_path / "ref" / "checkpoints" / "step_00000005" / f"{name}.safetensors")
        b = load_file(chunked / "checkpoints" / "step_00000005" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_time_limit_cli_exits_0_says_how_to_continue_and_resume_clears_it(tmp_path, monkeypatch, capsys):
    images = _images(tmp_path / "images")
    args = ["train", str(images), "--preset", "shapes", "--batch-size", "4", "--max-steps", "3", "--device", "cpu",
            "--out", "runs/t", *TINY_ARGS]
    # the limit counts this process's wall time: in the test process 1s is long past
    code, out, err = run_main(monkeypatch, capsys, *args, "--time-limit", "1s", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["stopped"] == "time_limit" and res["steps"] == 1 and res["total_steps"] == 3
    assert "time limit 1s reached at step 1 of 3" in err
    assert "continue with `ddpmctl resume runs/t --time-limit 1s`" in err
    assert S.load(tmp_path / "runs/t/spec.json").train.time_limit == 1.0
    code, out, err = run_main(monkeypatch, capsys, "resume", "runs/t", "--time-limit", "off", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 3 and json.loads(out)["stopped"] is None
    assert S.load(tmp_path / "runs/t/spec.json").train.time_limit is None


@pytest.mark.parametrize("args,needle", [
    (["--time-limit", "3x"], "--time-limit: expected a duration such as 90s, 30m, 2h, 1d"),
    (["--time-limit", "0"], "--time-limit: must be a positive duration"),
    (["--set", "train.time_limit=soon"], "train.time_limit: expected a duration such as 90s"),
])
def test_bad_time_limit_is_a_usage_error(monkeypatch, capsys, tmp_path, args, needle):
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", *args)
    assert code == 2 and needle in err and out == ""
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- the estimate
def test_dry_run_estimates_the_wall_time_from_timed_steps(monkeypatch, capsys, one_thread):
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--json", "--device", "cpu",
                              "--max-steps", "1000", "--batch-size", "4", *TINY_ARGS)
    assert code == 0, err
    est = json.loads(out)["estimate"]
    assert est["steps"] == 1000 and 1 <= est["timed_steps"] <= 3 and est["batch"] == 4
    assert est["step_seconds"] > 0 and est["seconds"] == pytest.approx(1000 * est["step_seconds"])
    assert "timed step" in est["method"]


def test_dry_run_of_a_multi_day_run_says_what_would_shorten_it(monkeypatch, capsys, one_thread):
    code, out, err = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--device", "cpu",
                              "--max-steps", "100000000", "--batch-size", "4", *TINY_ARGS)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("estimated wall time"))
    assert re.search(r"~\d+ d( \d+ h)? for 100,000,000 steps \(from [1-3] timed steps? on this device", line)
    assert "longer than a day" in line
    assert all(w in line for w in ("--preset shapes", "--max-steps", "--time-limit", "a GPU"))


def test_tiny_or_unsized_runs_are_not_timed(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "train", "shapes", "--dry-run", "--json", "--max-steps", "10")
    rep = json.loads(out)
    assert code == 0 and rep["estimate"] is None and "10 steps" in rep["estimate_skipped"]
    code, out, _ = run_main(monkeypatch, capsys, "train", "mnist", "--dry-run", "--json")  # not prepared
    rep = json.loads(out)
    assert code == 0 and rep["estimate"] is None and "ddpmctl download mnist" in rep["estimate_skipped"]


# ---------------------------------------------------------------- progress on a pipe
def _ddpmctl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpmctl", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def test_train_and_sample_print_progress_lines_on_a_pipe_and_quiet_silences_them(tmp_path, monkeypatch, capsys):
    images = _images(tmp_path / "images")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DDPMCTL_PROGRESS_INTERVAL": "0.05"}
    r = _ddpmctl("train", str(images), "--preset", "shapes", "--batch-size", "4", "--max-steps", "51",
                 "--device", "cpu", "--out", "runs/p", *TINY_ARGS, env=env)  # log_every 1000: no log line
    assert r.returncode == 0, r.stderr
    assert re.search(r"estimated wall time ~.* for 51 steps \(from [1-3] timed steps? on this device", r.stderr)
    lines = re.findall(r"^training: (\d+)/51 steps · [\d.,]+ img/s(?: · ~.* left \(estimate\))?", r.stderr, re.M)
    assert len(lines) >= 2 and any("left (estimate)" in x for x in r.stderr.splitlines() if x.startswith("training"))
    steps = [int(s) for s in lines]
    assert steps == sorted(steps)

    r = _ddpmctl("sample", "runs/p", "--n", "4", "--batch-size", "2", "--sampler", "ddim", "--steps", "10",
                 "--out", "s", env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^sampling: \d+/4 images · [\d.]+ images/s", r.stderr, re.M), r.stderr

    monkeypatch.setenv("DDPMCTL_PROGRESS_INTERVAL", "0.001")
    code, _, err = run_main(monkeypatch, capsys, "resume", "runs/p", "--max-steps", "60", "--quiet")
    assert code == 0, err
    assert "training:" not in err and "done: 60 steps" in err


def test_progress_view_heartbeat_covers_stages_without_counts(monkeypatch, capfd):
    """Data/eval stages and count-less phases (export) get heartbeat lines too; --quiet none."""
    from ddpmctl.cli.progress import ProgressView

    monkeypatch.setenv("DDPMCTL_PROGRESS_INTERVAL", "0.01")
    with ProgressView() as view:
        view({"event": "progress", "stage": "bits/dim", "done": 3, "total": 10, "unit": "images", "final": False})
        with view.phase("export"):
            err, deadline = "", time.monotonic() + 30
            while time.monotonic() < deadline:  # until the heartbeat has spoken (not a timing assertion)
                err += capfd.readouterr().err
                if "export: working" in err:
                    break
                time.sleep(0.02)
    assert "export: working" in err and "bits/dim: 3/10 images" in err
    capfd.readouterr()  # a last beat may land between the loop's read and the thread's stop
    with ProgressView(quiet=True) as view, view.phase("export"):
        time.sleep(0.1)
    assert capfd.readouterr().err == ""


def test_progress_rate_and_eta_are_smoothed_over_minutes_not_the_last_window(monkeypatch):
    """A run that alternates 5 s at 30 steps/s with 10 s of no progress (sample grids, checkpoints) has a
    last-window rate that swings between 30 and 2.7 steps/s; the rate shown, and the time left computed
    from it, stay within 15 % of the true 10 steps/s once the start has faded, and are called an estimate."""
    from ddpmctl.cli import progress as P

    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    m = P.Meter("training", 1_000_000, "steps")
    done, last, windows, rates = 0, (0.0, 0), [], []
    for second in range(1, 1200):
        clock[0] = float(second)
        if second % 15 in range(1, 6):  # 5 s of work, then 10 s without progress
            done += 30
            m.update(done)
            windows.append((done - last[1]) / (second - last[0]))
            last = (second, done)
            if second > 4 * P.RATE_TAU_S:  # the first minutes' burst has faded
                rates.append(m.rate)
                left = (1_000_000 - done) / m.rate
                assert f"~{P.human_duration(left)} left (estimate)" in m.line()
    assert max(windows) / min(windows) > 10  # what a last-window rate would have shown
    assert rates and all(8.5 <= r <= 11.5 for r in rates), (min(rates), max(rates))


def test_an_hour_long_cpu_estimate_names_the_cpu_presets():
    from ddpmctl.cli.progress import describe_estimate

    est = {"seconds": 3 * 3600, "steps": 3100, "method": "2 timed steps"}
    assert "--preset mnist-small" in describe_estimate(est, "cpu") and "--preset shapes" in describe_estimate(est, "mps")
    assert "mnist-small" not in describe_estimate(est, "cuda")
    assert "mnist-small" not in describe_estimate({**est, "seconds": 1800}, "cpu")
