"""``python -m benchmarks``: run every implementation side by side, write CSV, markdown
and plots. ``--help`` lists the filters; see benchmarks/README.md."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import cases as C
from . import harness as H
from . import methods as M
from . import report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--out", default="out/bench", help="folder for bench.csv, bench.md, *.png")
    p.add_argument("--quick", action="store_true",
                   help="only the first performance.md shape of each suite, fewer reps")
    p.add_argument("--only", default="", help="comma-separated substrings of "
                   "'suite/case/method'; a measurement runs if any matches (e.g. 'listwise', "
                   "'lpo_fused', 'N16384_H4096_V151936')")
    p.add_argument("--skip", default="", help="comma-separated substrings to leave out")
    p.add_argument("--cpu", action="store_true", help="run the CPU smoke shapes even with a GPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (GPU default 270)")
    p.add_argument("--case-timeout-s", type=float, default=None,
                   help="per-method limit, compilation included (GPU default 75)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run Triton methods through TRITON_INTERPRET (slow)")
    p.add_argument("--compile-on-cpu", action="store_true", help="CPU: also time torch.compile")
    p.add_argument("--resume", action="store_true",
                   help="append to OUT/bench.csv, measuring only what it does not hold yet")
    p.add_argument("--list", action="store_true", help="print the planned measurements and exit")
    return p.parse_args(argv)


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def selected(key: str, only: list[str], skip: list[str]) -> bool:
    if only and not any(t in key for t in only):
        return False
    return not any(t in key for t in skip)


def suite_methods(suite: str) -> dict:
    if suite.startswith("loss_head"):
        return M.HEAD_METHODS
    if suite.startswith("listwise"):
        return M.LISTWISE_METHODS
    return M.LOGPROB_METHODS


def timing_params(suite: str, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(warmup=1, min_reps=2, max_reps=5, target_ms=10.0)
    if suite.startswith("listwise"):
        return dict(warmup=3, min_reps=20, max_reps=200, target_ms=100.0)
    return dict(warmup=1, min_reps=3, max_reps=10, target_ms=500.0)


def make_inputs(case: C.Case, device: torch.device) -> dict:
    s = case.shape
    if case.suite.startswith("loss_head"):
        return C.loss_head_inputs(s["n_groups"], s["group_size"], s["seq_len"], s["hidden"],
                                  s["vocab"], device, min_frac=s.get("min_frac", 0.5))
    if case.suite.startswith("listwise"):
        one_set = C.listwise_bytes(s["n_groups"], s["group_size"], s["seq_len"])
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) \
            if device.type == "cuda" else 0
        n_sets = max(1, min(8, -(-2 * l2 // one_set)))  # >= 2x L2 in total, at most 8 sets
        return C.listwise_inputs(s["n_groups"], s["group_size"], s["seq_len"], device,
                                 n_sets=n_sets)
    return C.logprob_inputs(s["group_size"], s["seq_len"], s["hidden"], s["vocab"], device)


def work(case: C.Case, method: str) -> tuple[int | None, int | None]:
    """(flops, bytes) the method's rate is quoted against."""
    s, n = case.shape, case.n_tokens
    if case.suite.startswith("loss_head"):
        return 6 * n * s["hidden"] * s["vocab"], None  # the floor's FLOPs, whatever the method does
    if case.suite.startswith("listwise"):
        return None, C.listwise_bytes(s["n_groups"], s["group_size"], s["seq_len"])
    if method.startswith(("trl_", "read_logits", "row_stats")):
        return None, n * s["vocab"] * 2               # reading the bf16 logits once
    if method.startswith("row_grad"):
        return None, 2 * n * s["vocab"] * 2           # reading and writing them once
    return 2 * n * s["hidden"] * s["vocab"], None     # the logits GEMM from hidden states


def base_row(case: C.Case, method: str, env: dict) -> dict:
    s = case.shape
    flops, nbytes = work(case, method)
    return dict(env, suite=case.suite, case=case.name, method=method, n_tokens=case.n_tokens,
                hidden=s.get("hidden"), vocab=s.get("vocab"), group_size=s.get("group_size"),
                seq_len=s["seq_len"], n_seqs=s.get("n_groups", 1) * s.get("group_size", 1),
                dtype="bf16" if "hidden" in s else "fp32", flops=flops, bytes=nbytes)


def with_rates(row: dict, median_ms: float) -> dict:
    if row.get("flops"):
        row["tflops"] = float(f"{row['flops'] / (median_ms * 1e-3) / 1e12:.4g}")
    if row.get("bytes"):
        row["gbps"] = float(f"{row['bytes'] / (median_ms * 1e-3) / 1e9:.4g}")
    return row


