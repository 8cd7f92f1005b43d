"""optim.name / optim.momentum / optim.warm_start_steps: SGD-momentum, and the SGD warm start into AdamW."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmctl import checkpoint as ck
from ddpmctl import spec as S
from ddpmctl.errors import SpecError
from ddpmctl.images import save_png
from ddpmctl.train import Interrupted, StopFlag, run

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)

TINY = ["model.image_size=8", "model.channel_mult=1,2", "model.attention_resolutions=[4]",
        "model.base_channels=16", "model.num_res_blocks=1", "model.groups=8", "model.head_channels=16",
        "model.time_embed_dim=32", "sample.grid_size=2", "sample.steps=2", "train.sample_every=1000",
        "train.log_every=1", "diffusion.timesteps=100", "train.keep_last=100", "optim.warmup_steps=0"]
SWITCH = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("optim") / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        save_png(folder / f"{i:02d}.png", (torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8))
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spec(images: Path, steps: int, *extra: str) -> S.RunSpec:
    return S.resolve("shapes", sets=[*TINY, *extra], overrides={"data": {"source": str(images)}, "train": {
        "max_steps": steps, "batch_size": 4, "checkpoint_every": 1, "device": "cpu"}})


def _state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / ck.checkpoint_name(step) / "state.json").read_text())


def _optim(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / ck.checkpoint_name(step) / "optim.safetensors")


def test_sgd_with_momentum_trains(images, tmp_path):
    spec = _spec(images, 4, "optim.name=sgd", "optim.momentum=0.95", "optim.lr=0.05")
    res = run(spec, tmp_path / "run")
    assert res.steps == 4 and res.final_loss is not None and res.final_loss == res.final_loss
    st = _state(tmp_path / "run", 4)
    assert st["optimizer_name"] == "sgd" and st["optimizer"]["param_groups"][0]["momentum"] == 0.95
    assert any(k.endswith(".momentum_buffer") for k in _optim(tmp_path / "run", 4))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_warm_start_switches_to_a_fresh_adamw_at_the_step_said(images, tmp_path):
    events: list[dict] = []
    run(_spec(images, 5, f"optim.warm_start_steps={SWITCH}"), tmp_path / "run", on_event=events.append)
    switches = [e for e in events if e["event"] == "optimizer"]
    assert [(e["step"], e["name"]) for e in switches] == [(SWITCH, "adamw")]
    names = [_state(tmp_path / "run", s)["optimizer_name"] for s in range(1, 6)]
    assert names == ["sgd"] * SWITCH + ["adamw"] * (5 - SWITCH)
    before, after = _optim(tmp_path / "run", SWITCH), _optim(tmp_path / "run", SWITCH + 1)
    assert any(k.endswith(".momentum_buffer") for k in before) and not any(k.endswith(".exp_avg") for k in before)
    assert not any(k.endswith(".momentum_buffer") for k in after)
    steps = {float(v) for k, v in after.items() if k.endswith(".step")}
    assert steps == {1.0}  # AdamW's state began at the switch: one step taken, not SWITCH + 1


def test_run_killed_after_the_switch_resumes_bitwise(images, tmp_path):
    """Stopped (SIGTERM path) right at the switch (its checkpoint holds SGD state, the next step is
    AdamW's) and again after it, resumed each time: the final model, EMA and optimizer are bitwise
    those of an uninterrupted run."""
    spec = _spec(images, 6, f"optim.warm_start_steps={SWITCH}")
    run(spec, tmp_path / "ref")
    chain = tmp_path / "chain"
    for stop_at, resume in ((SWITCH, False), (SWITCH + 2, True)):
        stop = StopFlag()

        def on_event(e, at=stop_at, stop=stop):
            if e["event"] == "tick" and e["step"] == at:
                stop.request(signal.SIGTERM)

        with pytest.raises(Interrupted):
            run(spec, chain, resume=resume, on_event=on_event, stop=stop)
        assert ck.find_newest(chain).step == stop_at
    run(spec, chain, resume=True)
    for name in ("model", "ema", "optim"):
        a, b = _final(tmp_path / "ref", name), _final(chain, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _final(run_dir: Path, name: str) -> dict:
    return load_file(run_dir / "checkpoints" / ck.checkpoint_name(6) / f"{name}.safetensors")


def test_checkpoints_without_an_optimizer_name_resume_as_adamw(images, tmp_path):
    """Checkpoints from before optim.name have no optimizer_name in state.json: they were AdamW."""
    run(_spec(images, 2), tmp_path / "run")
    d = tmp_path / "run" / "checkpoints" / ck.checkpoint_name(2)
    st = json.loads((d / "state.json").read_text())
    del st["optimizer_name"]
    (d / "state.json").write_text(json.dumps(st, indent=1))
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["state.json"] = ck.sha256_file(d / "state.json")
    (d / "manifest.json").write_text(json.dumps(man, indent=1))
    assert run(_spec(images, 3), tmp_path / "run", resume=True).steps == 3
    assert _state(tmp_path / "run", 3)["optimizer_name"] == "adamw"


def test_warm_start_needs_adamw():
    with pytest.raises(SpecError, match=r"optim: .*warm_start_steps .* needs name = adamw"):
        S.resolve("shapes", sets=["optim.name=sgd", "optim.warm_start_steps=10"])
    with pytest.raises(SpecError, match=r"optim.name: .*'adamw' or 'sgd'"):
        S.resolve("shapes", sets=["optim.name=lion"])
