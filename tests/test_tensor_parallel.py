"""Vocabulary-parallel fused head (``tp_group=``) on gloo CPU process groups of 2 and 3
ranks with unequal vocabulary slices: loss, stats, log-probs, entropy and the gradients of
hidden / weight slice / bias slice must equal the single-process full-vocabulary result
(fp64 to 1e-10 relative), and the replicated outputs must be bitwise equal on every rank.

One spawn of 3 processes per module runs every case on the 3-rank world group and on a
2-rank subgroup; the single-process reference runs here. A case function takes ``tp``
(group, world, rank; None = one process with the full head), slices the weight/bias for
its rank and returns a dict of tensors. Optional parts: a megatron-core check (skipped
where megatron-core is not installed) and a ``gpu``-marked run of the Triton/CUDA kernels."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lpo_kernels.fused_linear import (FusedLinearLPOLoss, fused_linear_grpo_loss,
                                      fused_linear_logprobs, fused_linear_lpo_group_stats,
                                      fused_linear_lpo_loss)
from lpo_kernels.group_stats import combine_group_stats

from .test_fused_linear import make_head_case
from .utils import assert_close

VOCAB = 41
SPLITS = {2: [17, 24], 3: [9, 20, 12]}  # unequal slices, rank order
# optional: megatron-core (`pip install --no-deps megatron-core`); imported by the spawned
# ranks only (it takes seconds and warns at import)
HAS_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None


def _shard(full: torch.Tensor | None, tp):
    if full is None or tp is None:
        return full
    start = sum(SPLITS[tp["world"]][:tp["rank"]])
    return full[start:start + SPLITS[tp["world"]][tp["rank"]]]


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def _tp_kwargs(tp, explicit_start=False):
    if tp is None:
        return {}
    kw = dict(tp_group=tp["group"])
    if explicit_start:
        kw["vocab_start"] = sum(SPLITS[tp["world"]][:tp["rank"]])
    return kw


def _grads(out, hidden, weight, bias):
    out.update(grad_hidden=hidden.grad, grad_weight=weight.grad)
    if bias is not None:
        out["grad_bias"] = bias.grad
    return out


def _stats(stats):
    return {f"stat_{f.name}": getattr(stats, f.name) for f in dataclasses.fields(stats)}


# --------------------------------------------------------------------------- cases
def _lpo(tp, *, dtype, mode, backend, packed, explicit_start=False, chunk_tokens=10, seed=3,
         module=False, device="cpu", **head_options):
    c = make_head_case(n_groups=3, group_size=4, seq_len=5, vocab=VOCAB, dtype=dtype, bias=True,
                       packed=packed, shuffle=True, seed=seed, device=device)
    h, w, b = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp)), _leaf(_shard(c["bias"], tp))
    options = dict(temperature=0.9, mode=mode, chunk_tokens=chunk_tokens, backend=backend,
                   divergence="alpha", alpha=0.4, target="rloo", **head_options,
                   **_tp_kwargs(tp, explicit_start))
    head = FusedLinearLPOLoss(**options) if module else functools.partial(fused_linear_lpo_loss, **options)
    loss, stats, outs = head(h, w, c["target_ids"], c["mask"], c["group_ids"], c["rewards"], bias=b,
                             old_logp=c["old_logp"], cu_seqlens=c["cu_seqlens"], return_logp=True,
                             return_entropy=True)
    loss.backward()
    return _grads(dict(loss=loss.detach(), logp=outs.logp, entropy=outs.entropy, **_stats(stats)),
                  h, w, b)


def _lpo_split_groups(tp, *, mode):
    """Two micro-calls, every group straddling both: records from the fused group-stats
    pass, each call gets the other's; their gradients add up to the whole batch's."""
    c = make_head_case(n_groups=3, group_size=4, seq_len=5, vocab=VOCAB, bias=True, shuffle=True,
                       seed=7)
    h, w, b = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp)), _leaf(_shard(c["bias"], tp))
    micro = [torch.arange(0, 12, 2), torch.arange(1, 12, 2)]
    records = [fused_linear_lpo_group_stats(
        c["hidden"][r], _shard(c["weight"], tp), c["target_ids"][r], c["mask"][r],
        c["group_ids"][r], c["rewards"][r], bias=_shard(c["bias"], tp), temperature=0.9,
        old_logp=c["old_logp"][r], target="grpo", **_tp_kwargs(tp)) for r in micro]
    losses = []
    for i, r in enumerate(micro):
        loss, _ = fused_linear_lpo_loss(
            h[r], w, c["target_ids"][r], c["mask"][r], c["group_ids"][r], c["rewards"][r],
            bias=b, old_logp=c["old_logp"][r], group_stats=combine_group_stats([records[1 - i]]),
            temperature=0.9, mode=mode, chunk_tokens=10, backend="torch", target="grpo",
            divergence="reverse_kl", **_tp_kwargs(tp))
        loss.backward()
        losses.append(loss.detach())
    out = dict(loss0=losses[0], loss1=losses[1])
    for i, rec in enumerate(records):
        out.update({f"records{i}_scores": rec.scores, f"records{i}_n_tokens": rec.n_tokens})
    return _grads(out, h, w, b)


def _lpo_whole_for_split(tp, *, mode):
    """The single-process whole-batch result the split-group case must reproduce."""
    c = make_head_case(n_groups=3, group_size=4, seq_len=5, vocab=VOCAB, bias=True, shuffle=True,
                       seed=7)
    h, w, b = _leaf(c["hidden"]), _leaf(c["weight"]), _leaf(c["bias"])
    loss, _ = fused_linear_lpo_loss(
        h, w, c["target_ids"], c["mask"], c["group_ids"], c["rewards"], bias=b,
        old_logp=c["old_logp"], temperature=0.9, mode=mode, chunk_tokens=10, backend="torch",
        target="grpo", divergence="reverse_kl")
    loss.backward()
    return _grads(dict(loss0=loss.detach(), loss1=loss.detach()), h, w, b)


def _grpo(tp, *, dtype, loss_type, **options):
    c = make_head_case(n_groups=2, group_size=4, seq_len=6, vocab=VOCAB, dtype=dtype, bias=True,
                       seed=11)
    g = torch.Generator().manual_seed(12)
    ref = c["old_logp"] + 0.1 * torch.randn(c["old_logp"].shape, generator=g, dtype=c["old_logp"].dtype)
    h, w, b = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp)), _leaf(_shard(c["bias"], tp))
    loss, stats, out = fused_linear_grpo_loss(
        h, w, c["target_ids"], c["mask"], c["rewards"], bias=b, temperature=1.1,
        old_logp=c["old_logp"], ref_logp=ref, chunk_tokens=12, backend="torch",
        loss_type=loss_type, beta=0.05, return_logp=True, **options, **_tp_kwargs(tp))
    logp = out.logp
    loss.backward()
    return _grads(dict(loss=loss.detach(), logp=logp, **_stats(stats)), h, w, b)


def _logprobs(tp, *, dtype, backend, explicit_start=False, device="cpu", masked_vocab=False):
    c = make_head_case(n_groups=2, group_size=3, seq_len=7, vocab=VOCAB, dtype=dtype, bias=True,
                       packed=True, seed=19, device=device)
    targets = c["target_ids"]
    if masked_vocab:  # ids [0, 9) masked by a -inf bias: all of rank 0's slice at world 3
        c["bias"][:9] = float("-inf")
        targets = targets.clamp(min=9)
    h, w, b = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp)), _leaf(_shard(c["bias"], tp))
    # the one-process entropy of a row with -inf logits is not defined here (issue 13)
    out = fused_linear_logprobs(h, w, targets, bias=b, temperature=0.8,
                                return_entropy=not masked_vocab, chunk_tokens=9, backend=backend,
                                **_tp_kwargs(tp, explicit_start))
    logp, entropy = (out, None) if masked_vocab else out
    g = torch.Generator().manual_seed(20)
    weights = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device, logp.dtype)
    (logp * weights).sum().backward()
    out = dict(logp=logp.detach()) if masked_vocab else dict(logp=logp.detach(), entropy=entropy)
    return _grads(out, h, w, b)


def _unlabelled(tp):
    """Counted tokens whose target no rank owns (-100, V, V + 3): logp is the constant 0, so
    no gradient, as on one process (the global V from the all-gathered slice sizes)."""
    c = make_head_case(n_groups=2, group_size=3, seq_len=6, vocab=VOCAB, seed=31)
    targets, mask, old = c["target_ids"].clone(), c["mask"].clone(), c["old_logp"].clone()
    for (row, col), bad in zip(((0, 1), (2, 0), (4, 2)), (-100, VOCAB, VOCAB + 3)):
        targets[row, col], mask[row, col], old[row, col] = bad, True, 0.0  # log-ratio 0: not clipped
    out = {}
    for name in ("logprobs", "grpo", "lpo"):
        h, w = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp))
        if name == "logprobs":
            loss = fused_linear_logprobs(h, w, targets, backend="torch", **_tp_kwargs(tp)).sum()
        elif name == "grpo":
            loss, _ = fused_linear_grpo_loss(h, w, targets, mask, c["rewards"], old_logp=old, backend="torch",
                                             validate=False, **_tp_kwargs(tp))
        else:
            loss, _ = fused_linear_lpo_loss(h, w, targets, mask, c["group_ids"], c["rewards"], old_logp=old,
                                            backend="torch", validate=False, **_tp_kwargs(tp))
        loss.backward()
        out.update({f"{name}_loss": loss.detach(), f"{name}_grad_hidden": h.grad,
                    f"{name}_grad_weight": w.grad})
    return out


F64, F32 = torch.float64, torch.float32
CASES = {
    "lpo_fast_f64": lambda tp: _lpo(tp, dtype=F64, mode="fast", backend="torch", packed=False),
    "lpo_low_memory_f64_packed": lambda tp: _lpo(tp, dtype=F64, mode="low_memory", backend="torch",
                                                 packed=True, explicit_start=True),
    "lpo_fast_f64_packed_module": lambda tp: _lpo(tp, dtype=F64, mode="fast", backend="torch",
                                                  packed=True, module=True),
    "lpo_low_memory_f32": lambda tp: _lpo(tp, dtype=F32, mode="low_memory", backend="torch",
                                          packed=False),
    "lpo_fast_f32_triton": lambda tp: _lpo(tp, dtype=F32, mode="fast", backend="triton",
                                           packed=False, chunk_tokens=30),
    "lpo_low_memory_f64_softcap": lambda tp: _softcapped(_lpo, tp, dtype=F64, mode="low_memory",
                                                         backend="torch", packed=False),
    "lpo_split_groups_fast_f64": lambda tp: _lpo_split_groups(tp, mode="fast"),
    "lpo_split_groups_low_memory_f64": lambda tp: _lpo_split_groups(tp, mode="low_memory"),
    "grpo_dapo_f64": lambda tp: _grpo(tp, dtype=F64, loss_type="dapo"),
    "grpo_grpo_f32": lambda tp: _grpo(tp, dtype=F32, loss_type="grpo"),
    "grpo_sapo_entropy_bonus_f64": lambda tp: _grpo(tp, dtype=F64, loss_type="sapo", entropy_coef=0.05,
                                                    top_entropy_quantile=0.5),
    "logprobs_f64": lambda tp: _logprobs(tp, dtype=F64, backend="torch"),
    "logprobs_f32_explicit_start": lambda tp: _logprobs(tp, dtype=F32, backend="torch",
                                                        explicit_start=True),
    "logprobs_bf16": lambda tp: _logprobs(tp, dtype=torch.bfloat16, backend="torch"),
    "logprobs_f64_masked_vocab": lambda tp: _logprobs(tp, dtype=F64, backend="torch",
                                                      masked_vocab=True),
    "unlabelled_ids_f64": _unlabelled,
}
REFERENCES = {"lpo_split_groups_fast_f64": lambda: _lpo_whole_for_split(None, mode="fast"),
              "lpo_split_groups_low_memory_f64": lambda: _lpo_whole_for_split(None, mode="low_memory")}


def _softcapped(case, tp, **kwargs):
    """A case with a Gemma-2 style soft-cap and logit scale, the cap's gradient chain run
    over 7-column vocabulary slices (so the targets are shifted twice: slice of the rank's
    shard, column slice of that)."""
    from lpo_kernels import logit_transform

    saved, logit_transform.SLICE_COLUMNS = logit_transform.SLICE_COLUMNS, 7
    try:
        return case(tp, softcap=2.0, logit_scale=1.3, **kwargs)
    finally:
        logit_transform.SLICE_COLUMNS = saved


# --------------------------------------------------------------------------- processes
def _worker(rank, world, port, out_dir):
    """Every case on the 3-rank world group, then on the 2-rank subgroup {0, 1} (a TP group
    inside a larger world, as in Megatron); one process start-up serves both."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        groups = {world: dist.group.WORLD, 2: dist.new_group([0, 1])}  # every rank must call
        results = {}
        for size, group in groups.items():
            if rank >= size:
                continue
            tp = dict(group=group, world=size, rank=rank)
            results[size] = {name: case(tp) for name, case in CASES.items()}
            results[size]["errors"] = _bad_layouts(tp)
            results[size]["collectives"] = _count_collectives(tp)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_layouts(tp):
    """The ValueError messages of a wrong vocab_start and of a target past the global
    vocabulary (validate=True: every rank raises after the same collective)."""
    c = make_head_case(n_groups=2, group_size=2, vocab=VOCAB, seed=23)
    messages = {}
    for name, start, bad_target in (("overlapping", 0, False), ("target", None, True),
                                    ("hidden", None, False)):
        targets = c["target_ids"].clone()
        if bad_target:
            targets[0, 0] = VOCAB  # counted (every row's first token is)
        hidden = c["hidden"] + 1e-3 * tp["rank"] if name == "hidden" else c["hidden"]
        try:
            fused_linear_lpo_loss(hidden, _shard(c["weight"], tp), targets, c["mask"],
                                  c["group_ids"], c["rewards"], validate=True,
                                  tp_group=tp["group"], vocab_start=start)
            messages[name] = ""
        except ValueError as error:
            messages[name] = str(error)
    return messages


