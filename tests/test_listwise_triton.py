"""Parity of the Triton listwise step (lpo_kernels/ops/listwise.py) with reference.py.

On CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay tiny; ``@pytest.mark.gpu`` tests repeat the checks at larger sizes."""

import math

import pytest
import torch

from lpo_kernels import lpo_loss
from lpo_kernels.ops import listwise as triton_listwise
from lpo_kernels.stats import LPOStats
from tests.utils import assert_close, call_lpo, make_listwise_case

STAT_FIELDS = list(LPOStats.__dataclass_fields__)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output buffer starts as NaN: an element a kernel forgot to write shows."""
    monkeypatch.setattr(triton_listwise, "POISON_OUTPUTS", True)


def fast_path(case, k=4):
    """The same case with group_ids dropped: groups are consecutive rows of k."""
    case = dict(case)
    case["group_ids"] = None
    return case, dict(group_size=k)


def check_parity(case, *, tol=1e-5, grad_tol=None, **options):
    loss, stats, grad = call_lpo(case, backend="triton", **options)
    ref_loss, ref_stats, ref_grad = call_lpo(case, backend="torch", **options)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, atol=tol, rtol=tol, name="loss")
    grad_tol = tol if grad_tol is None else grad_tol
    assert grad.dtype == ref_grad.dtype
    assert_close(grad, ref_grad, atol=grad_tol * 0.1, rtol=grad_tol, name="grad")
    for name in STAT_FIELDS:
        got, want = getattr(stats, name), getattr(ref_stats, name)
        assert got.dim() == 0 and got.dtype == want.dtype, name
        assert not got.requires_grad, name
        assert_close(got, want, atol=tol, rtol=tol, name=name)
    return loss, stats, grad


# Every option value appears at least once, in combinations that exercise both passes.
OPTION_SETS = [
    dict(),
    dict(target="dr_grpo", divergence="reverse_kl", clip="ppo", reduction="sum"),
    dict(target="rloo", divergence="alpha", alpha=0.3, seq_reduce="sum", clip="none"),
    dict(target="maxrl", divergence="js", clip="ppo", clip_eps_low=0.1, clip_eps_high=0.3,
         reduction="none"),
    dict(target="softmax", tau=0.7, divergence="forward_kl", seq_reduce="sum", reduction="none"),
    dict(target="advantages", divergence="reverse_kl", eps=0.0, clip_eps_low=1.0),
    dict(target="grpo", divergence="alpha", alpha=0.8, clip="ppo", reduction="sum"),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_fast_path_every_option(options):
    case = make_listwise_case(n_groups=3, max_len=9, empty_prob=0.15, score_scale=0.4,
                              target=options.get("target", "grpo"), seed=3,
                              binary_rewards=options.get("target") == "maxrl")
    case, layout = fast_path(case)
    check_parity(case, **layout, **options)


@pytest.mark.parametrize("options", OPTION_SETS[:5], ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_general_path_unsorted_sparse_unequal(options):
    case = make_listwise_case(group_sizes=[3, 1, 6, 2], max_len=8, empty_prob=0.2,
                              shuffle=True, sparse_ids=True, score_scale=0.4,
                              target=options.get("target", "grpo"), seed=5,
                              binary_rewards=options.get("target") == "maxrl")
    check_parity(case, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_packed_fast_and_general(reduction):
    case = make_listwise_case(n_groups=3, max_len=11, packed=True, empty_prob=0.2, seed=7,
                              binary_rewards=True)
    check_parity(case, reduction=reduction)                      # general path
    check_parity(*fast_path(case)[:1], group_size=4, reduction=reduction)  # fast path


def test_general_path_groups_larger_than_a_chunk():
    """Groups of 20 and 37 members: the general kernel's member passes take several
    chunks (BLOCK_K = 16)."""
    case = make_listwise_case(group_sizes=[20, 3, 37], max_len=4, shuffle=True, empty_prob=0.2,
                              seed=6)
    check_parity(case, divergence="alpha", clip="ppo")
    check_parity(case, target="rloo", divergence="reverse_kl", reduction="none")


def test_packed_unequal_groups_general():
    case = make_listwise_case(group_sizes=[5, 1, 2], max_len=13, packed=True, shuffle=True,
                              empty_prob=0.25, seed=8)
    check_parity(case, divergence="js", clip="ppo")


def test_group_size_one_and_empty_groups():
    """K=1 groups have D=0 and c=0 but count in G; a group whose every response is empty
    does not count."""
    case = make_listwise_case(group_sizes=[1, 1, 1, 1, 1, 1], max_len=5, seed=9)
    case["mask"][2:4] = False  # two of the six single-response groups become empty
    case, layout = fast_path(case, k=1)
    loss, stats, grad = check_parity(case, **layout)
    assert int(stats.n_groups) == 4 and float(loss) == 0.0
    assert torch.count_nonzero(grad) == 0

    case = make_listwise_case(n_groups=3, max_len=6, seed=10)
    case["mask"][4:8] = False  # the middle group has no counted token at all
    check_parity(case, divergence="reverse_kl")
    check_parity(*fast_path(case)[:1], group_size=4, reduction="none")


def test_all_responses_empty_gives_zero_loss_and_gradient():
    case = make_listwise_case(n_groups=2, max_len=4, seed=11)
    case["mask"] = torch.zeros_like(case["mask"])
    for layout in ({}, {"group_size": 4}):
        loss, stats, grad = check_parity(case if not layout else fast_path(case)[0], **layout)
        assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0
        assert int(stats.n_groups) == 0 and int(stats.n_tokens) == 0


def test_extreme_scores_stay_finite():
    """|s| in the hundreds: the group softmax must work in log-space."""
    case = make_listwise_case(n_groups=2, max_len=12, score_scale=60.0, seed=12)
    for divergence in ("forward_kl", "reverse_kl", "alpha", "js"):
        loss, _, grad = check_parity(*fast_path(case)[:1], group_size=4, seq_reduce="sum",
                                     divergence=divergence, clip="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    check_parity(case, seq_reduce="sum", divergence="alpha", target="softmax", tau=1e-3)


def test_long_sequences_several_tiles():
    case = make_listwise_case(n_groups=2, group_sizes=[2, 2], max_len=300, seed=13)
    check_parity(*fast_path(case, k=2)[:1], group_size=2, clip="ppo")
    check_parity(case, reduction="sum")


def test_on_policy_without_mask_and_float_mask_weights():
    case = make_listwise_case(n_groups=2, max_len=6, seed=14)
    case["old_logp"] = None  # on-policy: P uniform, delta = 0
    case["mask"] = None
    check_parity(*fast_path(case)[:1], group_size=4)
    check_parity(case, divergence="js")

    case = make_listwise_case(n_groups=2, max_len=6, seed=15)
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(case["mask"].shape, generator=g) + 0.5
    case["mask"] = torch.where(case["mask"], weights, torch.zeros_like(weights))
    check_parity(*fast_path(case)[:1], group_size=4, clip="ppo")
    check_parity(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(dtype):
    """Both backends upcast the same half inputs to fp32: the Triton error against an fp64
    ground truth is no worse than the reference's, plus slack."""
    case = make_listwise_case(n_groups=3, max_len=10, dtype=dtype, empty_prob=0.1, seed=16)
    loss, stats, grad = check_parity(*fast_path(case)[:1], group_size=4)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    check_parity(case, reduction="none", divergence="alpha")

    exact = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in case.items()}
    truth_loss, _, truth_grad = call_lpo(exact, backend="torch")
    ref_loss, _, ref_grad = call_lpo(case, backend="torch")
    err = (loss.double() - truth_loss).abs()
    ref_err = (ref_loss.double() - truth_loss).abs()
    assert err <= ref_err + 1e-6
    grad_err = (grad.double() - truth_grad).abs().max()
    ref_grad_err = (ref_grad.double() - truth_grad).abs().max()
    assert grad_err <= ref_grad_err * 1.01 + 1e-6


