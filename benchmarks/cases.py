"""What is measured: random inputs (never zeros) and the shapes of each run mode.

Loss-head shapes follow performance.md: N = n_groups x group_size x seq_len tokens,
response lengths drawn uniformly in [T/2, T] (the rest is masked padding), bf16 hidden
states and LM head. The listwise step takes fp32 per-token log-probs and an int32 mask
(TRL's completion_mask), 16 bytes per token read+written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- inputs
def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _lengths_mask(n_seqs: int, seq_len: int, device, gen, min_frac: float = 0.5) -> torch.Tensor:
    """int32 [B, T] mask of random response lengths in [min_frac·T, T] (default [T/2, T])."""
    lengths = torch.randint(max(1, math.ceil(min_frac * seq_len)), seq_len + 1, (n_seqs,),
                            device=device, generator=gen)
    return (torch.arange(seq_len, device=device)[None, :] < lengths[:, None]).to(torch.int32)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages: rewards standardised within each group of consecutive rows."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)


@torch.no_grad()
def _current_logp(hidden2d, weight, targets1d, chunk: int = 2048) -> torch.Tensor:
    out = torch.empty(targets1d.shape[0], device=hidden2d.device, dtype=torch.float32)
    for s in range(0, targets1d.shape[0], chunk):
        logits = F.linear(hidden2d[s:s + chunk], weight).float()
        out[s:s + chunk] = logits.log_softmax(-1).gather(-1, targets1d[s:s + chunk, None])[:, 0]
    return out


def loss_head_inputs(n_groups: int, group_size: int, seq_len: int, hidden_size: int,
                     vocab: int, device, dtype=torch.bfloat16, seed: int = 0,
                     min_frac: float = 0.5) -> dict:
    """Hidden states [B, T, H] and LM head [V, H] (both requiring grad), targets, mask,
    consecutive groups, rewards, GRPO advantages, and old log-probs near the current ones
    (so the clip gates fire on some tokens, as in training)."""
    device = torch.device(device)
    gen = _generator(device, seed)
    B, T, H, V = n_groups * group_size, seq_len, hidden_size, vocab
    hidden = torch.randn(B, T, H, device=device, generator=gen, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=gen, dtype=torch.float32)
              * (2.0 / math.sqrt(H))).to(dtype)
    targets = torch.randint(0, V, (B, T), device=device, generator=gen)
    mask = _lengths_mask(B, T, device, gen, min_frac)
    rewards = torch.randn(B, device=device, generator=gen)
    logp = _current_logp(hidden.view(-1, H), weight, targets.view(-1)).view(B, T)
    old_logp = logp + 0.1 * torch.randn(B, T, device=device, generator=gen)
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(),
                target_ids=targets, mask=mask, group_ids=torch.arange(B, device=device) // group_size,
                rewards=rewards, advantages=group_advantages(rewards, group_size),
                old_logp=old_logp, group_size=group_size)


def listwise_inputs(n_groups: int, group_size: int, seq_len: int, device, seed: int = 0,
                    n_sets: int = 1) -> dict:
    """``n_sets`` independent input sets (rotated through so L2 never holds them all)."""
    device = torch.device(device)
    gen = _generator(device, seed)
    B, T = n_groups * group_size, seq_len
    sets = []
    for _ in range(n_sets):
        logp = -3.0 * torch.rand(B, T, device=device, generator=gen)
        sets.append(dict(
            logp=logp.requires_grad_(),
            old_logp=logp.detach() + 0.1 * torch.randn(B, T, device=device, generator=gen),
            mask=_lengths_mask(B, T, device, gen),
            group_ids=torch.arange(B, device=device) // group_size,
            rewards=torch.randn(B, device=device, generator=gen),
        ))
    return dict(sets=sets, group_size=group_size)


def listwise_bytes(n_groups: int, group_size: int, seq_len: int) -> int:
    """Read logp, old_logp (fp32), mask (int32); write grad (fp32); per sequence read a
    group id (int64) and a reward (fp32)."""
    B = n_groups * group_size
    return B * seq_len * 16 + B * 12


def logprob_inputs(n_seqs: int, seq_len: int, hidden_size: int, vocab: int, device,
                   dtype=torch.bfloat16, seed: int = 0) -> dict:
    device = torch.device(device)
    gen = _generator(device, seed)
    hidden = torch.randn(n_seqs, seq_len, hidden_size, device=device, generator=gen,
                         dtype=torch.float32).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen, dtype=torch.float32)
              * (2.0 / math.sqrt(hidden_size))).to(dtype)
    targets = torch.randint(0, vocab, (n_seqs, seq_len), device=device, generator=gen)
    with torch.no_grad():
        logits = F.linear(hidden, weight)  # bf16 logits, as a trainer holds them
    return dict(hidden=hidden, weight=weight, target_ids=targets, logits=logits)


# ----------------------------------------------------------------------------- plans
@dataclass
class Case:
    suite: str          # loss_head | loss_head_n | loss_head_v | loss_head_k | listwise | listwise_k | logprob
    name: str
    shape: dict         # n_groups, group_size, seq_len (+ hidden, vocab)
    methods: list = field(default_factory=list)  # None = every method of the suite

    @property
    def n_tokens(self) -> int:
        s = self.shape
        return s.get("n_groups", 1) * s.get("group_size", 1) * s["seq_len"]


HEAD_ALL = None
HEAD_SWEEP = ["gemm_floor", "naive_grpo_eager", "naive_lpo_eager", "liger_triton_grpo",
              "cce_grpo", "lpo_fused_fast_triton", "lpo_fused_low_memory_triton",
              "lpo_fused_fast_cuda", "lpo_fused_low_memory_cuda"]
HEAD_OURS = ["gemm_floor", "liger_triton_grpo", "lpo_fused_fast_triton",
             "lpo_fused_low_memory_triton", "lpo_fused_fast_cuda", "lpo_fused_low_memory_cuda"]


# loss_head_pad: lengths in [0.1·T, T] (~45% padding, RLVR-like spread): the padding-free
# head (lpo_kernels/padding_free.py) against the peers' floor over every padded position
HEAD_PAD = ["gemm_floor", "gemm_floor_real_tokens", "naive_grpo_eager", "liger_triton_grpo",
            "liger_fused_linear_grpo", "cce_grpo", "lpo_fused_fast_triton",
            "lpo_fused_low_memory_triton", "lpo_fused_fast_cuda", "lpo_fused_low_memory_cuda"]


def _head(suite, n_groups, k, t, h, v, methods=HEAD_ALL, min_frac=None):
    n = n_groups * k * t
    shape = dict(n_groups=n_groups, group_size=k, seq_len=t, hidden=h, vocab=v)
    if min_frac is not None:
        shape["min_frac"] = min_frac
    return Case(suite, f"N{n}_H{h}_V{v}_K{k}_T{t}" + ("" if min_frac is None else f"_len{min_frac:g}T"),
                shape, methods)


LISTWISE_NO_COMPILE = ["listwise_eager", "listwise_triton", "listwise_cuda"]


def _listwise(suite, n_groups, k, t, methods=None):
    return Case(suite, f"{n_groups}x{k}x{t}", dict(n_groups=n_groups, group_size=k, seq_len=t),
                methods)


def _logprob(n_seqs, t, h, v):
    return Case("logprob", f"N{n_seqs * t}_H{h}_V{v}",
                dict(n_groups=1, group_size=n_seqs, seq_len=t, hidden=h, vocab=v))


def gpu_plan(quick: bool = False) -> list[Case]:
    """performance.md's shapes first (they matter most if the time budget runs out)."""
    H = 4096
    plan = [
        _head("loss_head", 2, 8, 1024, H, 151936),       # N=16384
        _listwise("listwise", 4096, 8, 32),              # 1M tokens
        _logprob(16, 1024, H, 151936),                   # no-grad logp + entropy
    ]
    if quick:
        return plan
    plan += [
        _head("loss_head", 4, 8, 1024, H, 128256),       # N=32768
        _listwise("listwise", 512, 8, 256),              # 1M tokens, long responses
        _listwise("listwise", 4096, 8, 512),             # 16.8M tokens
    ]
    plan += [_head("loss_head_pad", 2, 8, 1024, H, 151936, HEAD_PAD, min_frac=0.1)]
    plan += [_head("loss_head_n", g, 8, 1024, H, 151936, HEAD_SWEEP) for g in (1, 4, 8)]
    plan += [_head("loss_head_v", 2, 8, 1024, H, v, HEAD_OURS) for v in (32000, 65536, 128256)]
    plan += [_head("loss_head_k", 16 // k, k, 1024, H, 151936, HEAD_OURS) for k in (4, 16)]
    # each group size is a new torch.compile graph (it is a Python int): compile left out
    plan += [_listwise("listwise_k", (1 << 20) // (k * 32), k, 32, LISTWISE_NO_COMPILE)
             for k in (2, 4, 16, 32)]
    return plan


def cpu_plan(quick: bool = False) -> list[Case]:
    """Tiny shapes that run in seconds on a CPU (V not a multiple of any block size)."""
    H, V = 64, 500
    plan = [
        _head("loss_head", 2, 4, 16, H, V),
        _listwise("listwise", 16, 4, 16),
        _logprob(4, 16, H, V),
    ]
    if quick:
        return plan
    plan += [_listwise("listwise", 4, 4, 64)]
    plan += [_head("loss_head_pad", 2, 4, 16, H, V, HEAD_PAD, min_frac=0.1)]
    plan += [_head("loss_head_n", g, 4, 16, H, V, HEAD_SWEEP) for g in (1, 4)]
    plan += [_head("loss_head_v", 2, 4, 16, H, 250, HEAD_OURS)]
    plan += [_head("loss_head_k", 4, 2, 16, H, V, HEAD_OURS)]
    plan += [_listwise("listwise_k", 16, 2, 16, LISTWISE_NO_COMPILE)]
    return plan
