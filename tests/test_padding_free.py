"""Padding-free loss head (lpo_kernels/padding_free.py): on padded input with a mask the
head's GEMM work is 6·N_real·H·V (fast) / 8·N_real·H·V (low_memory, log-probs forward +
backward), counted from the profiler's matmul shapes at ~50% padding; the results equal the
naive fp64 reference and the unchanged (padded) path; padding gets exact zeros."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lpo_kernels import padding_free, reference
from lpo_kernels.fused_linear import (fused_linear_grpo_loss, fused_linear_logprobs,
                                      fused_linear_lpo_group_stats, fused_linear_lpo_loss)

from .utils import assert_close

B, G, T, H, V = 12, 4, 16, 8, 48
_MATRIX_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2),
                    "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}


def _case(seed=0, dtype=torch.float64, holes=True):
    """[B, T] batch with lengths 10-100% of T (about half padding), a hole inside some rows,
    one row with no real token; NaN hidden states at padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T, (B,), generator=g)
    lengths[3] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:
        mask[0, 1] = mask[5, 0] = False
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.2
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = reference.naive_linear_logprobs(hidden, weight, targets, bias=bias)
    old = logp + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)
    hidden = hidden.masked_fill(~mask[..., None], float("nan"))  # padding is never read
    targets = torch.where(mask, targets, torch.full_like(targets, -100))
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype),
                target_ids=targets, mask=mask, group_ids=torch.arange(B) // G,
                rewards=torch.randn(B, generator=g), advantages=torch.randn(B, generator=g),
                old_logp=old.to(dtype), tgw=(0.5 + torch.rand(B, T, generator=g)).to(dtype))