def test_fp64_inputs_compute_in_fp64():
    case = make_listwise_case(n_groups=3, max_len=8, dtype=torch.float64, empty_prob=0.1, seed=17)
    loss, stats, grad = check_parity(*fast_path(case)[:1], group_size=4, tol=1e-10,
                                     divergence="js")
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    check_parity(case, tol=1e-10, target="rloo", clip="ppo")


def test_large_groups_use_general_path(monkeypatch):
    monkeypatch.setattr(triton_listwise, "MAX_FUSED_GROUP", 2)
    case = make_listwise_case(n_groups=3, max_len=6, seed=18)
    check_parity(*fast_path(case)[:1], group_size=4, reduction="none")
    # ids are labels only: row blocks in descending id order keep row-block order
    case["group_ids"] = 10 - case["group_ids"]
    check_parity(case, group_size=4, reduction="none")


def test_stats_are_views_of_one_buffer_without_grad():
    case = make_listwise_case(n_groups=2, max_len=5, seed=19)
    case, layout = fast_path(case)
    _, stats = lpo_loss(case["logp"], case["old_logp"], case["mask"], None,
                        rewards=case["rewards"], backend="triton", **layout)
    assert stats.n_tokens.dtype == torch.int64 and stats.divergence.dtype == torch.float32
    assert all(not getattr(stats, f).requires_grad for f in STAT_FIELDS)


