"""benchmarks/host_time.py (listwise host time with stubbed launches) and the host-time
caches it measures: they must not change what a call checks or returns."""

import pytest
import torch

from benchmarks import host_time
from lpo_kernels import lpo_loss
from lpo_kernels.ops import listwise


def test_host_time_smoke_counts_the_launches():
    us, launches = host_time.measure("8x8x32 group_size", calls=5)
    assert us > 0 and launches == ["_listwise_groups_kernel", "_finalize_kernel"]
    _, launches = host_time.measure("8x8x32 group_ids", calls=5)
    assert len(launches) == 4 and launches[-1] == "_finalize_kernel"
    assert "run" not in vars(listwise._finalize_kernel)  # stubs removed


def test_cached_options_still_check_every_call():
    logp = torch.randn(4, 3)
    ids, rewards = torch.tensor([0, 0, 1, 1]), torch.randn(4)
    loss1, _ = lpo_loss(logp, None, None, ids, rewards, alpha=0.5, divergence="alpha", backend="torch")
    with pytest.raises((TypeError, ValueError), match="alpha"):
        lpo_loss(logp, None, None, ids, rewards, alpha=True, divergence="alpha", backend="torch")
    with pytest.raises((TypeError, ValueError), match="alpha"):
        lpo_loss(logp, None, None, ids, rewards, alpha=[0.5], divergence="alpha", backend="torch")
    loss2, _ = lpo_loss(logp, None, None, ids, rewards, alpha=0.5, divergence="alpha", backend="torch")
    assert torch.equal(loss1, loss2)