def _leaves(c):
    return [c[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]


def _gemm_flops(run):
    """FLOPs (2·m·k·n) of every matrix product that ``run`` dispatches on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    total = 0
    for event in prof.events():
        if event.name in _MATRIX_OPERANDS:
            i, j = _MATRIX_OPERANDS[event.name]
            a, b = event.input_shapes[i], event.input_shapes[j]
            total += 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1)
    return total


def _lpo(c, leaves, **kw):
    h, w, b = leaves
    return fused_linear_lpo_loss(h, w, c["target_ids"], c["mask"], c["group_ids"], c["rewards"],
                                 bias=b, old_logp=c["old_logp"], backend="torch",
                                 return_logp=True, return_entropy=True, **kw)


def _grpo(c, leaves, **kw):
    h, w, b = leaves
    return fused_linear_grpo_loss(h, w, c["target_ids"], c["mask"], c["advantages"], bias=b,
                                  old_logp=c["old_logp"], backend="torch", return_logp=True, **kw)


def _backward(loss, leaves):
    loss.backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("head,factor,kw", [
    ("lpo", 6, dict(mode="fast", chunk_tokens=40)),
    ("lpo", 8, dict(mode="low_memory", chunk_tokens=40)),
    ("grpo", 6, dict(chunk_tokens=40)),
    ("logprobs", 8, dict(chunk_tokens=40)),
    ("grpo", 8, dict(chunk_tokens=40, top_entropy_quantile=0.5)),  # + the entropy pass
    ("group_stats", 2, dict(chunk_tokens=40)),  # no-grad log-prob pass only
])
def test_gemm_work_follows_the_real_tokens(head, factor, kw):
    c = _case(dtype=torch.float32)
    n_real, n_all = int(c["mask"].sum()), B * T
    assert 0.35 < 1 - n_real / n_all < 0.65  # about half padding

    def run():
        leaves = _leaves(c)
        if head == "group_stats":
            fused_linear_lpo_group_stats(leaves[0], leaves[1], c["target_ids"], c["mask"],
                                         c["group_ids"], c["rewards"], backend="torch", **kw)
            return
        if head == "logprobs":
            logp = fused_linear_logprobs(leaves[0], leaves[1], c["target_ids"], bias=leaves[2],
                                         mask=c["mask"], backend="torch", **kw)
            loss = logp.sum()
        else:
            loss = (_lpo if head == "lpo" else _grpo)(c, leaves, **kw)[0]
        loss.backward()

    assert _gemm_flops(run) == factor * n_real * H * V


@pytest.mark.parametrize("kw", [dict(mode="fast", chunk_tokens=40),
                                dict(mode="low_memory", chunk_tokens=40),
                                dict(mode="fast", chunk_tokens=40, softcap=3.0, token_grad_weights=True),
                                dict(mode="low_memory", chunk_tokens=24, temperature=0.7,
                                     token_grad_weights=True)])
def test_lpo_matches_naive_and_padded_path(kw, monkeypatch):
    c = _case(seed=1)
    if kw.pop("token_grad_weights", False):
        kw["token_grad_weights"] = c["tgw"]
    leaves = _leaves(c)
    loss, stats, out = _lpo(c, leaves, **kw)
    grads = _backward(loss, leaves)
    real = c["mask"]
    for g in (grads[0],):
        assert bool((g[~real] == 0).all()), "padding gradient must be exactly 0"
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((out.logp[~real] == 0).all()) and bool((out.entropy[~real] == 0).all())

    # naive fp64 reference (full logits); NaN padding replaced, since it takes every token
    ref_leaves = _leaves(dict(c, hidden=c["hidden"].nan_to_num(0.0)))
    h, w, b = ref_leaves
    tgw = kw.get("token_grad_weights")
    logp, entropy = reference.naive_linear_logprobs(h, w, c["target_ids"].clamp(min=0), bias=b,
                                                    temperature=kw.get("temperature", 1.0),
                                                    softcap=kw.get("softcap"), return_entropy=True)
    if tgw is not None:  # d loss/d logp scaled by tgw, value unchanged
        logp_for_loss = logp.detach() + (logp - logp.detach()) * tgw
    else:
        logp_for_loss = logp
    from lpo_kernels.functional import lpo_loss
    ref_loss, ref_stats = lpo_loss(logp_for_loss, c["old_logp"], c["mask"], c["group_ids"],
                                   c["rewards"], backend="torch")
    ref_grads = _backward(ref_loss, ref_leaves)
    assert_close(loss, ref_loss, atol=1e-10, rtol=1e-9, name="loss")
    assert_close(out.logp[real], logp[real], atol=1e-10, rtol=1e-9, name="logp")
    assert_close(out.entropy[real], entropy[real], atol=1e-10, rtol=1e-9, name="entropy")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        r = r.masked_fill(~real[..., None], 0.0) if name == "hidden" else r
        assert_close(g, r, atol=1e-10, rtol=1e-9, name=f"grad {name}")
    assert_close(stats.divergence, ref_stats.divergence, atol=1e-10, rtol=1e-9, name="divergence")
    assert_close(stats.n_tokens, ref_stats.n_tokens, atol=0, rtol=0, name="n_tokens")

    # the unchanged (padded) path on finite padding gives the same loss and gradients
    monkeypatch.setattr(padding_free, "compaction", lambda mask, shape: None)
    old_leaves = _leaves(dict(c, hidden=c["hidden"].nan_to_num(0.0)))
    old_loss, _, old_out = _lpo(c, old_leaves, **kw)
    old_grads = _backward(old_loss, old_leaves)
    assert_close(loss, old_loss, atol=1e-12, rtol=1e-10, name="loss vs padded path")
    assert_close(out.logp[real], old_out.logp[real], atol=1e-12, rtol=1e-10, name="logp vs padded")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, old_grads):
        assert_close(g, r, atol=1e-12, rtol=1e-10, name=f"grad {name} vs padded path")


@pytest.mark.parametrize("opts", [
    dict(loss_type="grpo"), dict(loss_type="bnpo"), dict(loss_type="dr_grpo", max_completion_length=T),
    dict(loss_type="dapo", entropy_coef=0.05), dict(loss_type="dapo", top_entropy_quantile=0.5),
    dict(loss_type="grpo", importance_sampling_level="sequence")], ids=str)
def test_grpo_matches_naive(opts):
    from lpo_kernels.grpo import naive_linear_grpo_loss

    c = _case(seed=2)
    leaves = _leaves(c)
    loss, stats, out = _grpo(c, leaves, chunk_tokens=40, return_entropy=True, **opts)
    grads = _backward(loss, leaves)
    real = c["mask"]
    assert bool((grads[0][~real] == 0).all()) and bool((out.logp[~real] == 0).all())
    assert bool((out.entropy[~real] == 0).all())
    ref_leaves = _leaves(dict(c, hidden=c["hidden"].nan_to_num(0.0)))
    ref_loss, _ = naive_linear_grpo_loss(
        ref_leaves[0], ref_leaves[1], c["target_ids"].clamp(min=0), c["mask"], c["advantages"],
        bias=ref_leaves[2], old_logp=c["old_logp"], **opts)
    ref_grads = _backward(ref_loss, ref_leaves)
    assert_close(loss, ref_loss, atol=1e-10, rtol=1e-9, name="loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        r = r.masked_fill(~real[..., None], 0.0) if name == "hidden" else r
        assert_close(g, r, atol=1e-10, rtol=1e-9, name=f"grad {name}")


def test_logprobs_with_mask():
    c = _case(seed=3)
    leaves = _leaves(c)
    logp, entropy = fused_linear_logprobs(leaves[0], leaves[1], c["target_ids"], bias=leaves[2],
                                          mask=c["mask"], return_entropy=True, chunk_tokens=20,
                                          backend="torch")
    upstream = torch.randn(B, T, dtype=torch.float64)
    grads = _backward((logp * upstream).sum(), leaves)
    real = c["mask"]
    assert bool((logp[~real] == 0).all()) and bool((entropy[~real] == 0).all())
    assert bool((grads[0][~real] == 0).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    ref_leaves = _leaves(dict(c, hidden=c["hidden"].nan_to_num(0.0)))
    ref, ref_entropy = reference.naive_linear_logprobs(ref_leaves[0], ref_leaves[1],
                                                       c["target_ids"].clamp(min=0),
                                                       bias=ref_leaves[2], return_entropy=True)
    ref_grads = _backward((ref * upstream * real).sum(), ref_leaves)
    assert_close(logp[real], ref[real], atol=1e-12, rtol=1e-10, name="logp")
    assert_close(entropy[real], ref_entropy[real], atol=1e-12, rtol=1e-10, name="entropy")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(g, r, atol=1e-10, rtol=1e-9, name=f"grad {name}")
    with pytest.raises(ValueError, match="mask"):
        fused_linear_logprobs(leaves[0], leaves[1], c["target_ids"], mask=c["mask"][:, :-1])


def test_fast_chunks_hold_whole_groups_of_the_compacted_layout(monkeypatch):
    """fast mode on the compacted layout still cuts on group boundaries: every chunk's
    GEMM row count is a sum of whole groups' real-token counts."""
    c = _case(seed=4, dtype=torch.float32)
    per_group = c["mask"].sum(1).view(-1, G).sum(1).tolist()
    sizes = []
    from lpo_kernels import fused_linear
    original = fused_linear.chunk_logits

    def chunk_logits(buffer, head, rows, n):
        sizes.append(n)
        return original(buffer, head, rows, n)

    monkeypatch.setattr(fused_linear, "chunk_logits", chunk_logits)
    _lpo(c, _leaves(c), mode="fast", chunk_tokens=30)
    assert len(sizes) > 1
    group = 0
    for size in sizes:  # each chunk: consecutive whole groups, exactly
        total = 0
        while total < size:
            total += per_group[group]
            group += 1
        assert total == size
    assert group == len(per_group)


def test_no_padding_and_unmasked_input_take_the_unchanged_path():
    c = _case(seed=5)
    full = torch.ones(B, T, dtype=torch.bool)
    assert padding_free.compaction(full, (B, T)) is None
    comp = padding_free.compaction(c["mask"], (B, T))
    assert comp.n_real == int(c["mask"].sum())
    assert torch.equal(comp.index, c["mask"].reshape(-1).nonzero().reshape(-1))
    assert comp.cu_seqlens.tolist() == [0] + torch.cumsum(c["mask"].sum(1), 0).tolist()


def test_one_host_read_per_call(monkeypatch):
    """padded + group_size: the row counts are the call's one host read (the fast plan
    reuses their host copy); nothing else is read back (validate=False, as on CUDA)."""
    c = _case(seed=6)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    for mode in ("fast", "low_memory"):
        reads.clear()
        h, w, b = _leaves(c)
        loss, _ = fused_linear_lpo_loss(h, w, c["target_ids"], c["mask"], None, c["rewards"],
                                        group_size=G, bias=b, backend="torch", validate=False,
                                        mode=mode, chunk_tokens=40)
        assert reads == ["tolist"], (mode, reads)


def test_group_stats_pass_skips_padding(monkeypatch):
    """The no-grad pre-pass of split groups: the padding-free pass (NaN padding) gives the
    records of the unchanged padded pass (finite padding)."""
    c = _case(seed=7)
    kw = dict(old_logp=c["old_logp"], backend="torch", chunk_tokens=24)
    got = fused_linear_lpo_group_stats(c["hidden"], c["weight"], c["target_ids"], c["mask"],
                                       c["group_ids"], c["rewards"], **kw)
    monkeypatch.setattr(padding_free, "compaction", lambda mask, shape: None)
    want = fused_linear_lpo_group_stats(c["hidden"].nan_to_num(0.0), c["weight"],
                                        c["target_ids"].clamp(min=0), c["mask"], c["group_ids"],
                                        c["rewards"], **kw)
    compared = 0
    for field, a in vars(got).items():
        if isinstance(a, torch.Tensor):
            assert_close(a, getattr(want, field), atol=1e-12, rtol=1e-10, name=field)
            compared += 1
    assert compared >= 3


def test_every_token_masked():
    """N_real = 0: zero loss and log-probs, finite zero gradients, no GEMM over padding."""
    c = _case(seed=8)
    c["mask"] = torch.zeros(B, T, dtype=torch.bool)
    runs = {
        "fast": lambda l: _lpo(c, l, mode="fast")[0],
        "low_memory": lambda l: _lpo(c, l, mode="low_memory")[0],
        "grpo": lambda l: _grpo(c, l)[0],
        "logprobs": lambda l: fused_linear_logprobs(l[0], l[1], c["target_ids"], bias=l[2],
                                                    mask=c["mask"], backend="torch").sum(),
    }
    for name, run in runs.items():
        leaves = _leaves(c)
        flops = _gemm_flops(lambda: run(leaves).backward())
        assert flops == 0, name
        for g in (leaves[0].grad, leaves[1].grad):
            assert g is not None and bool((g == 0).all()), name
