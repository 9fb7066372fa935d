"""CUDA vs Triton: the loss head's row kernels and the listwise step, on a GPU.

    python csrc/bench_cuda.py [--quick] [--out results.md]

Prints a markdown table: median time (triton.testing.do_bench), achieved GB/s (bytes that
must move once: row stats read the logits once; the in-place gradient reads and writes them;
the listwise step reads logp/old_logp/mask and writes the gradient) and the ratio to the
copy bandwidth measured in the same run (a torch copy: read + write). Shapes are those of
shared/docs/performance.md: logits [N, V=151936] bf16, listwise 1M and 16.8M tokens."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpo_kernels import cuda as cuda_backend  # noqa: E402
from lpo_kernels import lpo_loss  # noqa: E402


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")  # ms


def copy_bandwidth() -> float:
    src = torch.empty(2 ** 30 // 2, dtype=torch.bfloat16, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6  # GB/s


def row_kernels(n: int, vocab: int, rows: list, copy_gbs: float) -> None:
    logits = (torch.randn(n, vocab, device="cuda") * 2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    grad_logp = torch.randn(n, device="cuda")
    size = logits.numel() * logits.element_size()
    backends = {"cuda": (cuda_backend.logits_row_stats_cuda, cuda_backend.logits_grad_inplace_cuda)}
    try:
        from lpo_kernels.ops.loss_head import logits_grad_inplace_triton, logits_row_stats_triton

        backends["triton"] = (logits_row_stats_triton, logits_grad_inplace_triton)
    except ImportError as error:
        print(f"triton row kernels unavailable: {error}", file=sys.stderr)
    lse = cuda_backend.logits_row_stats_cuda(logits, targets, 1.0, False)[0]
    for name, (stats, grad) in backends.items():
        for entropy in (False, True):
            ms = bench(lambda: stats(logits, targets, 1.0, entropy))
            rows.append((f"row stats{' + entropy' if entropy else ''} [{n}, {vocab}] bf16", name, ms, size, copy_gbs))
        work = logits.clone()
        ms = bench(lambda: grad(work, targets, lse, grad_logp, 1.0))
        rows.append((f"grad in place [{n}, {vocab}] bf16", name, ms, 2 * size, copy_gbs))
        work = None  # free before the next backend clones


def listwise(groups: int, k: int, length: int, rows: list, copy_gbs: float) -> None:
    b = groups * k
    logp = (-torch.rand(b, length, device="cuda") * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn_like(logp)
    lengths = torch.randint(length // 2, length + 1, (b,), device="cuda")
    mask = torch.arange(length, device="cuda")[None, :] < lengths[:, None]
    ids = torch.arange(b, device="cuda") // k
    rewards = torch.randn(b, device="cuda")
    size = sum(x.numel() * x.element_size() for x in (logp, old, mask, logp))  # + grad write
    for backend in ("cuda", "triton", "torch"):
        def step():
            logp.grad = None
            loss, _ = lpo_loss(logp, old, mask, ids, rewards, backend=backend, group_size=k)
            loss.backward()
        try:
            ms = bench(step)
        except Exception as error:  # noqa: BLE001 - a missing backend is a row, not a crash
            print(f"listwise {backend}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        rows.append((f"listwise fwd+bwd {groups}x{k}x{length} ({b * length / 1e6:.1f}M tok) fp32", backend, ms,
                     size, copy_gbs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller logits (N=4096)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    start = time.time()
    copy_gbs = copy_bandwidth()
    rows: list = []
    row_kernels(4096 if args.quick else 16384, 151936, rows, copy_gbs)
    torch.cuda.empty_cache()
    for shape in ((4096, 8, 32), (512, 8, 256), (4096, 8, 512)):
        listwise(*shape, rows, copy_gbs)
    p = torch.cuda.get_device_properties(0)
    lines = [f"GPU {p.name}, torch {torch.__version__}, copy bandwidth {copy_gbs:.0f} GB/s (read+write)", "",
             "| work | backend | ms | GB/s | / copy |", "|---|---|---|---|---|"]
    for work, backend, ms, nbytes, copy in rows:
        gbs = nbytes / ms / 1e6
        lines.append(f"| {work} | {backend} | {ms:.3f} | {gbs:.0f} | {gbs / copy:.2f} |")
    lines.append(f"\n(total {time.time() - start:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
