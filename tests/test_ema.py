"""ddpmctl.ema: the moving average of the weights."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.numerics  # run again with the AVX2 cap in .ci/run (issue 18)


def test_ema_update_is_the_moving_average_and_holds_still_on_a_skipped_step():
    from ddpmctl.ema import EMA, ema_decay_at

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7, affine=True))
    ema = EMA(net, decay=0.9, warmup=True)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net, weight_scale=torch.tensor(0.0))  # a skipped step: the EMA does not move at all
    assert all(torch.equal(ema.shadow[k], before[k]) for k in before)
    for scale in (torch.tensor(1.0), None):
        d = ema_decay_at(ema.num_updates, 0.9, True)
        want = {n: before[n].double() + (1 - d) * (p.detach().double() - before[n].double())
                for n, p in net.named_parameters()}
        ema.update(net, weight_scale=scale)
        for n in want:
            torch.testing.assert_close(ema.shadow[n].double(), want[n], rtol=0, atol=1e-6)
        before = {k: v.clone() for k, v in ema.shadow.items()}
    assert ema.num_updates == 3
