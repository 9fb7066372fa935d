"""How much a one-pass head loses by adding its chunks' grad-weight in bf16/fp16 instead of
an fp32 accumulator: the numbers behind ``grad_weight_fp32="auto"``
(``lpo_kernels/head_chunk.py``: the weight's dtype up to 2 chunks, fp32 above).

    python -m benchmarks.grad_weight_rounding [--quick] [--out DIR]

Model (CPU; the GPU's roundings, not its summation order): logits ``h W^T`` rounded once to the
half dtype (the chunk buffer), softmax in fp32, ``d loss / d logits`` rounded to the half
dtype (written over the logits), then grad-weight ``sum_c dz_c^T h_c`` three ways:

- ``plain``: one GEMM over every token, one rounding. This is plain PyTorch's autograd,
  Liger's, and now ``low_memory``'s (``vocab_blocks.py``).
- ``fp32_acc``: each chunk's product added in an fp32 accumulator, rounded once at the
  end (``grad_weight_fp32=True``).
- ``half_acc``: each chunk's product added to the half-precision output, the sum rounded
  once per chunk, as cuBLAS's epilogue does with beta = 1 (fp32 compute, half C)
  (``grad_weight_fp32=False``).

The error is ``||g - g_fp64|| / ||g_fp64||`` against the fp64 gradient of the same
half-precision inputs. The table reports it relative to ``plain``, over chunk counts and
logit scales (std of the logits: 1 = flat softmax, the worst case here; LM heads sit
around 2-4). Deterministic on one machine; another CPU BLAS sums in another order, which can
move the last digits, not the ratios' story.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch

CHUNKS = (1, 2, 3, 4, 8, 16)
LOGIT_STDS = (1.0, 2.0, 4.0, 8.0)


def errors(n_tokens: int, hidden: int, vocab: int, n_chunks: int, logit_std: float, dtype: torch.dtype,
           seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * logit_std / math.sqrt(hidden)).to(dtype)
    y = torch.randint(0, vocab, (n_tokens,), generator=g)
    coef = torch.randn(n_tokens, generator=g, dtype=torch.float64)  # d loss / d logp, O(1): no fp16 subnormals
    rows = torch.arange(n_tokens)
    p64 = torch.softmax(h.double() @ w.double().t(), -1)
    dz64 = -coef[:, None] * p64
    dz64[rows, y] += coef
    truth = dz64.t() @ h.double()
    z = (h.float() @ w.float().t()).to(dtype)
    p = torch.softmax(z.float(), -1)
    dz = -coef.float()[:, None] * p
    dz[rows, y] += coef.float()
    dz = dz.to(dtype)
    plain = (dz.float().t() @ h.float()).to(dtype)
    acc32 = torch.zeros(vocab, hidden)
    acc_half = torch.zeros(vocab, hidden, dtype=dtype)
    bounds = torch.linspace(0, n_tokens, n_chunks + 1).long().tolist()
    for a, b in zip(bounds, bounds[1:]):
        part = dz[a:b].float().t() @ h[a:b].float()
        acc32 += part
        acc_half = (acc_half.float() + part).to(dtype)  # beta = 1: fp32 sum, one rounding
    out = {}
    for name, x in (("plain", plain), ("fp32_acc", acc32.to(dtype)), ("half_acc", acc_half)):
        out[name] = float((x.double() - truth).norm() / truth.norm())
    return out


def table(quick: bool = False) -> list[dict]:
    shape = (1024, 128, 1024) if quick else (4096, 256, 2048)
    seeds = (0,) if quick else (0, 1)
    chunks = (1, 2, 4) if quick else CHUNKS
    stds = (1.0, 4.0) if quick else LOGIT_STDS
    rows = []
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)):
        for std in stds:
            for k in chunks:
                runs = [errors(*shape, k, std, dtype, s) for s in seeds]
                mean = {name: sum(r[name] for r in runs) / len(runs) for name in runs[0]}
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), logit_std=std, chunks=k,
                                 tokens=shape[0], hidden=shape[1], vocab=shape[2],
                                 plain=mean["plain"], fp32_acc=mean["fp32_acc"], half_acc=mean["half_acc"],
                                 fp32_acc_vs_plain=mean["fp32_acc"] / mean["plain"],
                                 half_acc_vs_plain=mean["half_acc"] / mean["plain"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | logit std | chunks | plain (1 GEMM) rel err | fp32 acc / plain | half acc / plain |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['logit_std']:g} | {r['chunks']} | {r['plain']:.2e} | "
                     f"{r['fp32_acc_vs_plain']:.3f} | {r['half_acc_vs_plain']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, bf16 only (seconds)")
    parser.add_argument("--out", type=Path, help="write grad_weight_rounding.{csv,md} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    rows = table(args.quick)
    text = markdown(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "grad_weight_rounding.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "grad_weight_rounding.md").write_text(
            "# grad-weight rounding: one GEMM vs chunks added in fp32 vs in the half dtype\n\n"
            "`python -m benchmarks.grad_weight_rounding` (a CPU model of the GPU's roundings; "
            "see the module docstring). Relative error against fp64, mean of 2 seeds, "
            f"{rows[0]['tokens']} tokens, H={rows[0]['hidden']}, V={rows[0]['vocab']}.\n\n" + text + "\n")
    return rows


if __name__ == "__main__":
    main()
