"""``token_grad_weights`` of the fused LPO head: each token's d loss / d logp times its weight
(importance weights of a sampler), loss value and stats unchanged; against the naive head with
the weighted token gradient back-propagated through full logits (fp64)."""

from __future__ import annotations

import pytest
import torch

from lpo_kernels import lpo_loss, reference
from lpo_kernels.fused_linear import fused_linear_lpo_loss

from .test_fused_linear import leaves, make_head_case
from .utils import assert_close


@pytest.mark.parametrize("mode", ["fast", "low_memory"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_weighted_token_gradients_match_naive(mode, per_sequence):
    case = make_head_case(dtype=torch.float64, bias=True, shuffle=True)
    g = torch.Generator().manual_seed(4)
    shape = case["target_ids"].shape
    weights = torch.rand(shape[0], 1 if per_sequence else shape[1], generator=g, dtype=torch.float64) * 2
    weights[1] = 0.0
    targets = case["target_ids"].clamp(min=0)
    ref = leaves(case)
    logp = reference.naive_linear_logprobs(ref["hidden"], ref["weight"], targets, bias=ref["bias"], temperature=0.9)
    leaf = logp.detach().requires_grad_()
    expected, expected_stats = lpo_loss(leaf, case["old_logp"], case["mask"], case["group_ids"], case["rewards"],
                                        clip="ppo")
    (grad_logp,) = torch.autograd.grad(expected, leaf)
    logp.backward(grad_logp * weights)
    p = leaves(case)
    loss, stats = fused_linear_lpo_loss(p["hidden"], p["weight"], case["target_ids"], case["mask"], case["group_ids"],
                                        case["rewards"], bias=p["bias"], temperature=0.9, old_logp=case["old_logp"],
                                        mode=mode, chunk_tokens=8, clip="ppo", token_grad_weights=weights)
    loss.backward()
    assert_close(loss, expected, atol=1e-12, rtol=1e-10, name="loss")
    assert_close(stats.divergence, expected_stats.divergence, atol=1e-12, rtol=1e-10, name="stats")
    for name in ("hidden", "weight", "bias"):
        assert float(ref[name].grad.abs().max()) > 0
        assert_close(p[name].grad, ref[name].grad, atol=1e-10 * float(ref[name].grad.abs().max()), rtol=1e-9,
                     name=f"grad {name}")


def test_bad_token_grad_weights_raise():
    case = make_head_case(dtype=torch.float32)
    args = (case["hidden"], case["weight"], case["target_ids"], case["mask"], case["group_ids"], case["rewards"])
    with pytest.raises(ValueError, match="token_grad_weights"):
        fused_linear_lpo_loss(*args, token_grad_weights=torch.ones(3, 2))
    with pytest.raises(TypeError, match="token_grad_weights"):
        fused_linear_lpo_loss(*args, token_grad_weights=torch.ones(case["mask"].shape, dtype=torch.long))
