"""Markdown table and PNG plots from a benchmark CSV.

``python -m benchmarks.report out/bench/bench.csv [OUT_DIR]`` rebuilds them, e.g. from
the CSV of a run that was stopped half-way (rows are written as they are measured)."""

from __future__ import annotations

import os
import sys

from .schema import CPU_WARNING, read_csv

FLOOR = {"loss_head": "gemm_floor", "listwise": "read_write_once", "logprob": "read_logits_once"}
TITLES = {
    "ceilings": "Ceilings measured in this run",
    "loss_head": "Loss head, forward + backward (grads of hidden and weight), performance.md shapes",
    "loss_head_n": "Loss head: sweep over N (V=151936 on GPU)",
    "loss_head_v": "Loss head: sweep over V",
    "loss_head_k": "Loss head: sweep over group size",
    "loss_head_pad": "Loss head at ~45% padding (lengths 10-100% of T): floor = 3 GEMMs over every padded position",
    "listwise": "Listwise step alone, forward + backward, from per-token log-probs",
    "listwise_k": "Listwise step: sweep over group size (about 1M tokens)",
    "logprob": "No-grad log-prob + entropy pass",
}


def _f(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _floor_of(suite: str) -> str | None:
    return FLOOR.get(suite.split("_")[0] if suite.startswith("listwise") else
                     ("loss_head" if suite.startswith("loss_head") else suite))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "# lpo-kernels benchmark\n\nNo rows.\n"
    env = rows[0]
    lines = [f"# lpo-kernels benchmark: {env['gpu_name']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env['triton']}, lpo-kernels {env['lpo_kernels']} "
             f"(commit {env['git_commit'] or '?'}), liger-kernel {env['liger_kernel'] or 'not installed'}, "
             f"cut-cross-entropy {env['cut_cross_entropy'] or 'not installed'}.", ""]
    if env["device"] != "cuda":
        lines += [f"**{CPU_WARNING}**", ""]
    lines += ["Times: median (and min) of timed calls after warm-up (CUDA events; host clock on "
              "CPU). Peak extra: "
              "max_memory_allocated during one call minus the allocation before it (outputs "
              "such as gradients included, inputs not). Loss-head TFLOP/s count 6·N·H·V (the "
              "3-GEMM floor's work) whatever a method does; `x floor` = time / the floor row "
              "of the same case (3 GEMMs; read+write once at the measured copy bandwidth). `rel err` = "
              "max over outputs (grads of hidden and weight; d loss/d logp; log-probs and entropy) of "
              "‖out − ref‖/‖ref‖ against the naive eager method of the same loss on the same inputs "
              "(GRPO peers against naive GRPO, LPO against naive LPO; CSV column parity_ref).", ""]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for suite in suites:
        sub = [r for r in rows if r["suite"] == suite]
        lines += [f"## {TITLES.get(suite, suite)}", "",
                  "| case | method | median ms | min ms | TFLOP/s | GB/s | peak extra GiB | x floor | rel err | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        floor_name = _floor_of(suite)
        floors = {r["case"]: _f(r["median_ms"]) for r in sub if r["method"] == floor_name}
        for r in sub:
            med, floor = _f(r["median_ms"]), floors.get(r["case"])
            ratio = f"{med / floor:.2f}" if med and floor else ""
            status = r["status"] if r["status"] in ("ok", "derived") else \
                f"{r['status']}: {r['error'][:120].replace('|', '/')}"
            lines.append(f"| {r['case']} | {r['method']} | {r['median_ms']} | {r['min_ms']} | "
                         f"{r['tflops']} | {r['gbps']} | {r['peak_extra_gib']} | {ratio} | {r['rel_err']} | {status} |")
        lines.append("")
    return "\n".join(lines)


def _sweep_rows(rows: list[dict]) -> list[dict]:
    """Loss-head rows sharing the N sweep's H, V, K and T (the main case included)."""
    sweep = [r for r in rows if r["suite"] == "loss_head_n"]
    if not sweep:
        return []
    key = lambda r: (r["hidden"], r["vocab"], r["group_size"], r["seq_len"])  # noqa: E731
    keys = {key(r) for r in sweep}
    return [r for r in rows if r["suite"] in ("loss_head", "loss_head_n") and key(r) in keys
            and r["status"] == "ok"]


def plots(rows: list[dict], out_dir: str) -> list[str]:
    """time_vs_n.png and memory_vs_n.png (log-log), one line per method."""
    data = _sweep_rows(rows)
    if not data:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    env = rows[0]
    for column, label, name in (("median_ms", "time per fwd+bwd (ms)", "time_vs_n.png"),
                                ("peak_extra_gib", "peak extra memory (GiB)", "memory_vs_n.png")):
        series = {}
        for r in data:
            y = _f(r[column])
            if y is not None and y > 0:
                series.setdefault(r["method"], []).append((int(r["n_tokens"]), y))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N tokens")
        ax.set_ylabel(label)
        r0 = data[0]
        title = f"loss head, H={r0['hidden']} V={r0['vocab']} K={r0['group_size']} T={r0['seq_len']}\n{env['gpu_name']}"
        if env["device"] != "cuda":
            title += " (CPU smoke: not product numbers)"
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(csv_path: str, out_dir: str) -> list[str]:
    rows = read_csv(csv_path)
    md_path = os.path.join(out_dir, "bench.md")
    with open(md_path, "w") as f:
        f.write(markdown(rows))
    written = [csv_path, md_path]
    try:
        written += plots(rows, out_dir)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the table
        print(f"plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return written


# The comparisons the goals in performance.md are stated against.
REFERENCES = {
    "loss_head": ("gemm_floor", "liger_triton_grpo", "naive_grpo_eager"),
    "listwise": ("read_write_once", "listwise_eager", "listwise_compile"),
    "logprob": ("read_logits_once", "trl_logp_plus_entropy", "gemm_logits"),
}


def summary(rows: list[dict]) -> str:
    """Short plain-text lines: each measured method's time, memory and its ratios to the
    references of its suite (floor, fastest peer / eager, ...)."""
    out = []
    for r in rows:
        if r["status"] not in ("ok", "derived"):
            if r["status"] == "error":  # skipped rows (not installed, no CUDA) stay in bench.md
                out.append(f"{r['suite']:<10} {r['case']:<26} {r['method']:<28} {r['status']}: {r['error'][:70]}")
            continue
        fam = "loss_head" if r["suite"].startswith("loss_head") else (
            "listwise" if r["suite"].startswith("listwise") else r["suite"])
        med = _f(r["median_ms"])
        same = {x["method"]: _f(x["median_ms"]) for x in rows
                if x["suite"] == r["suite"] and x["case"] == r["case"]}
        ratios = " ".join(f"x{ref}={med / same[ref]:.2f}" for ref in REFERENCES.get(fam, ())
                          if ref != r["method"] and same.get(ref) and med)
        mem = f"{_f(r['peak_extra_gib']):.2f}GiB" if _f(r["peak_extra_gib"]) is not None else ""
        parity = f" rel_err={r['rel_err']}" if r.get("rel_err") else ""
        out.append(f"{r['suite']:<10} {r['case']:<26} {r['method']:<28} {med:>10.4f}ms {mem:>9} {ratios}{parity}")
    return "\n".join(out)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--summary"]
    if not args:
        sys.exit("usage: python -m benchmarks.report [--summary] BENCH_CSV [OUT_DIR]")
    if "--summary" in sys.argv:
        print(summary(read_csv(args[0])))
    else:
        out = args[1] if len(args) > 1 else os.path.dirname(os.path.abspath(args[0]))
        print("\n".join(write_report(args[0], out)))
