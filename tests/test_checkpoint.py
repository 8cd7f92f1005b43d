import json

import pytest
import torch

from ddpmctl import checkpoint as ck
from ddpmctl.errors import CheckpointError, RunDirError

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


def _tensors(v: float):
    return {"model": {"w": torch.full((4, 4), v)}, "ema": {"w": torch.full((4, 4), v / 2)},
            "optim": {"0.exp_avg": torch.zeros(4)}, "rng": {"cpu": torch.get_rng_state()}}


def test_save_then_find_newest(tmp_path):
    ck.save_checkpoint(tmp_path, 10, _tensors(1.0), {"epoch": 1})
    ck.save_checkpoint(tmp_path, 20, _tensors(2.0), {"epoch": 2})
    c = ck.find_newest(tmp_path)
    assert c.step == 20 and c.state["epoch"] == 2
    assert torch.equal(c.tensors("model")["w"], torch.full((4, 4), 2.0))
    assert (tmp_path / "checkpoints" / "NEWEST").read_text().strip() == "step_00000020"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_last_prunes_older(tmp_path):
    for s in range(1, 6):
        ck.save_checkpoint(tmp_path, s, _tensors(float(s)), {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_newest_falls_back(tmp_path, damage):
    ck.save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    newest = ck.save_checkpoint(tmp_path, 2, _tensors(2.0), {})
    f = newest / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-3] ^= 0xFF
        f.write_bytes(bytes(b))
    else:
        f.unlink()
    warnings = []
    c = ck.find_newest(tmp_path, on_warning=warnings.append)
    assert c.step == 1
    assert warnings and "step_00000002" in warnings[0]


def test_crash_before_publish_leaves_previous_newest(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _tensors(1.0), {})

    def boom(tmpdir):
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        ck.save_checkpoint(tmp_path, 2, _tensors(2.0), {}, before_publish=boom)
    assert ck.find_newest(tmp_path).step == 1
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_no_valid_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        ck.find_newest(tmp_path)


def test_optimizer_round_trip_through_tensors():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    tensors, meta = ck.optimizer_to_tensors(opt)
    json.dumps(meta)  # JSON-able
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([p2], lr=1.0)
    ck.optimizer_from_tensors(opt2, tensors, meta)
    assert opt2.param_groups[0]["lr"] == 1e-3
    assert torch.equal(opt2.state[p2]["exp_avg"], opt.state[p]["exp_avg"])


def test_run_dir_checks(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        ck.check_run_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        ck.check_run_dir(tmp_path / "f")
    with pytest.raises(RunDirError, match="not a ddpmctl run directory"):
        ck.check_run_dir(tmp_path)
    with pytest.raises(RunDirError, match="no run directories"):
        ck.newest_run(tmp_path / "runs")


def test_optimizer_moments_take_the_parameter_layout():
    """channels_last weights (CUDA training): the moments come back channels_last, as fused AdamW needs."""
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3, fused=True)
    conv(torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    tensors, meta = ck.optimizer_to_tensors(opt)
    opt2 = torch.optim.AdamW(conv.parameters(), lr=1e-3, fused=True)
    ck.optimizer_from_tensors(opt2, tensors, meta)
    m = opt2.state[conv.weight]["exp_avg"]
    assert m.stride() == conv.weight.stride() and torch.equal(m, opt.state[conv.weight]["exp_avg"])
    conv(torch.randn(2, 4, 5, 5)).sum().backward()
    opt2.step()


def test_newest_pointer_is_tried_first_and_must_name_a_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _tensors(1.0), {})
    ck.save_checkpoint(tmp_path, 2, _tensors(2.0), {})
    (tmp_path / "checkpoints" / "NEWEST").write_text("step_00000001\n")
    assert ck.find_newest(tmp_path).step == 1  # a later one never named NEWEST is not preferred
    (tmp_path / "checkpoints" / "NEWEST").write_text("../../etc\n")
    assert ck.find_newest(tmp_path).step == 2  # a pointer that names no checkpoint is ignored
    assert ck.find_newest(tmp_path, before_step=2).step == 1
    with pytest.raises(CheckpointError, match="no valid checkpoint before step 1"):
        ck.find_newest(tmp_path, before_step=1)


def test_discard_after_makes_a_checkpoint_the_newest(tmp_path):
    for s in (3, 6, 9):
        ck.save_checkpoint(tmp_path, s, _tensors(float(s)), {}, keep_last=5)
    ck.save_milestone(tmp_path, 1, 4, {"w": torch.ones(2)}, {})
    ck.save_milestone(tmp_path, 2, 8, {"w": torch.ones(2)}, {})
    removed = ck.discard_after(tmp_path, ck.find_newest(tmp_path, before_step=7))
    assert sorted(removed) == ["epoch_0002", "step_00000009"]
    assert ck.find_newest(tmp_path).step == 6
    assert [m.name for m in ck.milestones(tmp_path)] == ["epoch_0001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_milestones_are_never_pruned(tmp_path):
    for s in range(1, 5):
        if s % 2 == 0:
            ck.save_milestone(tmp_path, s // 2, s, {"w": torch.full((2,), float(s))}, {"ema_updates": s})
        ck.save_checkpoint(tmp_path, s, _tensors(float(s)), {}, keep_last=1)
    assert [m.name for m in ck.milestones(tmp_path)] == ["epoch_0001", "epoch_0002"]
    assert ck.verify(ck.milestones(tmp_path)[1], required=("ema",))["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004"]


def test_a_failed_write_is_a_checkpoint_error_naming_the_intact_one(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, _tensors(1.0), {})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*still step_00000001"):
        ck.save_checkpoint(tmp_path, 2, _tensors(2.0), {})
    assert ck.find_newest(tmp_path).step == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_replacing_the_same_step_leaves_no_partial_directory(tmp_path):
    ck.save_checkpoint(tmp_path, 5, _tensors(1.0), {})
    ck.save_checkpoint(tmp_path, 5, _tensors(2.0), {})
    c = ck.find_newest(tmp_path)
    assert c.step == 5 and torch.equal(c.tensors("model")["w"], torch.full((4, 4), 2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["NEWEST", "step_00000005"]
