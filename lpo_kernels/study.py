"""Learning study: does LPO learn better than GRPO? Many seeds, two tasks, paired tests.

    python -m lpo_kernels.demo --study                    # the full study (~1 h, 2 CPU cores)
    python -m lpo_kernels.study --tasks sort --seeds 10   # the same entry point, one task
    python -m lpo_kernels.study --report-only --out docs/study   # redo tables/plots from runs

Every method trains from the same warmed-up model per seed, sees the same prompts and the
same sampling noise at its first step, and aims at the same target (GRPO's group-normalised
advantage = LPO ``target="grpo"``); only the loss differs. Methods: LPO forward-KL and
reverse-KL, GRPO (``loss_type="grpo"``) and GRPO with TRL's default loss type
(``"dapo"``). Tasks (both with a 0/1 verifiable reward):

* ``digit_sum`` (the demo's task): prompt a target t in 0..18, answer 1-3 digits summing
  to t. The warm-up teaches the format only.
* ``sort``: prompt 4 digits, answer them in ascending order then EOS; reward 1 only for
  the exact sorted string (a sparse reward: ~1% at the start). The warm-up teaches to
  answer with a random permutation of the prompt's digits.

Per task and method, over seeds: final reward and pass@K with 95% Student-t intervals,
area under the training reward curve, steps to a reward threshold, entropy over training;
per task a seed-matched paired t-test and exact Wilcoxon signed-rank test of LPO
forward-KL against each GRPO variant. Runs are appended to ``<out>/<task>/runs.jsonl`` as
they finish (an interrupted study resumes where it stopped); the report is
``results.json``, ``table.md`` and ``curves.png`` in ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import demo
from .study_stats import mean_std, paired_t_test, t_interval, t_ppf, wilcoxon_signed_rank


# --------------------------------------------------------------------------- second task
@dataclass(frozen=True)
class SortTask:
    """Prompt ``[BOS, d1..dn]`` (n digits); response: the digits in ascending order, then
    EOS; reward 1 iff exactly that. Prompt ids ("targets") are the digits read as a
    base-10 number. Token ids: digits 0..9, EOS, BOS."""

    length: int = 4
    eval_prompts: int = 64  # fixed evaluation prompts (same for every seed and method)

    digits = 10
    eos = 10
    bos = 11
    vocab_size = 12
    name = "sort"

    @property
    def prompt_len(self) -> int:
        return 1 + self.length

    @property
    def response_len(self) -> int:
        return self.length + 1

    def _digits(self, targets: torch.Tensor) -> torch.Tensor:
        powers = 10 ** torch.arange(self.length - 1, -1, -1, device=targets.device)
        return (targets[:, None] // powers[None, :]) % 10

    def sample_targets(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, 10 ** self.length, (n,), generator=generator, device=device)

    def eval_targets(self, device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(12345)
        return torch.randint(0, 10 ** self.length, (self.eval_prompts,),
                             generator=generator).to(device)

    def prompts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(targets[:, None], self.bos), self._digits(targets)], 1)

    def response_mask(self, response: torch.Tensor) -> torch.Tensor:
        return demo.mask_through_first_eos(response, self.eos)

    def rewards(self, targets: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        want = torch.cat([self._digits(targets).sort(dim=1).values,
                          torch.full_like(targets[:, None], self.eos)], dim=1)
        return (response == want).all(dim=1).float()

    def format_examples(self, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random permutation of the prompt's digits, then EOS: the format and the
        multiset, not the order."""
        d = self._digits(targets)
        order = torch.rand(d.shape, generator=generator, device=d.device).argsort(dim=1)
        return torch.cat([d.gather(1, order), torch.full_like(targets[:, None], self.eos)], 1)


TASKS = {"digit_sum": lambda: demo.DigitSumTask(max_digits=3, max_target=18),
         "sort": lambda: SortTask(length=4)}
STUDY_METHODS = ["lpo_forward_kl", "lpo_reverse_kl", "grpo", "grpo_dapo"]
# (candidate, baseline) pairs tested seed by seed; the first is the headline comparison.
COMPARISONS = [("lpo_forward_kl", "grpo"), ("lpo_forward_kl", "grpo_dapo"),
               ("lpo_reverse_kl", "grpo")]
PAIRED_METRICS = ["final_reward", "final_pass", "auc", "mean_entropy"]


