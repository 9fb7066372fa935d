"""The CSV's columns and reader, kept free of torch so reports rebuild fast anywhere."""

from __future__ import annotations

import csv

# Every CSV row has exactly these columns (tests/test_benchmarks.py checks them).
COLUMNS = [
    "suite", "case", "method", "status", "error",
    "n_tokens", "hidden", "vocab", "group_size", "seq_len", "n_seqs", "dtype",
    "median_ms", "min_ms", "reps", "flops", "bytes", "tflops", "gbps", "peak_extra_gib",
    "rel_err", "parity_ref",
    "device", "gpu_name", "torch", "triton", "lpo_kernels", "liger_kernel",
    "cut_cross_entropy", "git_commit", "date", "note",
]

CPU_WARNING = ("CPU run: tiny smoke shapes, timings are NOT the product's numbers "
               "(the product runs on CUDA GPUs; see benchmarks/gpu_check.sh).")


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
