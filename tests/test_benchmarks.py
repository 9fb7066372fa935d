"""The benchmark suite's CPU smoke mode (what CI runs) and its measuring helpers.

CPU timings mean nothing; these tests check that a run completes, that every row has
every column, that failures become rows instead of crashes, and that the TRL-style
baselines compute what they claim."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness as H
from benchmarks import methods as M
from benchmarks import report
from benchmarks.__main__ import selected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_MUST_RUN = {"gemm_floor", "naive_grpo_eager", "naive_lpo_eager", "listwise_eager",
                "trl_selective_log_softmax", "trl_entropy_from_logits", "trl_logp_plus_entropy",
                "naive_head_logp_entropy", "gemm_logits", "copy_bandwidth", "gemm_bf16"}


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One CPU smoke run of the whole plan, through benchmarks/gpu_check.sh (the script the
    GPU machine runs), with the GPU-only steps left out."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(_env(), OUT=str(out), SKIP_WHEELS="1", SKIP_BUILD="1", SKIP_TESTS="1",
               BENCH_ARGS="--cpu", GPU_CHECK_TOTAL_S="200")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    return out, proc.stdout, header, rows


def test_smoke_csv_has_every_column_and_row(smoke_run):
    out, stdout, header, rows = smoke_run
    assert header == H.COLUMNS
    assert all(None not in r and set(r) == set(H.COLUMNS) for r in rows)
    assert {r["suite"] for r in rows} >= {"ceilings", "loss_head", "loss_head_n", "loss_head_v",
                                          "loss_head_k", "listwise", "listwise_k", "logprob"}
    # every (method, case) appears once, with a known status and run metadata
    keys = [(r["suite"], r["case"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys))
    for r in rows:
        assert r["status"] in {"ok", "skipped", "error", "derived"}, r
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["date"]
        if r["status"] in {"skipped", "error"}:
            assert r["error"], r
    # each suite lists all its methods, including peers that are not installed here
    head_methods = {r["method"] for r in rows if r["suite"] == "loss_head"}
    assert head_methods == set(M.HEAD_METHODS)
    assert {r["method"] for r in rows if r["suite"] == "listwise"} == set(M.LISTWISE_METHODS) | {"read_write_once"}


def test_smoke_measures_the_cpu_methods(smoke_run):
    _, _, _, rows = smoke_run
    for r in rows:
        if r["method"] in CPU_MUST_RUN:
            assert r["status"] == "ok", r
            median, best = float(r["median_ms"]), float(r["min_ms"])
            assert 0 < best <= median and int(r["reps"]) >= 2
            rate = float(r["tflops"] or 0) or float(r["gbps"] or 0)
            assert rate > 0 or r["method"] in {"listwise_eager"}, r
    parity = [r for r in rows if r["method"] == "trl_logp_plus_entropy"]
    assert parity and all(r["parity_ref"] == "naive_head_logp_entropy" and 0 < float(r["rel_err"]) < 0.05
                          for r in parity)  # TRL on bf16 logits vs the fp32 naive head
    for r in rows:  # work counts follow the shapes
        if r["suite"] == "loss_head" and r["status"] == "ok":
            n, h, v = int(r["n_tokens"]), int(r["hidden"]), int(r["vocab"])
            assert int(r["flops"]) == 6 * n * h * v


def test_smoke_says_cpu_numbers_are_not_product_numbers(smoke_run):
    out, stdout, _, _ = smoke_run
    assert "NOT the product's numbers" in stdout
    md = (out / "bench.md").read_text()
    assert "NOT the product's numbers" in md and "| gemm_floor |" in md
    assert (out / "time_vs_n.png").stat().st_size > 1000
    assert report.summary(H.read_csv(str(out / "bench.csv")))


def test_gpu_check_script_respects_the_file_limit(smoke_run):
    out, stdout, _, _ = smoke_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8  # the device tool returns at most 8 files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {"gpu_check.log", "bench.csv", "bench.md"} <= {p.name for p in files}
    assert "benchmark rc=0" in (out / "gpu_check.log").read_text()
    assert "x" in stdout and "gemm_floor" in stdout  # the summary ends the script's output


def test_filters():
    assert selected("loss_head/N1/gemm_floor", [], [])
    assert selected("loss_head/N1/gemm_floor", ["floor", "x"], [])
    assert not selected("loss_head/N1/gemm_floor", ["listwise"], [])
    assert not selected("loss_head/N1/gemm_floor", [], ["gemm"])


def test_failures_become_rows_not_crashes():
    from benchmarks.__main__ import _measure

    ctx = M.Context(device=torch.device("cpu"))
    params = dict(warmup=0, min_reps=1, max_reps=2, target_ms=1.0)

    def raising(inp, ctx):
        def fn():
            raise RuntimeError("CUDA out of memory (simulated)")
        return fn

    def skipping(inp, ctx):
        raise H.Skip("peer not installed")

    row, out = _measure(raising, {}, ctx, params, 10)
    assert row["status"] == "error" and "out of memory" in row["error"] and out is None
    assert _measure(skipping, {}, ctx, params, 10) == ({"status": "skipped", "error": "peer not installed"}, None)
    ok, out = _measure(lambda inp, ctx: (lambda: (torch.randn(8) + 1,)), {}, ctx, params, 10)
    assert ok["status"] == "ok" and ok["median_ms"] >= ok["min_ms"] > 0 and out[0].shape == (8,)


def test_relative_error():
    ref = (torch.randn(5, 3), torch.randn(4))
    assert H.relative_error(ref, ref) == 0.0
    off = (ref[0] * 1.01, ref[1])
    assert abs(H.relative_error(off, ref) - 0.01) < 1e-6
    assert H.relative_error((ref[0],), ref) is None
    assert H.relative_error((ref[0], torch.full((4,), float("nan"))), ref) == float("inf")


def test_time_limit_interrupts_python_work():
    import time

    with pytest.raises(H.CaseTimeout):
        with H.time_limit(0.2):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_baselines_match_log_softmax(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 5, 301, generator=g)).to(dtype)
    index = torch.randint(0, 301, (3, 5), generator=g)
    ref = torch.log_softmax(logits.double(), -1)
    expected_logp = ref.gather(-1, index[..., None])[..., 0]
    expected_entropy = -(ref.exp() * ref).sum(-1)
    tol = 1e-4 if dtype == torch.float32 else 0.1  # TRL computes in the logits' dtype
    assert (M.trl_selective_log_softmax(logits, index).double() - expected_logp).abs().max() < tol
    assert (M.trl_entropy_from_logits(logits, chunk_size=4).double() - expected_entropy).abs().max() < tol


def test_markdown_ratios_use_the_floor_of_the_same_case():
    base = dict.fromkeys(H.COLUMNS, "")
    base.update(device="cuda", gpu_name="X", date="d", torch="t", triton="t", lpo_kernels="v")
    rows = [dict(base, suite="loss_head", case="c1", method="gemm_floor", status="ok", median_ms="10"),
            dict(base, suite="loss_head", case="c1", method="naive_grpo_eager", status="ok", median_ms="15"),
            dict(base, suite="loss_head", case="c2", method="gemm_floor", status="ok", median_ms="40"),
            dict(base, suite="loss_head", case="c2", method="cce_grpo", status="error", error="boom | x")]
    md = report.markdown(rows)
    assert "| c1 | naive_grpo_eager | 15 |" in md and "| 1.50 |  | ok |" in md
    assert "error: boom / x" in md and "NOT the product" not in md


def test_loss_head_inputs_are_random_and_consistent():
    from benchmarks.cases import loss_head_inputs

    inp = loss_head_inputs(2, 4, 8, 16, 50, "cpu", dtype=torch.float32)
    B, T = 8, 8
    assert inp["hidden"].shape == (B, T, 16) and inp["weight"].shape == (50, 16)
    assert inp["hidden"].requires_grad and inp["weight"].requires_grad
    lengths = inp["mask"].sum(1)
    assert ((lengths >= T // 2) & (lengths <= T)).all() and (inp["mask"][:, 0] == 1).all()
    assert torch.equal(inp["group_ids"], torch.arange(B) // 4)
    adv = inp["advantages"].view(-1, 4)
    assert adv.mean(1).abs().max() < 1e-5 and (inp["rewards"] != 0).all()
    logp = F.linear(inp["hidden"], inp["weight"]).log_softmax(-1).gather(-1, inp["target_ids"][..., None])[..., 0]
    gap = (inp["old_logp"] - logp).abs()
    assert 0 < gap.mean() < 0.3  # old log-probs near the current ones, not equal


def test_grad_weight_rounding_backs_the_auto_rule(capsys):
    """The measurement behind grad_weight_fp32="auto" (head_chunk.AUTO_WEIGHT_DTYPE_MAX_CHUNKS):
    one chunk adds no error, an fp32 accumulator matches the single GEMM, and adding chunks
    in bf16 costs <= 15% at 2 chunks, growing with the chunk count."""
    from benchmarks import grad_weight_rounding
    from lpo_kernels.head_chunk import AUTO_WEIGHT_DTYPE_MAX_CHUNKS

    rows = grad_weight_rounding.main(["--quick"])
    assert "| half acc / plain |" in capsys.readouterr().out
    by = {(r["logit_std"], r["chunks"]): r for r in rows}
    for (std, k), r in by.items():
        assert abs(r["fp32_acc_vs_plain"] - 1.0) < 0.01, r
        if k == 1:
            assert r["half_acc"] == r["plain"], r
        if k <= AUTO_WEIGHT_DTYPE_MAX_CHUNKS:
            assert r["half_acc_vs_plain"] <= 1.15, r
    assert by[(1.0, 1)]["half_acc_vs_plain"] < by[(1.0, 2)]["half_acc_vs_plain"] < by[(1.0, 4)]["half_acc_vs_plain"]