@dataclass
class StudyConfig:
    tasks: list = field(default_factory=lambda: list(TASKS))
    methods: list = field(default_factory=lambda: list(STUDY_METHODS))
    seeds: int = 10
    steps: int = 200
    threshold: float = 0.5     # "steps to reach": moving-average train reward >= this
    eval_every: int = 25
    threads: int = 1
    device: str = "cpu"
    overrides: dict = field(default_factory=dict)  # any other demo.Config field

    def run_config(self) -> demo.Config:
        """The per-run settings (the demo's defaults unless overridden)."""
        return demo.Config(steps=self.steps, seeds=self.seeds, methods=list(self.methods),
                           threshold=self.threshold, eval_every=self.eval_every,
                           threads=self.threads, device=self.device, **self.overrides)


SMOKE = StudyConfig(seeds=2, steps=6, eval_every=3, overrides=dict(
    group_size=4, prompts_per_step=4, warmup_steps=5, dim=16, layers=1, heads=2,
    eval_samples=4, smooth=3))


# --------------------------------------------------------------------------- running
def _compact(run: dict) -> dict:
    """A run as stored: floats rounded, per-prompt rewards kept for the final eval only."""
    rnd = lambda v: None if v is None else round(v, 5)  # noqa: E731
    evals = [{k: (rnd(v) if isinstance(v, float) else v) for k, v in e.items()
              if k != "per_target_reward"} for e in run["evals"]]
    return {"method": run["method"], "seed": run["seed"],
            "curves": {k: [rnd(v) for v in vs] for k, vs in run["curves"].items()},
            "evals": evals, "steps_to_threshold": run["steps_to_threshold"],
            "final_per_prompt_reward": [rnd(v) for v in run["evals"][-1]["per_target_reward"]]}