class _CountingDist:
    """torch.distributed, recording (collective, elements sent by this rank)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(dist, name)

    def all_gather(self, outputs, tensor, group=None):
        self.calls.append(("all_gather", tensor.numel()))
        return dist.all_gather(outputs, tensor, group=group)

    def all_reduce(self, tensor, group=None):
        self.calls.append(("all_reduce", tensor.numel()))
        return dist.all_reduce(tensor, group=group)


def _count_collectives(tp):
    """The collectives of a low_memory LPO call with entropy (sizes all-gathered) and of a
    log-probs call with vocab_start given, forward and backward (checked against the
    documented counts in test_communication_is_a_few_numbers_per_token)."""
    from lpo_kernels import tensor_parallel

    c = make_head_case(n_groups=3, group_size=4, seq_len=5, vocab=VOCAB, seed=29)
    counted = {}
    for name in ("lpo_low_memory", "logprobs"):
        counter = _CountingDist()
        tensor_parallel.dist, saved = counter, tensor_parallel.dist
        try:
            h, w = _leaf(c["hidden"]), _leaf(_shard(c["weight"], tp))
            if name == "lpo_low_memory":
                loss, _, _ = fused_linear_lpo_loss(
                    h, w, c["target_ids"], c["mask"], c["group_ids"], c["rewards"],
                    old_logp=c["old_logp"], mode="low_memory", chunk_tokens=16,
                    return_entropy=True, validate=False, tp_group=tp["group"])
            else:
                loss = fused_linear_logprobs(h, w, c["target_ids"], chunk_tokens=16,
                                             **_tp_kwargs(tp, explicit_start=True)).sum()
            n_forward = len(counter.calls)
            loss.backward()
        finally:
            tensor_parallel.dist = saved
        counted[name] = (counter.calls[:n_forward], counter.calls[n_forward:])
    counted["n_real"] = int(c["mask"].sum())  # the masked LPO call runs on the real tokens only
    return counted


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, _free_port(), out_dir, *args), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


_RUNS: list = []


def _ranks(world):
    """Every rank's results on the ``world``-rank group (3 processes spawned once)."""
    if not _RUNS:
        _RUNS.append(_spawn(_worker, 3))
    return [results[world] for results in _RUNS[0] if world in results]