# --------------------------------------------------------------------------- GPU only
def _cuda_case(**kwargs):
    case = make_listwise_case(device="cuda", **kwargs)
    return case


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(OPTION_SETS)))
def test_gpu_parity_large(index):
    """Every option set once (padded and packed alternate, to bound compile time)."""
    options, packed = OPTION_SETS[index], index % 2 == 1
    case = _cuda_case(n_groups=256, group_sizes=[8] * 256, max_len=200, packed=packed,
                      empty_prob=0.05, target=options.get("target", "grpo"), seed=21,
                      binary_rewards=options.get("target") == "maxrl")
    check_parity(*fast_path(case, k=8)[:1], group_size=8, tol=1e-4, **options)
    shuffled = _cuda_case(group_sizes=[1, 3, 8, 17, 200, 5] * 10, max_len=100, packed=packed,
                          shuffle=True, sparse_ids=True, empty_prob=0.05,
                          target=options.get("target", "grpo"), seed=22,
                          binary_rewards=options.get("target") == "maxrl")
    check_parity(shuffled, tol=1e-4, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gpu_dtypes(dtype):
    case = _cuda_case(n_groups=64, group_sizes=[8] * 64, max_len=256, dtype=dtype, seed=23)
    tol = 1e-9 if dtype == torch.float64 else 1e-4  # fp64: scalar options pass as fp32
    check_parity(*fast_path(case, k=8)[:1], group_size=8, tol=max(tol, 1e-6), divergence="alpha",
                 alpha=0.5)
    check_parity(case, tol=max(tol, 1e-6))


@pytest.mark.gpu
def test_gpu_no_host_sync():
    case = _cuda_case(n_groups=64, group_sizes=[8] * 64, max_len=64, seed=24)
    fast, layout = fast_path(case, k=8)
    call_lpo(fast, backend="triton", **layout)  # warm up (compilation syncs)
    call_lpo(case, backend="triton")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c, kw in ((fast, layout), (case, {})):
            loss, stats = lpo_loss(c["logp"], c["old_logp"], c["mask"], c["group_ids"],
                                   rewards=c["rewards"], backend="triton", **kw)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """A compiled training-step loss traces the Triton op without a graph break."""
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("this torch has no torch.library.triton_op")
    case = _cuda_case(n_groups=32, group_sizes=[8] * 32, max_len=64, seed=25)
    fast, layout = fast_path(case, k=8)

    def step(logp, old, mask, rewards, ids):
        loss, stats = lpo_loss(logp, old, mask, ids, rewards=rewards, backend="triton",
                               group_size=None if ids is not None else 8)
        return loss, stats.divergence, stats.n_tokens

    compiled = torch.compile(step, fullgraph=True)
    shuffled = _cuda_case(group_sizes=[3, 8, 20] * 4, max_len=64, shuffle=True, seed=26)
    for c, ids in ((fast, None), (shuffled, shuffled["group_ids"])):
        logp = c["logp"].detach().clone().requires_grad_()
        loss, div, n_tok = compiled(logp, c["old_logp"], c["mask"], c["rewards"], ids)
        loss.backward()
        ref_loss, ref_stats, ref_grad = call_lpo(c, backend="torch", **({} if ids is not None else layout))
        assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
        assert_close(div, ref_stats.divergence, atol=1e-5, rtol=1e-5, name="divergence")
        assert int(n_tok) == int(ref_stats.n_tokens)
        assert_close(logp.grad, ref_grad, atol=1e-7, rtol=1e-4, name="grad")
    assert not math.isnan(float(loss))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scale_token_grad_one_launch_backward(out_dtype):
    g = torch.Generator().manual_seed(30)
    token_grad = torch.randn(5, 37, generator=g)
    grad_loss, grad_scale = torch.tensor(1.7), torch.tensor(0.25)
    out = triton_listwise.scale_token_grad(grad_loss, token_grad, grad_scale, out_dtype)
    assert out.dtype == out_dtype
    # bf16: one rounding of the same fp32 product (the interpreter may truncate: 1 ulp)
    rtol = 0.0 if out_dtype == torch.float32 else 2.0 ** -7
    assert_close(out.float(), grad_loss * grad_scale * token_grad, atol=0, rtol=rtol)
    out = triton_listwise.scale_token_grad(grad_loss, token_grad.double(), None, torch.float64)
    assert_close(out, grad_loss.double() * token_grad.double(), atol=0, rtol=0)


def test_torch_compile_traces_without_graph_break():
    """Dynamo traces lpo_loss(backend="triton") through the triton_op custom ops with
    fullgraph=True (fast and general path). Runs in a subprocess without the interpreter
    (the ops are registered only for compiled kernels); the graph is never executed."""
    import os
    import subprocess
    import sys

    script = r'''
import torch
from lpo_kernels import lpo_loss
from lpo_kernels.ops import listwise
from tests.utils import make_listwise_case
assert listwise._OPS is not None, "triton_op not registered"
case = make_listwise_case(n_groups=2, max_len=5)
class Traced(Exception): pass
graphs = []
def backend(gm, example_inputs):
    graphs.append(gm)
    def run(*args):
        raise Traced()
    return run
for kw in (dict(group_size=4), dict()):
    def step(logp, old, mask, rewards, ids):
        loss, stats = lpo_loss(logp, old, mask, ids, rewards=rewards, backend="triton",
                               validate=False, **kw)
        return loss, stats.divergence, stats.n_tokens
    torch._dynamo.reset()
    graphs.clear()
    try:
        torch.compile(step, fullgraph=True, backend=backend)(
            case["logp"], case["old_logp"], case["mask"], case["rewards"],
            None if kw else case["group_ids"])
    except Traced:
        pass
    ops = [str(n.target) for n in graphs[0].graph.nodes if "lpo_kernels" in str(n.target)]
    assert len(graphs) == 1 and ops, (kw, ops)
    print(kw, ops)
# inductor/AOT autograd run the op bodies on fake tensors: launches must go through
# wrap_triton there (a direct launch would read a fake tensor's data pointer)
from torch._subclasses.fake_tensor import FakeTensorMode
args = ("grpo", "forward_kl", 0.5, 1.0, 1e-6, "mean", "clamp", -0.2, 0.2, "mean")
with FakeTensorMode():
    logp, old, v = torch.randn(8, 5), torch.randn(8, 5), torch.randn(8)
    mask = torch.ones(8, 5, dtype=torch.bool)
    fused = listwise._fused_groups_impl(logp, old, mask, v, None, 4, *args)
    general = listwise._general_impl(logp, old, mask, v, None, torch.arange(8) // 4, *args)
assert fused[0].shape == (8, 5) and general[0].shape == (8, 5)
print("fake tensors ok")
# inductor passes float scalars as fp64: the group kernels must still compile (sm_90,
# ahead of time, no GPU needed); loop-carried values must keep the compute dtype
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
int_ptrs = {"sorted_ids_ptr": "*i64", "order_ptr": "*i64", "ends_ptr": "*i64", "cu_ptr": "*i32",
            "mask_ptr": "*i1", "partials_ptr": "*fp64"}
fp64_ptrs = {**int_ptrs, "logp_ptr": "*fp64", "old_ptr": "*fp64", "values_ptr": "*fp64",
             "grad_ptr": "*fp64", "group_loss_ptr": "*fp64"}
packed = dict(PACKED=True, HAS_OLD=True, HAS_MASK=False, TARGET="grpo", DIVERGENCE="alpha",
              SEQ_REDUCE="mean", CLIP="clamp", N_PARTIALS=11, BLOCK_K=8, BLOCK_T=64)
for kernel, consts, ptrs in (
        (listwise._segmented_groups_kernel, dict(TARGET="grpo", DIVERGENCE="alpha",
            SEQ_REDUCE="mean", N_PARTIALS=11, BLOCK_K=16), int_ptrs),
        (listwise._listwise_groups_kernel, dict(PACKED=False, HAS_OLD=True, HAS_MASK=True,
            TARGET="maxrl", DIVERGENCE="js", SEQ_REDUCE="mean", CLIP="ppo", N_PARTIALS=11,
            BLOCK_K=8, BLOCK_T=64), int_ptrs),
        # packed offsets clamped + the zero fill; the fp64 branches of the issue-13 helpers
        (listwise._listwise_groups_kernel, packed, int_ptrs),
        (listwise._listwise_groups_kernel, packed, fp64_ptrs),
        (listwise._sequence_grad_kernel, dict(PACKED=True, HAS_OLD=True, HAS_MASK=False,
            CLIP="ppo", N_PARTIALS=11, BLOCK_S=4, BLOCK_T=256), int_ptrs)):
    names = [p.name for p in kernel.params]
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32") if n.endswith("_ptr")
           else "i32" if n in ("T", "K", "n_seqs", "n_tokens") else "fp64" for n in names}
    src = ASTSource(fn=kernel, signature=sig,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
print("fp64 scalars compile")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "listwise_fused_groups" in proc.stdout and "listwise_general" in proc.stdout
    assert "fake tensors ok" in proc.stdout and "fp64 scalars compile" in proc.stdout
