"""Benchmarks for lpo-kernels: every implementation side by side, in one process.

Run ``python -m benchmarks`` (``--help`` for filters). On a CUDA GPU it times the
performance.md shapes; on a CPU it runs tiny smoke shapes whose timings are NOT the
product's numbers. ``benchmarks/gpu_check.sh`` is the one-call script for a lent GPU.
"""
