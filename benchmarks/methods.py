"""Every implementation measured, as ``factory(inputs, ctx) -> fn``.

``fn()`` runs one forward+backward (loss head, listwise step) or one no-grad pass
(log-prob) and returns what it produced. A factory raises ``Skip`` when its method cannot
run here (peer not installed, needs CUDA, extension not built); anything raised by ``fn``
becomes an error row. Peers and lpo-kernels' newer modules are imported lazily, inside the
factories, so a missing one costs one row, never the run.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Skip


@dataclass
class Context:
    device: torch.device
    interpret: bool = False       # CPU only: run Triton methods through the interpreter
    compile_on_cpu: bool = False  # CPU only: torch.compile (slow to compile)


def _import(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Skip(f"{what} not importable ({exc})") from None


def _needs_gpu(ctx: Context, what: str):
    if ctx.device.type != "cuda" and not ctx.interpret:
        raise Skip(f"{what} needs a CUDA device (CPU: --interpret runs Triton's interpreter)")


def _needs_backend(ctx: Context, backend: str):
    if backend == "cuda":
        if ctx.device.type != "cuda":
            raise Skip("backend='cuda' needs a CUDA device")
        _import("lpo_kernels._cuda", "CUDA extension lpo_kernels._cuda (build: see csrc/)")
    else:
        _needs_gpu(ctx, f"backend={backend!r}")


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ============================================================================ loss head
def _three_gemms(h, w):
    def fn():
        logits = h @ w.t()
        return logits @ w, logits.t() @ h
    return fn


def gemm_floor(inp, ctx):
    """The 3 GEMMs any loss head does (logits, grad-hidden, grad-weight), cuBLAS via torch,
    on random data (the logits stand in for the logits-gradient)."""
    h = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])
    return _three_gemms(h, inp["weight"].detach())


def gemm_floor_real_tokens(inp, ctx):
    """The same 3 GEMMs over the unmasked tokens only: the floor of a padding-free head
    (the real rows are gathered once, outside the timed call)."""
    h = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])
    return _three_gemms(h[inp["mask"].reshape(-1) != 0], inp["weight"].detach())


def naive_grpo_eager(inp, ctx):
    """TRL's path: full logits, fp32 log-softmax, gather, GRPO loss (loss_type='grpo')."""
    from lpo_kernels.reference import naive_linear_grpo_loss

    def fn():
        loss, _ = naive_linear_grpo_loss(inp["hidden"], inp["weight"], inp["target_ids"],
                                         inp["mask"], inp["advantages"], old_logp=inp["old_logp"],
                                         loss_type="grpo")
        return _grads(loss, [inp["hidden"], inp["weight"]])
    return fn


def naive_lpo_eager(inp, ctx):
    """The naive head, then the eager reference LPO loss (default options)."""
    from lpo_kernels.reference import naive_linear_lpo_loss

    def fn():
        loss, _ = naive_linear_lpo_loss(inp["hidden"], inp["weight"], inp["target_ids"],
                                        inp["mask"], inp["group_ids"], inp["rewards"],
                                        old_logp=inp["old_logp"])
        return _grads(loss, [inp["hidden"], inp["weight"]])
    return fn


def liger_fused_linear_grpo(inp, ctx):
    """Liger-Kernel's chunked LigerFusedLinearGRPOLoss (torch.compile'd chunks on CUDA)."""
    chunked = _import("liger_kernel.chunked_loss", "liger-kernel")
    module = chunked.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                              compiled=ctx.device.type == "cuda")

    def fn():
        out = module(inp["hidden"], inp["weight"], inp["target_ids"], inp["mask"],
                     inp["advantages"], old_per_token_logps=inp["old_logp"])
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return _grads(loss, [inp["hidden"], inp["weight"]])
    return fn


