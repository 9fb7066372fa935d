"""The two-pass head's gradient pass by vocabulary blocks (``lpo_kernels/vocab_blocks.py``)
and the grad-weight accumulation defaults (issue 14, item 3).

- ``vocab_blocked_grads`` equals autograd through the dense fp64 log-softmax in every
  block layout: one block, many blocks, blocks x token pieces; with bias, temperature,
  soft-cap, fp16 storage scale, out-of-vocabulary targets and NaN hidden states at tokens
  without gradient.
- bf16: grad-weight rounded once (error vs fp64 no worse than plain PyTorch's single
  GEMM); ``grad_weight_fp32`` cannot change low_memory's result.
- Memory (CPU profiler): low_memory and ``fast`` with "auto" at <= 2 chunks allocate no
  fp32 V x H accumulator; the peak stays near grads + tile + the fp32 grad-hidden.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lpo_kernels import fused_linear, head_chunk, reference, vocab_blocks
from lpo_kernels.fused_linear import fused_linear_logprobs, fused_linear_lpo_loss
from lpo_kernels.fused_grpo import fused_linear_grpo_loss
from lpo_kernels.ops import scale as scale_op
from lpo_kernels.ops.loss_head import logits_grad_inplace_torch

from .test_fused_linear import fused_loss, make_head_case, naive_loss
from .utils import assert_close


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("n,vocab,tile", [(100, 1000, 100_000), (100, 151_936, 1024 * 151_936),
                                          (16_384, 151_936, 1024 * 151_936), (10**6, 151_936, 1024 * 151_936),
                                          (1, 5, 5), (0, 7, 70)])
def test_block_sizes_fit_the_tile(n, vocab, tile):
    rows, piece = vocab_blocks.block_sizes(n, vocab, tile)
    assert 1 <= rows <= vocab and 1 <= piece <= max(n, 1)
    assert rows * piece <= max(tile, vocab_blocks.MIN_BLOCK_ROWS)
    if rows < vocab:
        assert rows % 128 == 0 and rows >= vocab_blocks.MIN_BLOCK_ROWS
    if piece < n:  # tokens split only when a block would be narrower than the minimum
        assert rows == vocab_blocks.MIN_BLOCK_ROWS
    if n <= tile // vocab:
        assert (rows, piece) == (vocab, max(n, 1))  # the whole problem in one tile
    if (n, vocab) == (16_384, 151_936):
        assert piece == n and rows == 9472  # 17 blocks, every token in each GEMM


def _dense_truth(h, w, b, targets, token_grad, inv_t, softcap=None, logit_scale=1.0):
    """fp64 autograd through the dense logits: grads of sum(token_grad * logp)."""
    h, w = h.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    b = None if b is None else b.double().detach().requires_grad_()
    u = h @ w.t() + (0 if b is None else b)
    z = (softcap * torch.tanh(logit_scale * u / softcap) if softcap else logit_scale * u) * inv_t
    logz = torch.log_softmax(z, -1)
    valid = (targets >= 0) & (targets < w.shape[0])
    logp = torch.where(valid, logz.gather(1, targets.clamp(0, w.shape[0] - 1)[:, None])[:, 0], 0.0)
    (logp * token_grad.double()).sum().backward()
    return torch.logsumexp(z, -1).detach(), (h.grad, w.grad, None if b is None else b.grad)


LAYOUTS = {  # (tile elements, MIN_BLOCK_ROWS): what the pass does with N = 60, V = 90
    "one_tile": (60 * 90, 8),
    "blocks": (60 * 20, 8),          # 20 rows a block, every token in each GEMM
    "blocks_x_pieces": (40, 8),      # 8-row blocks, 5-token pieces: fp32 block accumulator
    "one_block_pieces": (90 * 7, 128),  # V < min rows: whole vocabulary, 7-token pieces
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", ["plain", "bias_temperature", "softcap", "fp32"])
def test_vocab_blocked_grads_match_dense_autograd(monkeypatch, layout, variant):
    tile, min_rows = LAYOUTS[layout]
    monkeypatch.setattr(vocab_blocks, "MIN_BLOCK_ROWS", min_rows)
    monkeypatch.setattr(vocab_blocks, "_ROW_ALIGN", 4)
    g = torch.Generator().manual_seed(hash(layout + variant) % 1000)
    n, hidden_size, vocab = 60, 12, 90
    dtype = torch.float32 if variant == "fp32" else torch.float64
    h = torch.randn(n, hidden_size, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if variant == "bias_temperature" else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::9] = -100  # out of the vocabulary: no one-hot, no gradient
    token_grad = torch.randn(n, generator=g, dtype=torch.float64)
    token_grad[targets < 0] = 0.0
    token_grad[5] = 0.0
    h_in = h.clone()
    h_in[5] = float("nan")  # a token without gradient may hold anything
    temperature = 0.7 if variant == "bias_temperature" else 1.0
    softcap = 3.0 if variant == "softcap" else None
    head = fused_linear._check_head(h_in.to(dtype), w.to(dtype), targets, None if b is None else b.to(dtype),
                                    temperature, True, "torch", softcap, 1.3 if softcap else 1.0)
    lse, want = _dense_truth(torch.where(token_grad[:, None] != 0, h, 0.0), w, b, targets, token_grad,
                             1.0 / temperature, softcap, 1.3 if softcap else 1.0)
    got = vocab_blocks.vocab_blocked_grads(head, (True, True, b is not None), targets, lse.to(head.logp_dtype),
                                           token_grad.to(head.logp_dtype), tile, logits_grad_inplace_torch)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, x, y in zip(("hidden", "weight", "bias"), got, want):
        if y is None:
            assert x is None
            continue
        assert bool(torch.isfinite(x).all()), name
        assert_close(x.double(), y, atol=tol, rtol=tol, name=name)
    assert got.hidden.dtype == dtype and got.weight.dtype == dtype


def test_fp16_storage_scale_and_partial_needs(monkeypatch):
    """fp16 logits are stored x 2^-8 in the tile; the grads undo it. Only the weight asked."""
    monkeypatch.setattr(vocab_blocks, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(vocab_blocks, "_ROW_ALIGN", 4)
    g = torch.Generator().manual_seed(3)
    n, hidden_size, vocab = 40, 16, 64
    h = torch.randn(n, hidden_size, generator=g).half()
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.5).half()
    targets = torch.randint(0, vocab, (n,), generator=g)
    token_grad = torch.randn(n, generator=g)
    head = fused_linear._check_head(h, w, targets, None, 1.0, True, "torch")
    assert head.inv_temperature == 256.0  # the stored logits are z * 2^-8
    lse, (_, want_w, _) = _dense_truth(h, w, None, targets, token_grad, 1.0)
    got = vocab_blocks.vocab_blocked_grads(head, (False, True, False), targets, lse.float(), token_grad, 40,
                                           logits_grad_inplace_torch)
    assert got.hidden is None and got.bias is None and got.weight.dtype == torch.float16
    err = (got.weight.double() - want_w).norm() / want_w.norm()
    assert err < 3e-3, err


# --------------------------------------------------------------------------- bf16 numerics
def test_low_memory_grad_weight_rounded_once_bf16(monkeypatch):
    """CCE's criterion, tight: low_memory's bf16 grad-weight (16 token pieces summed in the
    fp32 block accumulator) is no worse against fp64 than plain PyTorch's single GEMM, and
    ``grad_weight_fp32`` changes nothing (no V x H accumulator is left to choose)."""
    monkeypatch.setattr(vocab_blocks, "MIN_BLOCK_ROWS", 128)
    case = make_head_case(n_groups=8, group_size=4, seq_len=32, hidden_size=64, vocab=256, seed=5,
                          packed=True)
    truth = naive_loss(case)
    low = {**case, "hidden": case["hidden"].bfloat16(), "weight": case["weight"].bfloat16()}
    naive_bf16 = naive_loss(low)
    n = case["hidden"].shape[0]
    chunk = 8  # tile 8 x 256: 128-row blocks, 16-token pieces -> n / 16 pieces
    assert n // 16 >= 16
    runs = {flag: fused_loss(low, mode="low_memory", chunk_tokens=chunk, backend="torch",
                             grad_weight_fp32=flag)
            for flag in ("auto", True, False)}
    for flag in (True, False):
        for name in ("hidden", "weight"):
            assert torch.equal(runs[flag][2][name].grad, runs["auto"][2][name].grad), (flag, name)
    for name in ("hidden", "weight"):
        want = truth[2][name].grad
        err = (runs["auto"][2][name].grad.double() - want).norm() / want.norm()
        err_naive = (naive_bf16[2][name].grad.double() - want).norm() / want.norm()
        assert err <= 1.1 * err_naive, (name, err, err_naive)


def _fast_bf16(case, flag, chunk_tokens):
    return fused_loss(case, mode="fast", chunk_tokens=chunk_tokens, backend="torch", grad_weight_fp32=flag)


@pytest.mark.parametrize("head", ["lpo", "grpo"])
def test_auto_adds_chunks_in_the_weight_dtype_up_to_two_chunks(head):
    """"auto" = False (the weight's dtype) at <= 2 chunks and = True (fp32) above, bitwise."""
    case = make_head_case(n_groups=4, group_size=2, seq_len=8, hidden_size=32, vocab=200, seed=9)
    low = {**case, "hidden": case["hidden"].bfloat16(), "weight": case["weight"].bfloat16()}
    per_group = 2 * 8

    def run(flag, chunk):
        if head == "lpo":
            return _fast_bf16(low, flag, chunk)[2]["weight"].grad
        w = low["weight"].clone().requires_grad_()
        adv = torch.randn(8, generator=torch.Generator().manual_seed(1))
        loss, _ = fused_linear_grpo_loss(low["hidden"], w, low["target_ids"].clamp(min=0), low["mask"], adv,
                                         chunk_tokens=chunk, backend="torch", grad_weight_fp32=flag)
        loss.backward()
        return w.grad

    # 2 chunks of 2 groups (rows of the GRPO head); 4 chunks of one group each
    two, four = 2 * per_group, per_group
    assert torch.equal(run("auto", two), run(False, two))
    assert torch.equal(run("auto", four), run(True, four))
    assert not torch.equal(run(True, four), run(False, four))  # the choice is visible here


@pytest.mark.parametrize("bad", ["fp32", 1, None, 0.0])
def test_grad_weight_fp32_bad_values_name_the_argument(bad):
    case = make_head_case(seed=2)
    with pytest.raises(ValueError, match="grad_weight_fp32"):
        fused_loss(case, grad_weight_fp32=bad, backend="torch")
    with pytest.raises(ValueError, match="grad_weight_fp32"):
        fused_linear_logprobs(case["hidden"], case["weight"], case["target_ids"].clamp(min=0),
                              grad_weight_fp32=bad)
    with pytest.raises(ValueError, match="grad_weight_fp32"):
        fused_linear_grpo_loss(case["hidden"], case["weight"], case["target_ids"].clamp(min=0), case["mask"],
                               torch.zeros(case["hidden"].shape[0]), grad_weight_fp32=bad)


# --------------------------------------------------------------------------- memory (CPU)
def _allocations(run):
    """(peak bytes live above the start, largest single allocation) of ``run`` on the
    CPU, from the profiler's allocation events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0),
                    key=lambda e: e.time_range.start)
    live = peak = largest = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.self_cpu_memory_usage)
    return peak, largest


def _memory_case(n=256, hidden_size=512, vocab=4096):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden_size, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    cu = torch.arange(0, n + 1, 32)
    rewards = torch.randn(cu.numel() - 1, generator=g)
    group_ids = torch.arange(cu.numel() - 1) // 2  # 4 groups of 64 tokens
    return h, w, targets, cu, rewards, group_ids


@pytest.mark.parametrize("mode,flag,chunk_tokens,fp32_accumulator", [
    ("low_memory", "auto", 16, False), ("low_memory", True, 16, False),
    ("fast", "auto", 128, False),       # 2 chunks of 2 groups: the weight's dtype
    ("fast", "auto", 64, True),         # 4 chunks of one group: fp32
    ("fast", False, 64, False)])
def test_memory_no_fp32_vocab_accumulator(monkeypatch, mode, flag, chunk_tokens, fp32_accumulator):
    # the backward's fp32 scaling runs by slices of 8192 rows (all of this toy V); shrink
    # them so the only V x H fp32 allocation can be an accumulator
    monkeypatch.setattr(scale_op, "SLICE_ELEMENTS", 256 * 512)
    monkeypatch.setattr(fused_linear, "VOCAB_SLICE", 256)
    h, w, targets, cu, rewards, group_ids = _memory_case()
    n, hidden_size = h.shape
    vocab = w.shape[0]

    def run():
        loss, _ = fused_linear_lpo_loss(h, w, targets, None, group_ids, rewards, cu_seqlens=cu, mode=mode,
                                        chunk_tokens=chunk_tokens, backend="torch", grad_weight_fp32=flag,
                                        validate=False)
        loss.backward()

    run()  # warm caches (probes, lru caches) outside the measurement
    h.grad = w.grad = None
    peak, largest = _allocations(run)
    fp32_vh = 4 * vocab * hidden_size
    assert (largest >= fp32_vh) == fp32_accumulator, (largest, fp32_vh)
    grads = 2 * vocab * hidden_size + 2 * n * hidden_size
    if mode == "low_memory":  # + tile (CPU: and its fp32 upcasts) + fp32 grad-hidden + masked h
        tile = chunk_tokens * vocab
        bound = grads + 4 * n * hidden_size + 2 * n * hidden_size + 4 * 4 * tile + (1 << 20)
        assert peak <= bound, (peak, bound)
        assert peak < grads + fp32_vh  # what the fp32 accumulator alone used to add


# --------------------------------------------------------------------------- logprobs, TP shard targets
def test_logprobs_backward_through_blocks(monkeypatch):
    monkeypatch.setattr(vocab_blocks, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(vocab_blocks, "_ROW_ALIGN", 8)
    case = make_head_case(seq_len=9, vocab=120, bias=True, seed=31)
    targets = case["target_ids"].clamp(min=0)
    p = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    q = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    logp = fused_linear_logprobs(p["hidden"], p["weight"], targets, bias=p["bias"], chunk_tokens=3,
                                 backend="torch", temperature=1.2)
    ref = reference.naive_linear_logprobs(q["hidden"], q["weight"], targets, bias=q["bias"], temperature=1.2)
    upstream = torch.randn(logp.shape, generator=torch.Generator().manual_seed(4), dtype=logp.dtype)
    (logp * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name in ("hidden", "weight", "bias"):
        assert_close(p[name].grad, q[name].grad, atol=1e-12, rtol=1e-10, name=name)
    assert head_chunk.AUTO_WEIGHT_DTYPE_MAX_CHUNKS == 2


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["blocks", "blocks_x_pieces"])
def test_gpu_vocab_blocked_grads(monkeypatch, backend, dtype, layout):
    """The device paths the CPU cannot run: fp32-output cuBLAS GEMMs into a row slice of
    the grad-hidden accumulator and into the block accumulator (transposed operand), the
    row kernels on a contiguous [n, Vb] tile, fp16's storage scale; against fp64 truth, no
    worse than the same product done in one plain-PyTorch GEMM of the same dtype."""
    from .test_fused_linear import _cuda_extension_available

    if backend == "cuda" and not _cuda_extension_available():
        pytest.skip("CUDA extension not built")
    from lpo_kernels.ops.loss_head import row_kernels

    monkeypatch.setattr(vocab_blocks, "MIN_BLOCK_ROWS", 512)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden_size, vocab = 1500, 256, 4099
    h = torch.randn(n, hidden_size, device="cuda", generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden_size, device="cuda", generator=g, dtype=torch.float64) * 0.15
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    targets[::7] = -100
    token_grad = torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
    token_grad[targets < 0] = 0.0
    hl, wl = h.to(dtype), w.to(dtype)
    lse, truth = _dense_truth(hl.double(), wl.double(), None, targets, token_grad, 1.0)
    tile = n * 600 if layout == "blocks" else 512 * 256  # 512-row blocks; all tokens / 256-token pieces
    head = fused_linear._check_head(hl, wl, targets, None, 1.0, True, backend)
    got = vocab_blocks.vocab_blocked_grads(head, (True, True, False), targets, lse.float(), token_grad.float(),
                                           tile, row_kernels(backend)[1])
    # plain PyTorch in the same dtype: one GEMM for each gradient from the dense d logits
    z = (hl @ wl.t()).float()
    dz = -torch.softmax(z, -1) * token_grad.float()[:, None]
    valid = targets >= 0
    dz[valid.nonzero()[:, 0], targets[valid]] += token_grad.float()[valid]
    dz = dz.to(dtype)
    plain = (dz @ wl, dz.t() @ hl)
    for name, x, p, t in zip(("hidden", "weight"), got, plain, truth):
        err = float((x.double() - t).norm() / t.norm())
        err_plain = float((p.double() - t).norm() / t.norm())
        assert err <= 1.5 * err_plain + 1e-6, (name, err, err_plain)


# --------------------------------------------------------------------------- backward scale
@pytest.mark.parametrize("mode", ["fast", "low_memory"])
def test_backward_scale_is_applied_in_fp32(mode):
    """Gradients held in bf16 are scaled by grad_output (x 1/G) in fp32 and rounded once:
    ``(loss / 3).backward()`` gives exactly bf16(fp32(g) * fp32(1/3)), with no bias from a
    bf16-rounded 1/3 (0.33398: +0.18% on every element)."""
    case = make_head_case(n_groups=3, group_size=4, seq_len=10, hidden_size=32, vocab=300, seed=12)
    low = {**case, "hidden": case["hidden"].bfloat16(), "weight": case["weight"].bfloat16()}
    grads = {}
    for divisor in (1.0, 3.0):
        p = {k: low[k].clone().requires_grad_() for k in ("hidden", "weight")}
        loss, _ = fused_linear_lpo_loss(p["hidden"], p["weight"], low["target_ids"], low["mask"], low["group_ids"],
                                        low["rewards"], old_logp=low["old_logp"], mode=mode, reduction="sum",
                                        backend="torch")
        (loss / divisor).backward()
        grads[divisor] = p
    third = torch.tensor(1.0, dtype=torch.float32) / 3.0
    for name in ("hidden", "weight"):
        want = (grads[1.0][name].grad.float() * third).bfloat16()
        if name == "hidden" and mode == "low_memory":  # held in the fp32 accumulator: one
            # rounding of acc/3 here, two in ``want``; equal within an ulp, and unbiased
            got, ref = grads[3.0][name].grad.double(), want.double()
            assert bool(((got - ref).abs() <= ref.abs() * 2.0 ** -7).all())
            assert abs(float((got[ref != 0] / ref[ref != 0]).mean()) - 1.0) < 3e-4
        else:
            assert torch.equal(grads[3.0][name].grad, want), name
    # reduction="mean" with G = 3 groups: the 1/3 is the head's own scale; no bias either
    runs = {flag: fused_loss(low, mode="fast", backend="torch", grad_weight_fp32=flag)[2]["weight"].grad
            for flag in ("auto", True)}
    ratio = (runs["auto"].double() / runs[True].double())[runs[True] != 0]
    assert abs(float(ratio.mean()) - 1.0) < 3e-4, float(ratio.mean())


# --------------------------------------------------------------------------- unlabelled tokens
def _unlabelled_case():
    case = make_head_case(n_groups=2, group_size=3, seq_len=7, hidden_size=16, vocab=60, seed=21)
    targets = case["target_ids"].clone()
    targets[0, 1], targets[3, 2] = -100, 60  # counted (mask 1) but no vocabulary id
    mask = case["mask"].clone()
    mask[0, 1] = mask[3, 2] = True
    case["old_logp"][0, 1] = case["old_logp"][3, 2] = 0.0  # log-ratio 0: inside LPO's clip
    return case, targets, mask, ((0, 1), (3, 2))


@pytest.mark.parametrize("head", ["logprobs", "grpo", "grpo_entropy", "lpo_fast", "lpo_low_memory"])
def test_unlabelled_tokens_get_no_gradient(head):
    """logp (and entropy) are the constant 0 at a target outside [0, V): the loss does not
    depend on that token's hidden state, so its gradient is exactly 0 and grad-weight
    cannot see it (a NaN there changes nothing). The row kernels alone would write
    -softmax * g there."""
    case, targets, mask, spots = _unlabelled_case()
    runs = []
    for fill in (None, float("nan")):
        hidden = case["hidden"].clone()
        for b, t in spots:
            hidden[b, t] = fill if fill is not None else hidden[b, t]
        h = hidden.clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        if head == "logprobs":
            loss = fused_linear_logprobs(h, w, targets, backend="torch").sum()
        elif head.startswith("grpo"):
            adv = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            extra = dict(entropy_coef=0.2) if head == "grpo_entropy" else {}
            loss, _ = fused_linear_grpo_loss(h, w, targets, mask, adv, old_logp=case["old_logp"],
                                             backend="torch", validate=False, **extra)
        else:
            loss, _ = fused_linear_lpo_loss(h, w, targets, mask, case["group_ids"], case["rewards"],
                                            old_logp=case["old_logp"], backend="torch", validate=False,
                                            mode=head.split("_", 1)[1])
        loss.backward()
        runs.append((h.grad, w.grad))
    for b, t in spots:
        assert bool((runs[0][0][b, t] == 0).all()), (head, b, t)
    assert bool(torch.isfinite(runs[1][0]).all() and torch.isfinite(runs[1][1]).all()), head
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0]), head


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(0,), (5,), (4097,), (37, 130), (3, 5, 7)])
def test_scale_inplace_is_fp32_math_rounded_once(path, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    s = torch.tensor(1.0, dtype=torch.float32) / 3.0
    want = (x.float() * s).to(dtype)
    got = x.clone()
    (scale_op.scale_inplace_torch if path == "torch" else scale_op.scale_inplace_triton)(got, s)
    if path == "triton" and dtype == torch.bfloat16:  # the CPU interpreter truncates bf16
        # stores (the GPU rounds to nearest even: test_gpu_scale_inplace_bf16): within an ulp
        ulp = (want.float().abs() * 2.0 ** -7).clamp(min=2.0 ** -133)
        assert bool(((got.float() - want.float()).abs() <= ulp).all())
    else:
        assert torch.equal(got, want)
    if x.numel() > 100:  # what a half-precision multiply does instead: elements biased alike
        assert not torch.equal(x * s.to(dtype), want)
    with pytest.raises(TypeError, match="fp16/bf16"):
        scale_op.scale_inplace(x.float(), s)


@pytest.mark.gpu
def test_gpu_scale_inplace_bf16():
    x = torch.randn(3 * 4096 + 17, device="cuda").bfloat16()
    s = torch.tensor(1.0, device="cuda") / 3.0
    want = (x.float() * s).bfloat16()
    assert torch.equal(scale_op.scale_inplace(x.clone(), s), want)