def measure_ceilings(device: torch.device, env: dict, writer: H.CsvWriter, log) -> dict:
    """Copy bandwidth (bytes read + written) and a bf16 GEMM's rate, measured here."""
    found = {}
    n_copy = (1 << 28) if device.type == "cuda" else (1 << 22)   # 1 GiB / 16 MiB of fp32
    n_mm = 8192 if device.type == "cuda" else 256
    for method, flops, nbytes, build in (
        ("copy_bandwidth", None, 2 * 4 * n_copy,
         lambda: (torch.rand(n_copy, device=device), torch.empty(n_copy, device=device))),
        ("gemm_bf16", 2 * n_mm ** 3, None,
         lambda: (torch.randn(n_mm, n_mm, device=device, dtype=torch.bfloat16),
                  torch.randn(n_mm, n_mm, device=device, dtype=torch.bfloat16))),
    ):
        row = dict(env, suite="ceilings", case=f"{'n' if nbytes else 'mnk'}{n_copy if nbytes else n_mm}",
                   method=method, flops=flops, bytes=nbytes, dtype="fp32" if nbytes else "bf16")
        try:
            a, b = build()
            fn = (lambda: b.copy_(a)) if nbytes else (lambda: a @ b)
            median, best, reps = H.time_call(fn, device, warmup=3, min_reps=10, max_reps=50,
                                             target_ms=100.0)
            row.update(status="ok", median_ms=round(median, 4), min_ms=round(best, 4), reps=reps)
            with_rates(row, median)
            found[method] = (nbytes or flops) / (median * 1e-3)
            del a, b
        except Exception as exc:  # noqa: BLE001 - a failed ceiling is a row, not a crash
            row.update(status="error", error=H.short_error(exc))
        writer.write(row)
        log(row)
    H.free_memory(device)
    return found


def run_case(case, env, writer, ctx, args, deadline, copy_bw, log, only, skip, done=frozenset()):
    device = ctx.device
    methods = suite_methods(case.suite)

    def wanted(m):
        key = f"{case.suite}/{case.name}/{m}"
        return selected(key, only, skip) and (case.suite, case.name, m) not in done

    names = [m for m in (case.methods or methods) if m in methods and wanted(m)]
    derived = M.DERIVED.get(case.suite.split("_")[0] if case.suite.startswith("listwise") else case.suite)
    if derived and not wanted(derived):
        derived = None
    if not names and not derived:
        return
    if derived:
        row = base_row(case, derived, env)
        if copy_bw:
            median = row["bytes"] / copy_bw * 1e3
            row.update(status="derived", median_ms=round(median, 5), min_ms=round(median, 5),
                       note="bytes / measured copy bandwidth (read+write)")
            with_rates(row, median)
        else:
            row.update(status="skipped", error="copy bandwidth not measured")
        writer.write(row)
        log(row)
    if time.monotonic() > deadline:
        for m in names:
            writer.write(dict(base_row(case, m, env), status="skipped",
                              error="time budget (--budget-s) spent"))
        log(dict(case=case.name, method="*", status="skipped (time budget)"))
        return
    try:
        inputs = make_inputs(case, device)
    except Exception as exc:  # noqa: BLE001
        for m in names:
            writer.write(dict(base_row(case, m, env), status="error",
                              error="inputs: " + H.short_error(exc)))
        log(dict(case=case.name, method="*", status="error", error=H.short_error(exc)))
        H.free_memory(device)
        return
    params = timing_params(case.suite, device)
    references = {}  # outputs of the parity references (M.PARITY) measured in this case
    for m in names:
        row = base_row(case, m, env)
        if time.monotonic() > deadline:
            row.update(status="skipped", error="time budget (--budget-s) spent")
        else:
            result, outputs = _measure(methods[m], inputs, ctx, params, args.case_timeout_s)
            row.update(result)
            if row.get("median_ms") is not None:
                with_rates(row, row["median_ms"])
            ref = M.PARITY.get(m)
            if outputs is not None and ref in references:
                err = H.relative_error(outputs, references[ref])
                row.update(rel_err=None if err is None else float(f"{err:.3g}"), parity_ref=ref)
            if outputs is not None and m in M.PARITY_REFERENCES:
                references[m] = outputs
            del outputs
            if row["status"] == "error" and device.type == "cuda" and not H.cuda_alive():
                row["error"] = "CUDA context lost: " + row["error"]
                writer.write(row)
                log(row)
                raise H.ContextLost(m)
        writer.write(row)
        log(row)
        H.free_memory(device)
    del inputs, references
    H.free_memory(device)