def _load_runs(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_task(cfg: StudyConfig, task_name: str, out: str, progress=None) -> list:
    """All seeds x methods of one task; appends each finished run to runs.jsonl and
    skips runs already there (same settings), so a stopped study resumes."""
    task = TASKS[task_name]()
    run_cfg = cfg.run_config()
    folder = os.path.join(out, task_name)
    os.makedirs(folder, exist_ok=True)
    settings = {"run_config": asdict(run_cfg), "task": asdict(task),
                "machine": demo.machine_info(run_cfg)}
    settings_path = os.path.join(folder, "settings.json")
    runs_path = os.path.join(folder, "runs.jsonl")

    def what_runs_depend_on(s: dict) -> dict:  # seeds/methods may grow; machine is a record
        return {"task": s["task"], "run_config": {k: v for k, v in s["run_config"].items()
                                                  if k not in ("seeds", "methods")}}

    if os.path.exists(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
        if what_runs_depend_on(previous) != what_runs_depend_on(settings):
            raise SystemExit(f"{folder} holds runs made with other settings: use another --out")
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    done = {(r["method"], r["seed"]) for r in _load_runs(runs_path)}
    with demo.reproducible(run_cfg):
        for seed in range(cfg.seeds):
            todo = [m for m in cfg.methods if (m, seed) not in done]
            if not todo:
                if progress is not None:
                    for _ in range(len(cfg.methods) * cfg.steps):
                        progress.advance(f"{task_name} seed {seed}: done before")
                continue
            initial = demo.warmed_up_model(run_cfg, task, seed)
            for method in cfg.methods:
                if method not in todo:
                    if progress is not None:
                        for _ in range(cfg.steps):
                            progress.advance()
                    continue
                start = time.perf_counter()
                run = _compact(demo.train(method, initial, task, run_cfg, seed, progress))
                run["seconds"] = round(time.perf_counter() - start, 2)
                with open(runs_path, "a") as f:
                    f.write(json.dumps(run) + "\n")
    return _load_runs(runs_path)


# --------------------------------------------------------------------------- analysis
def per_seed_metrics(run: dict, k: int) -> dict:
    reward, entropy = run["curves"]["reward"], run["curves"]["entropy"]
    return {
        "initial_reward": run["evals"][0]["reward"],
        "final_reward": run["evals"][-1]["reward"],
        "final_pass": run["evals"][-1][f"pass@{k}"],
        "auc": sum(reward) / len(reward),  # area under the train reward curve / steps
        "mean_entropy": sum(entropy) / len(entropy),
        "final_entropy": run["evals"][-1]["entropy"],
        "steps_to_threshold": run["steps_to_threshold"],
    }


def analyse(runs: list, methods: list, run_cfg: dict) -> dict:
    """Per-method intervals and seed-matched paired tests for one task's runs."""
    k = run_cfg["group_size"]
    by_method = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
                 for m in methods}
    metrics = {m: [per_seed_metrics(r, k) for r in rs] for m, rs in by_method.items() if rs}
    summary = {}
    for method, rows in metrics.items():
        row = {key: t_interval([x[key] for x in rows])
               for key in ("initial_reward", "final_reward", "final_pass", "auc",
                           "mean_entropy", "final_entropy")}
        reached = sorted(x["steps_to_threshold"] for x in rows if x["steps_to_threshold"])
        censored = sorted(x["steps_to_threshold"] or math.inf for x in rows)
        median = (censored[(len(censored) - 1) // 2] + censored[len(censored) // 2]) / 2
        row["steps_to_threshold"] = {"reached": len(reached), "seeds": len(rows),
                                     "median": None if math.isinf(median) else median,
                                     "mean_if_reached": mean_std(reached)[0] if reached else None}
        summary[method] = row
    tests = []
    for candidate, baseline in COMPARISONS:
        if candidate not in metrics or baseline not in metrics:
            continue
        seeds_a = [r["seed"] for r in by_method[candidate]]
        seeds_b = [r["seed"] for r in by_method[baseline]]
        common = sorted(set(seeds_a) & set(seeds_b))
        if len(common) < 2:
            continue
        rows_a = {r["seed"]: x for r, x in zip(by_method[candidate], metrics[candidate])}
        rows_b = {r["seed"]: x for r, x in zip(by_method[baseline], metrics[baseline])}
        for metric in PAIRED_METRICS:
            a = [rows_a[s][metric] for s in common]
            b = [rows_b[s][metric] for s in common]
            tests.append({"candidate": candidate, "baseline": baseline, "metric": metric,
                          "paired_t": paired_t_test(a, b), "wilcoxon": wilcoxon_signed_rank(a, b)})
    return {"summary": summary, "tests": tests}


def _curve_band(curves: list, smooth: int):
    """Trailing moving average per seed, then mean and 95% t half-width over seeds."""
    x = demo.trailing_mean(torch.tensor(curves, dtype=torch.float64), smooth)
    mean = x.mean(0)
    n = x.shape[0]
    half = (t_ppf(0.975, n - 1) * x.std(0) / math.sqrt(n)) if n > 1 else torch.zeros_like(mean)
    return mean, half


def plot(results: dict, path: str) -> bool:
    plt = demo.pyplot()
    if plt is None:
        return False
    tasks = results["tasks"]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.8 * len(tasks)), squeeze=False)
    for row, (name, res) in zip(axes, tasks.items()):
        smooth = res["run_config"]["smooth"]
        for method in res["methods"]:
            runs = [r for r in res["runs"] if r["method"] == method]
            if not runs:
                continue
            for ax, key in ((row[0], "reward"), (row[2], "entropy")):
                mean, half = _curve_band([r["curves"][key] for r in runs], smooth)
                steps = range(1, len(mean) + 1)
                ax.plot(steps, mean, label=method)
                ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
            steps = [e["step"] for e in runs[0]["evals"]]
            mean, half = _curve_band([[e["reward"] for e in r["evals"]] for r in runs], 1)
            row[1].plot(steps, mean, marker="o", ms=3, label=method)
            row[1].fill_between(steps, mean - half, mean + half, alpha=0.2)
        row[0].set(xlabel="RL step", ylabel=f"train reward ({smooth}-step avg)",
                   title=f"{name}: train reward")
        row[1].set(xlabel="RL step", ylabel="eval reward", title=f"{name}: evaluation reward")
        row[2].set(xlabel="RL step", ylabel="token entropy (nats)", title=f"{name}: entropy")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    counts = sorted({sum(r["method"] == m for r in res["runs"])
                     for res in tasks.values() for m in res["methods"]})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(f"LPO vs GRPO, matched GRPO target; mean and 95% t-interval over {seeds} "
                 "seeds per method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ci(s: dict, digits: int = 3) -> str:
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def format_report(results: dict) -> str:
    lines = []
    for name, res in results["tasks"].items():
        k = res["run_config"]["group_size"]
        thr = res["run_config"]["threshold"]
        lines += [f"### {name} ({res['run_config']['steps']} RL steps per run)", "",
                  f"| method | seeds | final reward | final pass@{k} | reward AUC | steps to {thr:g} "
                  f"(median; reached) | entropy, mean over training | final entropy |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, row in res["summary"].items():
            st = row["steps_to_threshold"]
            median = "never" if st["median"] is None else f"{st['median']:.0f}"
            lines.append(f"| {method} | {row['final_reward']['n']} | {_ci(row['final_reward'])} | {_ci(row['final_pass'])} | "
                         f"{_ci(row['auc'])} | {median}; {st['reached']}/{st['seeds']} | "
                         f"{_ci(row['mean_entropy'])} | {_ci(row['final_entropy'])} |")
        lines += ["", "| paired test (same seeds) | seeds | metric | mean difference [95% CI] | "
                  "paired t p | Wilcoxon p | wins/losses |", "|---|---|---|---|---|---|---|"]
        for t in res["tests"]:
            pt, w = t["paired_t"], t["wilcoxon"]
            lines.append(f"| {t['candidate']} − {t['baseline']} | {pt['n']} | {t['metric']} | "
                         f"{pt['mean_diff']:+.3f} [{pt['ci_lo']:+.3f}, {pt['ci_hi']:+.3f}] | "
                         f"{pt['p']:.3g} | {w['p']:.3g} | {w['positive']}/{w['negative']} |")
        lines.append("")
    return "\n".join(lines)


def report(cfg: StudyConfig, out: str, verbose: bool = True) -> dict:
    """Read every task's runs under ``out``; write results.json, table.md, curves.png."""
    tasks = {}
    for name in cfg.tasks:
        runs = _load_runs(os.path.join(out, name, "runs.jsonl"))
        if not runs:
            continue
        with open(os.path.join(out, name, "settings.json")) as f:
            settings = json.load(f)
        methods = [m for m in cfg.methods if any(r["method"] == m for r in runs)]
        if "machine" not in settings:  # (older runs)
            settings["machine"] = demo.machine_info(cfg.run_config())
        tasks[name] = {**settings, "methods": methods,
                       "seeds": len({r["seed"] for r in runs}),
                       "run_seconds": round(sum(r.get("seconds", 0.0) for r in runs), 1),
                       **analyse(runs, methods, settings["run_config"]), "runs": runs}
    results = {"study_config": asdict(cfg), "loss_head": demo.LOSS_HEAD, "tasks": tasks}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:  # the runs stay in runs.jsonl
        json.dump({**results, "tasks": {name: {k: v for k, v in res.items() if k != "runs"}
                                        for name, res in tasks.items()}}, f, indent=1)
    table = format_report(results)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    results["plot"] = plot(results, os.path.join(out, "curves.png")) if tasks else False
    if verbose:
        print(table)
        print(f"wrote {out}/results.json, table.md" + (", curves.png" if results["plot"] else ""))
    return results


def run_study(cfg: StudyConfig, out: str, verbose: bool = True) -> dict:
    start = time.perf_counter()
    total = len(cfg.tasks) * cfg.seeds * len(cfg.methods) * cfg.steps
    progress = demo.Progress(total) if verbose else None
    for name in cfg.tasks:
        run_task(cfg, name, out, progress)
    results = report(cfg, out, verbose)
    results["seconds"] = time.perf_counter() - start
    if verbose:
        print(f"study: {results['seconds']:.0f}s")
    return results


# --------------------------------------------------------------------------- entry point
def parse_args(argv=None) -> tuple[StudyConfig, str, bool]:
    d = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m lpo_kernels.study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=d.tasks, choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=d.methods, choices=list(demo.METHODS))
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per method and task")
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps per run")
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default 1)")
    p.add_argument("--updates-per-batch", type=int, default=None,
                   help="optimizer steps per sampled batch (default: the demo's 2; 1 = on-policy)")
    p.add_argument("--smoke", action="store_true", help="a tiny study (CI): 2 seeds, 6 steps")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild results.json/table.md/curves.png from the runs")
    p.add_argument("--out", default="study_out")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else d
    cfg = StudyConfig(tasks=a.tasks, methods=a.methods,
                      seeds=a.seeds if a.seeds != d.seeds or not a.smoke else base.seeds,
                      steps=a.steps if a.steps != d.steps or not a.smoke else base.steps,
                      threshold=a.threshold, eval_every=base.eval_every, threads=a.threads,
                      device=a.device, overrides=dict(base.overrides))
    if a.updates_per_batch is not None:
        cfg.overrides["updates_per_batch"] = a.updates_per_batch
    if cfg.seeds < 2:
        p.error("--seeds must be >= 2 (paired tests and intervals need two)")
    return cfg, a.out, a.report_only


def main(argv=None):
    cfg, out, report_only = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if report_only:
        report(cfg, out)
    else:
        run_study(cfg, out)


if __name__ == "__main__":
    main(sys.argv[1:])