def liger_triton_grpo(inp, ctx):
    """Liger-Kernel's triton_grpo_loss on materialised bf16 logits. It takes logits of
    T+1 positions (it drops the last), so hidden is padded by one position per sequence
    (+1/T GEMM work)."""
    _needs_gpu(ctx, "liger triton_grpo_loss")
    mod = _import("liger_kernel.transformers.grpo_loss", "liger-kernel")

    def fn():
        logits = F.linear(F.pad(inp["hidden"], (0, 0, 0, 1)), inp["weight"])
        loss, _ = mod.triton_grpo_loss(logits, inp["old_logp"], None, inp["target_ids"],
                                       inp["advantages"], inp["mask"], temperature=1.0,
                                       beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="grpo",
                                       reduce=True)
        return _grads(loss, [inp["hidden"], inp["weight"]])
    return fn


def cce_grpo(inp, ctx):
    """cut-cross-entropy's per-token NLL (never materialises logits), then GRPO on -NLL."""
    _needs_gpu(ctx, "cut-cross-entropy")
    cce = _import("cut_cross_entropy", "cut-cross-entropy")
    from lpo_kernels import grpo_loss

    def fn():
        nll = cce.linear_cross_entropy(inp["hidden"], inp["weight"], inp["target_ids"],
                                       reduction="none")
        loss, _ = grpo_loss(-nll.float(), inp["old_logp"], inp["mask"], inp["advantages"],
                            loss_type="grpo")
        return _grads(loss, [inp["hidden"], inp["weight"]])
    return fn


def _lpo_fused(mode: str, backend: str, grad_weight_fp32="auto"):
    def factory(inp, ctx):
        _needs_backend(ctx, backend)
        mod = _import("lpo_kernels.fused_linear", "lpo_kernels.fused_linear")

        def fn():
            loss, _ = mod.fused_linear_lpo_loss(
                inp["hidden"], inp["weight"], inp["target_ids"], inp["mask"], inp["group_ids"],
                inp["rewards"], old_logp=inp["old_logp"], group_size=inp["group_size"],
                mode=mode, backend=backend, grad_weight_fp32=grad_weight_fp32)
            return _grads(loss, [inp["hidden"], inp["weight"]])
        return fn
    factory.__doc__ = (f"lpo-kernels fused_linear_lpo_loss(mode={mode!r}, backend={backend!r}, "
                       f"grad_weight_fp32={grad_weight_fp32!r}).")
    return factory


HEAD_METHODS = {
    "gemm_floor": gemm_floor,
    "gemm_floor_real_tokens": gemm_floor_real_tokens,
    "naive_grpo_eager": naive_grpo_eager,
    "naive_lpo_eager": naive_lpo_eager,
    "liger_fused_linear_grpo": liger_fused_linear_grpo,
    "liger_triton_grpo": liger_triton_grpo,
    "cce_grpo": cce_grpo,
    "lpo_fused_fast_triton": _lpo_fused("fast", "triton"),
    "lpo_fused_low_memory_triton": _lpo_fused("low_memory", "triton"),
    "lpo_fused_fast_cuda": _lpo_fused("fast", "cuda"),
    "lpo_fused_low_memory_cuda": _lpo_fused("low_memory", "cuda"),
    # fast mode's grad-weight sum over chunks forced either way (the default "auto" picks
    # the weight's dtype for <= 2 chunks, else fp32; low_memory has no such choice)
    "lpo_fused_fast_triton_gw16": _lpo_fused("fast", "triton", grad_weight_fp32=False),
    "lpo_fused_fast_triton_gw32": _lpo_fused("fast", "triton", grad_weight_fp32=True),
}


# ============================================================================ listwise step
class _Rotation:
    """Cycles through independent input sets so timed calls do not hit a warm L2.
    ``reset()`` (attached to the method's fn) makes the next call use set 0, so every
    method's parity-check call sees the same inputs."""

    def __init__(self, sets):
        self.sets, self.i = sets, 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s

    def reset(self):
        self.i = 0