def _measure(factory, inputs, ctx, params, limit) -> tuple[dict, object]:
    """(row fields, outputs of one call, or None)."""
    fn = None
    try:
        with H.time_limit(limit):
            fn = factory(inputs, ctx)
            median, best, reps = H.time_call(fn, ctx.device, **params)
            if hasattr(fn, "reset"):
                fn.reset()
            peak, outputs = H.peak_extra_gib(fn, ctx.device)
        return dict(status="ok", median_ms=round(median, 4), min_ms=round(best, 4), reps=reps,
                    peak_extra_gib=None if peak is None else round(peak, 3)), outputs
    except H.Skip as exc:
        return dict(status="skipped", error=str(exc)), None
    except Exception as exc:  # noqa: BLE001 - OOM, a peer's bug, a timeout: record, go on
        return dict(status="error", error=H.short_error(exc)), None
    finally:
        del fn


def _log_line(row: dict) -> None:
    parts = [f"{row.get('suite', ''):<12}", f"{row.get('case', ''):<28}", f"{row.get('method', ''):<28}",
             f"{row.get('status', ''):<8}"]
    if row.get("median_ms") is not None:
        parts.append(f"{row['median_ms']:>10.4f} ms")
        if row.get("tflops"):
            parts.append(f"{row['tflops']:>7.1f} TFLOP/s")
        if row.get("gbps"):
            parts.append(f"{row['gbps']:>9.1f} GB/s")
        if row.get("peak_extra_gib") is not None:
            parts.append(f"{row['peak_extra_gib']:>8.3f} GiB")
        if row.get("rel_err") is not None:
            parts.append(f"rel_err {row['rel_err']:.2e} vs {row['parity_ref']}")
    if row.get("error"):
        parts.append(str(row["error"])[:160])
    print("  ".join(parts), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    if device.type == "cpu" and args.interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)  # tiny shapes: threads only add contention on shared CPUs
    if args.budget_s is None:
        args.budget_s = 270.0 if on_gpu else 120.0
    if args.case_timeout_s is None:
        args.case_timeout_s = 75.0 if on_gpu else 60.0
    plan = C.gpu_plan(args.quick) if on_gpu else C.cpu_plan(args.quick)
    only, skip = _tokens(args.only), _tokens(args.skip)

    if args.list:
        for case in plan:
            methods = suite_methods(case.suite)
            for m in case.methods or methods:
                key = f"{case.suite}/{case.name}/{m}"
                if selected(key, only, skip):
                    print(key)
        return 0

    env = H.environment(device)
    print(f"lpo-kernels benchmark on {env['gpu_name']}: torch {env['torch']}, triton "
          f"{env['triton']}, lpo-kernels {env['lpo_kernels']}, liger-kernel "
          f"{env['liger_kernel'] or '-'}, cut-cross-entropy {env['cut_cross_entropy'] or '-'}",
          flush=True)
    if not on_gpu:
        print("NOTE: " + H.CPU_WARNING, flush=True)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench.csv")
    earlier = H.read_csv(csv_path) if args.resume and os.path.exists(csv_path) else []
    done = frozenset((r["suite"], r["case"], r["method"]) for r in earlier)
    writer = H.CsvWriter(csv_path, append=args.resume)
    ctx = M.Context(device=device, interpret=args.interpret, compile_on_cpu=args.compile_on_cpu)
    start = time.monotonic()
    deadline = start + args.budget_s
    status = 0
    try:
        copy_rows = [r for r in earlier if r["method"] == "copy_bandwidth" and r["status"] == "ok"]
        if copy_rows:
            copy_bw = float(copy_rows[0]["bytes"]) / (float(copy_rows[0]["median_ms"]) * 1e-3)
        else:
            copy_bw = measure_ceilings(device, env, writer, _log_line).get("copy_bandwidth")
        for case in plan:
            run_case(case, env, writer, ctx, args, deadline, copy_bw, _log_line, only, skip, done)
    except H.ContextLost as exc:
        # gpu_check.sh looks for this line, then resumes with --skip <method>
        print(f"CUDA_CONTEXT_LOST method={exc.args[0]}", flush=True)
        status = 3
    finally:
        writer.close()
        print(f"measured in {time.monotonic() - start:.1f} s; CSV: {csv_path}", flush=True)
        written = report.write_report(csv_path, args.out)
        print("wrote " + ", ".join(written), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
