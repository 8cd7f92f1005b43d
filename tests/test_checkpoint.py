import json

import pytest
import torch

from ddpmctl import checkpoint as ck
from ddpmctl.errors import CheckpointError, RunDirError


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