def _listwise_backend(backend: str):
    def factory(inp, ctx):
        if backend != "torch":
            _needs_backend(ctx, backend)
        from lpo_kernels import lpo_loss

        rot, k = _Rotation(inp["sets"]), inp["group_size"]

        def fn():
            s = rot.next()
            loss, _ = lpo_loss(s["logp"], s["old_logp"], s["mask"], s["group_ids"], s["rewards"],
                               group_size=k, backend=backend, validate=False)
            return _grads(loss, [s["logp"]])
        fn.reset = rot.reset
        return fn
    factory.__doc__ = f"lpo_loss(backend={backend!r}) forward + backward."
    return factory


def listwise_compile(inp, ctx):
    """torch.compile(dynamic=True) of the reference listwise step (loss, stats and the
    per-token gradient, which the contract forms in the forward; backward is one multiply)."""
    if ctx.device.type != "cuda" and not ctx.compile_on_cpu:
        raise Skip("torch.compile is skipped on CPU (slow to compile; --compile-on-cpu runs it)")
    from lpo_kernels import reference
    from lpo_kernels.inputs import ListwiseBatch
    from lpo_kernels.options import LPOOptions
    from lpo_kernels.stats import LPOStats

    options = LPOOptions()
    stat_names = [f.name for f in dataclasses.fields(LPOStats)]
    k = inp["group_size"]

    def step(logp, old_logp, mask, group_ids, rewards):
        batch = ListwiseBatch(logp=logp, old_logp=old_logp, mask=mask, group_ids=group_ids,
                              rewards=rewards, advantages=None, cu_seqlens=None, group_size=k,
                              n_seqs=logp.shape[0])
        result = reference.listwise_forward(batch, options)
        return (result.loss, result.token_grad) + tuple(getattr(result.stats, n) for n in stat_names)

    compiled = _compiled_steps.setdefault(k, torch.compile(step, dynamic=True))
    rot = _Rotation(inp["sets"])

    def fn():
        s = rot.next()
        with torch.no_grad():
            out = compiled(s["logp"].detach(), s["old_logp"], s["mask"], s["group_ids"], s["rewards"])
        return (out[1],)  # d loss / d logp (grad_output = 1), as the other methods return
    fn.reset = rot.reset
    return fn


_compiled_steps: dict = {}  # one compiled step per group size, reused across shapes

LISTWISE_METHODS = {
    "listwise_eager": _listwise_backend("torch"),
    "listwise_compile": listwise_compile,
    "listwise_triton": _listwise_backend("triton"),
    "listwise_cuda": _listwise_backend("cuda"),
}


# ============================================================================ log-prob pass
def trl_selective_log_softmax(logits, index):
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py): row-by-row log_softmax for
    half-precision logits (to bound memory), logsumexp-gather for fp32."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    out = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        out.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def trl_entropy_from_logits(logits, chunk_size: int = 128):
    """TRL's ``entropy_from_logits``: chunks of rows, log_softmax, -(p log p).sum."""
    flat = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(entropies).reshape(logits.shape[:-1])


def _no_grad(fn):
    def wrapped():
        with torch.no_grad():
            return fn()
    return wrapped


def trl_logp(inp, ctx):
    """TRL selective_log_softmax on the bf16 logits (logits given, not timed)."""
    return _no_grad(lambda: trl_selective_log_softmax(inp["logits"], inp["target_ids"]))


def trl_entropy(inp, ctx):
    """TRL entropy_from_logits on the bf16 logits."""
    return _no_grad(lambda: trl_entropy_from_logits(inp["logits"]))


def trl_logp_entropy(inp, ctx):
    """Both TRL passes, as a trainer computing log-probs and entropy runs them."""
    return _no_grad(lambda: (trl_selective_log_softmax(inp["logits"], inp["target_ids"]),
                             trl_entropy_from_logits(inp["logits"])))


def naive_head_logp_entropy(inp, ctx):
    """From hidden states: the reference's naive head (full fp32 logits) + entropy."""
    from lpo_kernels.reference import naive_linear_logprobs

    return _no_grad(lambda: naive_linear_logprobs(inp["hidden"], inp["weight"], inp["target_ids"],
                                                  return_entropy=True))


def gemm_logits(inp, ctx):
    """The one GEMM a log-prob pass from hidden states must do (bf16 logits)."""
    return _no_grad(lambda: F.linear(inp["hidden"], inp["weight"]))


