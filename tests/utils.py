"""Shared test helpers: random listwise cases and a verbose closeness check."""

from __future__ import annotations

import torch


def assert_close(actual, expected, *, atol: float, rtol: float, name: str = "tensor"):
    """|actual - expected| <= atol + rtol |expected| elementwise, NaN/inf must agree;
    on failure print the worst elements (Liger's assert_verbose_allclose)."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), f"{name}: inf pattern differs"
    finite = torch.isfinite(expected)
    err = (actual - expected).abs()
    bad = (err > atol + rtol * expected.abs()) & finite
    if bad.any():
        worst = torch.argsort(err.masked_fill(~finite, 0).flatten(), descending=True)[:5]
        rows = "\n".join(
            f"  at {tuple(torch.unravel_index(torch.tensor(i), actual.shape)) if actual.dim() else ()}: "
            f"actual={actual.flatten()[i].item():.8g} expected={expected.flatten()[i].item():.8g}"
            for i in worst.tolist())
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ "
                             f"(atol={atol}, rtol={rtol}, max err={err[finite].max().item():.3g}):\n{rows}")


def make_listwise_case(*, n_groups=3, group_sizes=None, max_len=7, packed=False,
                       empty_prob=0.0, shuffle=False, sparse_ids=False, score_scale=0.3,
                       dtype=torch.float32, device="cpu", seed=0, target="grpo",
                       binary_rewards=False):
    """Random inputs for ``lpo_loss`` as a kwargs dict (logp requires grad).

    ``group_sizes``: list of K per group (default 4 each). ``empty_prob``: chance a response
    has no counted tokens. ``shuffle``: rows in random order. ``sparse_ids``: group ids are
    large, non-consecutive integers. Never zeros: log-probs, old log-probs and rewards are
    drawn at random."""
    g = torch.Generator().manual_seed(seed)
    sizes = list(group_sizes) if group_sizes is not None else [4] * n_groups
    ids = torch.cat([torch.full((k,), i, dtype=torch.long) for i, k in enumerate(sizes)])
    if sparse_ids:
        ids = ids * 7919 + 1000003
    n = ids.numel()
    if shuffle:
        perm = torch.randperm(n, generator=g)
        ids = ids[perm]
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    lengths = torch.where(torch.rand(n, generator=g) < empty_prob, torch.zeros_like(lengths), lengths)
    if binary_rewards:
        values = (torch.rand(n, generator=g) < 0.4).to(torch.float64)
    else:
        values = torch.randn(n, generator=g, dtype=torch.float64)
    case = dict(group_ids=ids.to(device))
    if target == "advantages":
        case["advantages"] = values.to(dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)
    else:
        case["rewards"] = values.to(dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)
    if packed:
        total = int(lengths.sum())
        logp = -torch.rand(total, generator=g, dtype=torch.float64) * 3
        old = logp + score_scale * torch.randn(total, generator=g, dtype=torch.float64)
        cu = torch.zeros(n + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        case.update(mask=None, cu_seqlens=cu.to(device))
    else:
        T = max(max_len, 1)
        logp = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
        old = logp + score_scale * torch.randn(n, T, generator=g, dtype=torch.float64)
        mask = (torch.arange(T)[None, :] < lengths[:, None])
        case.update(mask=mask.to(device))
    case["logp"] = logp.to(dtype=dtype, device=device).requires_grad_()
    case["old_logp"] = old.to(dtype=dtype, device=device)
    return case


def call_lpo(case: dict, **options):
    """Call lpo_loss with a case from make_listwise_case; returns (loss, stats, grad)."""
    from lpo_kernels import lpo_loss

    case = dict(case)
    logp = case.pop("logp").detach().clone().requires_grad_()
    old, mask, ids = case.pop("old_logp"), case.pop("mask"), case.pop("group_ids")
    loss, stats = lpo_loss(logp, old, mask, ids, **case, **options)
    grad_out = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1)).to(loss.device) \
        if loss.dim() else torch.ones((), dtype=loss.dtype, device=loss.device)
    (loss * grad_out).sum().backward()
    return loss.detach(), stats, logp.grad