@pytest.fixture(scope="module")
def references():
    out = {}
    for name, case in CASES.items():
        out[name] = REFERENCES[name]() if name in REFERENCES else case(None)
    return out


# bf16: grad-hidden is summed over the slices in bf16 (as Megatron does), one more rounding
TOLERANCE = {"f64": dict(rtol=1e-10, atol=1e-12), "f32": dict(rtol=2e-5, atol=2e-6),
             "bf16": dict(rtol=1e-2, atol=2e-2)}
REPLICATED = ("loss", "loss0", "loss1", "logp", "entropy")  # must be bitwise equal on every rank


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("world", [2, 3])
def test_bad_layout_and_targets_raise_on_every_rank(world):
    for rank, results in enumerate(_ranks(world)):
        errors = results["errors"]
        # rank 0 really starts at 0: only the others' overlap is wrong, but all ranks see it
        assert "vocab_start" in errors["overlapping"] and "rank order" in errors["overlapping"], rank
        assert f"[0, {VOCAB})" in errors["target"], (rank, errors["target"])
        assert "same on every rank" in errors["hidden"], (rank, errors["hidden"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("world", [2, 3])
def test_communication_is_a_few_numbers_per_token(world):
    """README/module docstring: one all-gather of k numbers per token per chunk (k=3, 4 with
    entropy), one of the slice sizes unless vocab_start is given, one all-reduce of
    grad-hidden in the backward; nothing of size V."""
    n_tokens, hidden_size, chunk = 12 * 5, 16, 16  # make_head_case's padded [12, 5, 16]
    chunks = [min(chunk, n_tokens - a) for a in range(0, n_tokens, chunk)]
    for results in _ranks(world):
        n_real = results["collectives"]["n_real"]  # padding-free: the LPO call skips padding
        real_chunks = [min(chunk, n_real - a) for a in range(0, n_real, chunk)]
        assert n_real < n_tokens
        forward, backward = results["collectives"]["lpo_low_memory"]
        assert forward == [("all_gather", 1)] + [("all_gather", 4 * n) for n in real_chunks]
        assert backward == [("all_reduce", n_real * hidden_size)]
        forward, backward = results["collectives"]["logprobs"]
        assert forward == [("all_gather", 3 * n) for n in chunks]
        assert backward == [("all_reduce", n_tokens * hidden_size)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_vocab_parallel_equals_single_process(world, name, references):
    ranks = [results[name] for results in _ranks(world)]
    expected = references[name]
    tol = next(t for key, t in TOLERANCE.items() if key in name)
    for rank, got in enumerate(ranks):
        assert set(got) == set(expected) | ({k for k in got if k.startswith("records")}), name
        start = sum(SPLITS[world][:rank])
        rows = slice(start, start + SPLITS[world][rank])
        for key, want in expected.items():
            if key.endswith(("grad_weight", "grad_bias")):
                want = want[rows]  # this rank's slice of the full gradient
            assert got[key].dtype == want.dtype, (name, key)
            assert_close(got[key], want, name=f"{name} rank {rank} {key}", **tol)
        for key in REPLICATED:
            if key in got:
                assert torch.equal(got[key], ranks[0][key]), f"{name}: {key} differs between ranks"
        for key in [k for k in got if k.endswith("grad_hidden")]:
            assert torch.equal(got[key], ranks[0][key]), (name, key)
    if name.startswith("lpo_split"):  # the micro-calls' records are identical on every rank
        for key in [k for k in ranks[0] if k.startswith("records")]:
            assert all(torch.equal(r[key], ranks[0][key]) for r in ranks)


def test_grad_weight_slices_cover_the_full_gradient(references):
    """The world-3 slices of grad-weight, concatenated in rank order, are the full gradient."""
    ranks = _ranks(3)
    full = torch.cat([r["lpo_fast_f64"]["grad_weight"] for r in ranks])
    assert_close(full, references["lpo_fast_f64"]["grad_weight"], rtol=1e-10, atol=1e-12)


def test_bad_tp_arguments_name_the_argument():
    c = make_head_case(vocab=VOCAB)
    args = (c["hidden"], c["weight"], c["target_ids"].clamp(min=0))
    with pytest.raises(ValueError, match="vocab_start"):
        fused_linear_logprobs(*args, vocab_start=3)
    with pytest.raises(TypeError, match="tp_group"):
        fused_linear_logprobs(*args, tp_group="tp")


# --------------------------------------------------------------------------- megatron-core
MEGATRON_SHAPE = dict(tokens=23, hidden=16, vocab=42)


def _megatron_worker(rank, world, port, out_dir):
    """The LM head built by megatron-core's own ColumnParallelLinear (CPU initialisation),
    its process group from parallel_state; our head vs Megatron's vocab-parallel
    cross-entropy on the same slices."""
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import (ColumnParallelLinear,
                                               copy_to_tensor_model_parallel_region,
                                               vocab_parallel_cross_entropy)
    from megatron.core.tensor_parallel.utils import VocabUtility

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True,
                                     params_dtype=torch.float64)
        torch.manual_seed(0)  # the same master weight on every rank, as Megatron requires
        n, h_size, vocab = MEGATRON_SHAPE.values()
        lm_head = ColumnParallelLinear(h_size, vocab, config=config, bias=False, gather_output=False,
                                       init_method=lambda w: torch.nn.init.normal_(w, std=0.4),
                                       keep_master_weight_for_test=True)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            lm_head.weight.shape[0], tp_rank, world)
        g = torch.Generator().manual_seed(5)
        hidden = torch.randn(n, h_size, generator=g, dtype=torch.float64)
        targets = torch.randint(0, vocab, (n,), generator=g)
        upstream = torch.randn(n, generator=g, dtype=torch.float64)

        h_ours = hidden.clone().requires_grad_()
        w_ours = lm_head.weight.detach().clone().requires_grad_()
        logp, entropy = fused_linear_logprobs(h_ours, w_ours, targets, return_entropy=True,
                                              backend="torch", tp_group=tp_group,
                                              vocab_start=vocab_start)
        (logp * upstream).sum().backward()

        h_meg = hidden.clone().requires_grad_()
        logits = copy_to_tensor_model_parallel_region(h_meg) @ lm_head.weight.t()
        megatron_logp = -vocab_parallel_cross_entropy(logits, targets)
        (megatron_logp * upstream).sum().backward()
        torch.save(dict(logp=logp.detach(), entropy=entropy, grad_hidden=h_ours.grad,
                        grad_weight=w_ours.grad, megatron_logp=megatron_logp.detach(),
                        megatron_grad_hidden=h_meg.grad, megatron_grad_weight=lm_head.weight.grad,
                        master_weight=lm_head.master_weight, shard=lm_head.weight.detach(), hidden=hidden, targets=targets,
                        upstream=upstream, vocab_range=(vocab_start, vocab_end)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.skipif(not HAS_MEGATRON, reason="megatron-core is not installed")
def test_megatron_core_column_parallel_head():
    ranks = _spawn(_megatron_worker, 2)
    first = ranks[0]
    master = first["master_weight"].double()  # Megatron keeps its fp32 master for tests
    h = first["hidden"].clone().requires_grad_()
    w = master.clone().requires_grad_()
    logp, entropy = fused_linear_logprobs(h, w, first["targets"], return_entropy=True)
    (logp * first["upstream"]).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-12)
    megatron_tol = dict(rtol=1e-5, atol=1e-6)  # Megatron's cross-entropy upcasts to fp32 only
    for rank, got in enumerate(ranks):
        start, end = got["vocab_range"]
        assert torch.equal(got["master_weight"].double()[start:end], got["shard"])  # contiguous slice
        assert (start, end) == (rank * 21, (rank + 1) * 21)  # Megatron's equal slices
        assert_close(got["logp"], got["megatron_logp"], name="logp vs Megatron", **megatron_tol)
        assert_close(got["grad_hidden"], got["megatron_grad_hidden"], name="grad hidden vs Megatron",
                     **megatron_tol)
        assert_close(got["grad_weight"], got["megatron_grad_weight"], name="grad weight vs Megatron",
                     **megatron_tol)
        assert_close(got["logp"], logp, name="logp vs one process", **tol)
        assert_close(got["entropy"], entropy, name="entropy vs one process", **tol)
        assert_close(got["grad_hidden"], h.grad, name="grad hidden vs one process", **tol)
        assert_close(got["grad_weight"], w.grad[start:end], name="grad weight vs one process", **tol)


# --------------------------------------------------------------------------- GPU
def _device_cases(device):
    """fp32/bf16 through the Triton and (on CUDA, where built) the CUDA row kernels."""
    from lpo_kernels.cuda import cuda_extension_available

    backends = ["triton"] + (["cuda"] if device == "cuda" and cuda_extension_available() else [])
    cases = {}
    for backend in backends:
        cases[f"lpo_fast_f32_{backend}"] = functools.partial(
            _lpo, dtype=F32, mode="fast", backend=backend, packed=False, device=device)
        cases[f"lpo_low_memory_f32_{backend}"] = functools.partial(
            _lpo, dtype=F32, mode="low_memory", backend=backend, packed=True, device=device)
        cases[f"logprobs_bf16_{backend}"] = functools.partial(
            _logprobs, dtype=torch.bfloat16, backend=backend, device=device)
    return cases


def _device_worker(rank, world, port, out_dir, device):
    """Two ranks on one GPU (gloo moves CUDA tensors; NCCL needs one GPU per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tp = dict(group=dist.group.WORLD, world=world, rank=rank)
        results = {name: case(tp) for name, case in _device_cases(device).items()}
        torch.save({name: {k: v.cpu() for k, v in r.items()} for name, r in results.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def check_device_backends(device):
    ranks = _spawn(_device_worker, 2, device)
    tolerance = {"f32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=2e-2, atol=3e-2)}
    for name, case in _device_cases(device).items():
        expected = {k: v.cpu() for k, v in case(None).items()}
        tol = next(t for key, t in tolerance.items() if key in name)
        for rank, results in enumerate(ranks):
            got = results[name]
            start = sum(SPLITS[2][:rank])
            rows = slice(start, start + SPLITS[2][rank])
            for key, want in expected.items():
                want = want[rows] if key in ("grad_weight", "grad_bias") else want
                assert_close(got[key], want, name=f"{name} rank {rank} {key}", **tol)
    return sorted(_device_cases(device))


@pytest.mark.gpu
def test_gpu_vocab_parallel_triton_and_cuda_backends():
    assert check_device_backends("cuda")