def lpo_fused_logp_entropy(inp, ctx):
    """lpo-kernels fused_linear_logprobs(return_entropy=True) from hidden states."""
    _needs_gpu(ctx, "fused_linear_logprobs")
    mod = _import("lpo_kernels.fused_linear", "lpo_kernels.fused_linear")
    return _no_grad(lambda: mod.fused_linear_logprobs(inp["hidden"], inp["weight"],
                                                      inp["target_ids"], return_entropy=True))


def _row_stats(backend: str):
    def factory(inp, ctx):
        _needs_backend(ctx, backend)
        row_kernels = _import("lpo_kernels.ops.loss_head", "lpo_kernels.ops.loss_head").row_kernels
        row_stats = row_kernels(backend)[0]
        logits, targets = inp["logits"], inp["target_ids"]
        flat = logits.view(-1, logits.shape[-1])

        def fn():
            _, logp, entropy = row_stats(flat, targets.reshape(-1), 1.0, return_entropy=True)
            return logp.view(targets.shape), entropy.view(targets.shape)
        return _no_grad(fn)
    factory.__doc__ = f"lpo-kernels' loss-head row kernel ({backend}) on the bf16 logits: logp + entropy."
    return factory


def _row_grad_inplace(backend: str):
    def factory(inp, ctx):
        _needs_backend(ctx, backend)
        row_kernels = _import("lpo_kernels.ops.loss_head", "lpo_kernels.ops.loss_head").row_kernels
        row_stats, grad_inplace = row_kernels(backend)
        flat = inp["logits"].view(-1, inp["logits"].shape[-1]).clone()  # overwritten in place
        targets = inp["target_ids"].reshape(-1)
        with torch.no_grad():
            lse = row_stats(flat, targets, 1.0)[0]
        grad_logp = torch.randn(flat.shape[0], device=flat.device)

        def fn():
            grad_inplace(flat, targets, lse, grad_logp, 1.0)
            return ()
        return _no_grad(fn)
    factory.__doc__ = f"lpo-kernels' in-place logits-gradient row kernel ({backend}): read + write the logits."
    return factory


LOGPROB_METHODS = {
    "naive_head_logp_entropy": naive_head_logp_entropy,
    "trl_selective_log_softmax": trl_logp,
    "trl_entropy_from_logits": trl_entropy,
    "trl_logp_plus_entropy": trl_logp_entropy,
    "gemm_logits": gemm_logits,
    "lpo_fused_logp_entropy": lpo_fused_logp_entropy,
    "row_stats_triton": _row_stats("triton"),
    "row_stats_cuda": _row_stats("cuda"),
    "row_grad_inplace_triton": _row_grad_inplace("triton"),
    "row_grad_inplace_cuda": _row_grad_inplace("cuda"),
}

# Parity: each method's outputs (grads of hidden and weight; d loss/d logp; logp and
# entropy) against a reference method measured earlier in the same case, same inputs.
PARITY = {
    "liger_fused_linear_grpo": "naive_grpo_eager",
    "liger_triton_grpo": "naive_grpo_eager",
    "cce_grpo": "naive_grpo_eager",
    **{f"lpo_fused_{m}_{b}": "naive_lpo_eager" for m in ("fast", "low_memory") for b in ("triton", "cuda")},
    **{f"lpo_fused_fast_triton_gw{b}": "naive_lpo_eager" for b in (16, 32)},
    **{f"listwise_{b}": "listwise_eager" for b in ("compile", "triton", "cuda")},
    "trl_logp_plus_entropy": "naive_head_logp_entropy",
    "lpo_fused_logp_entropy": "naive_head_logp_entropy",
    "row_stats_triton": "naive_head_logp_entropy",
    "row_stats_cuda": "naive_head_logp_entropy",
}
PARITY_REFERENCES = set(PARITY.values())

# Rows derived from the measured copy bandwidth rather than timed.
DERIVED = {"listwise": "read_write_once", "logprob": "read_logits_once"}
