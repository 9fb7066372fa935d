"""pytest-benchmark suite: small CPU cases, for tracking the torch paths between commits.

Not part of the default test run (pyproject's testpaths is tests/). Run it explicitly:

    python -m pytest benchmarks/test_cpu_suite.py --benchmark-only
    python -m pytest benchmarks/test_cpu_suite.py --benchmark-autosave   # then --benchmark-compare

CPU timings are not the product's numbers; use ``python -m benchmarks`` on a GPU for those.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import methods as M  # noqa: E402
from benchmarks.cases import listwise_inputs, logprob_inputs, loss_head_inputs  # noqa: E402

CPU = torch.device("cpu")
CTX = M.Context(device=CPU)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(64, 8, 32), (8, 8, 256)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["listwise_eager"])
def test_listwise_step(benchmark, method, shape):
    benchmark.group = f"listwise {shape}"
    fn = M.LISTWISE_METHODS[method](listwise_inputs(*shape, CPU), CTX)
    grads = benchmark(fn)
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("method", ["gemm_floor", "naive_grpo_eager", "naive_lpo_eager"])
def test_loss_head(benchmark, method):
    benchmark.group = "loss head N=512 H=128 V=2000"
    inputs = loss_head_inputs(2, 4, 64, 128, 2000, CPU, dtype=torch.float32)
    fn = M.HEAD_METHODS[method](inputs, CTX)
    grads = benchmark(fn)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["trl_logp_plus_entropy", "naive_head_logp_entropy"])
def test_logprob_pass(benchmark, method):
    benchmark.group = "logprob N=512 H=128 V=2000"
    inputs = logprob_inputs(8, 64, 128, 2000, CPU, dtype=torch.float32)
    out = benchmark(M.LOGPROB_METHODS[method](inputs, CTX))
    assert all(torch.isfinite(o).all() for o in out)
