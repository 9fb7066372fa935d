"""The learning study (python -m lpo_kernels.demo --study): its statistics against cases
known by construction (and SciPy where installed), the sort task's reward, a CPU smoke
study of both tasks (output structure, intervals, paired tests, resume), and that a run
is reproducible: the same seed gives bit-identical results twice in one process."""

import itertools
import json
import math
import random

import pytest
import torch

from lpo_kernels import demo, study
from lpo_kernels.study_stats import (betainc, mean_std, paired_t_test, t_interval, t_ppf,
                                     t_sf_two_sided, wilcoxon_signed_rank)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- statistics
def test_t_distribution_against_closed_forms_and_tables():
    for t in (0.3, 1.0, 2.5, 10.0):
        # df=1 is Cauchy, df=2 has a closed-form CDF
        assert t_sf_two_sided(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
        assert t_sf_two_sided(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    # textbook two-sided 95% critical values
    for df, crit in ((1, 12.7062047), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)):
        assert t_ppf(0.975, df) == pytest.approx(crit, abs=1e-6)
        assert t_ppf(0.025, df) == pytest.approx(-crit, abs=1e-6)
    assert t_ppf(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # -> normal
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # = P(Binomial(4, x) >= 2)
    with pytest.raises(ValueError, match="q"):
        t_ppf(1.0, 3)


def test_paired_t_test_known_case():
    diffs = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5): t = 3 / sqrt(0.5)
    res = paired_t_test([10 + d for d in diffs], [10.0] * 5)
    assert res["t"] == pytest.approx(3 / math.sqrt(0.5))
    assert res["df"] == 4 and res["mean_diff"] == pytest.approx(3.0)
    assert res["p"] == pytest.approx(t_sf_two_sided(3 / math.sqrt(0.5), 4))
    half = t_ppf(0.975, 4) * math.sqrt(0.5)
    assert (res["ci_lo"], res["ci_hi"]) == (pytest.approx(3 - half), pytest.approx(3 + half))
    # no difference at all: p = 1; swapping the arms flips the sign, keeps p
    assert paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["p"] == 1.0
    a, b = [0.1, 0.5, 0.2, 0.9], [0.3, 0.4, 0.0, 0.5]
    assert paired_t_test(a, b)["p"] == pytest.approx(paired_t_test(b, a)["p"])
    assert paired_t_test(a, b)["t"] == pytest.approx(-paired_t_test(b, a)["t"])
    with pytest.raises(ValueError, match="same length"):
        paired_t_test([1.0, 2.0], [1.0])


def test_wilcoxon_exact_against_enumeration():
    # all n differences positive: only the all-positive and all-negative sign patterns
    # are as extreme -> p = 2 / 2^n
    assert wilcoxon_signed_rank([float(i) for i in range(1, 11)], [0.0] * 10)["p"] == 2 / 1024
    rng = random.Random(0)
    for n in (4, 6, 9):
        diffs = [rng.choice([-3, -1, 1, 2, 2, 4]) * 0.5 for _ in range(n)]  # with ties
        res = wilcoxon_signed_rank(diffs, [0.0] * n)
        # brute force over every sign pattern of the midranks
        nz = [d for d in diffs if d != 0]
        absd = sorted(abs(d) for d in nz)
        rank = {v: (absd.index(v) + len(absd) - absd[::-1].index(v) + 1) / 2 for v in absd}
        ranks = [rank[abs(d)] for d in nz]
        obs = sum(r for r, d in zip(ranks, nz) if d > 0)
        centre = sum(ranks) / 2
        extreme = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - centre)
                      >= abs(obs - centre) - 1e-9
                      for signs in itertools.product([0, 1], repeat=len(nz)))
        assert res["p"] == pytest.approx(extreme / 2 ** len(nz))
    assert wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0])["p"] == 1.0


def test_statistics_match_scipy_when_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for n in (5, 10, 12):
        a = [rng.gauss(0, 1) for _ in range(n)]
        b = [x + rng.gauss(0.4, 1) for x in a]
        assert paired_t_test(a, b)["p"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)
        assert wilcoxon_signed_rank(a, b)["p"] == pytest.approx(
            scipy_stats.wilcoxon(a, b, method="exact").pvalue, rel=1e-12)
        for df in (1, 3, n - 1):
            assert t_ppf(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)


def test_t_interval_contains_mean_and_covers():
    s = t_interval([0.2, 0.4, 0.9])
    assert s["lo"] < s["mean"] < s["hi"] and s["mean"] == pytest.approx(0.5)
    const = t_interval([0.3] * 4)
    assert const["lo"] == const["mean"] == const["hi"] == pytest.approx(0.3)
    # coverage of the 95% interval for normal samples of 5 (binomial sd ~0.5% at 2000)
    rng = random.Random(2)
    hits = 0
    for _ in range(2000):
        ci = t_interval([rng.gauss(1.0, 2.0) for _ in range(5)])
        hits += ci["lo"] <= 1.0 <= ci["hi"]
    assert 0.93 < hits / 2000 < 0.97
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


# --------------------------------------------------------------------------- the sort task
def test_sort_task_reward_and_warmup_format():
    task = study.SortTask(length=4)
    targets = torch.tensor([3142, 3142, 3142, 7, 9990])
    eos = task.eos
    response = torch.tensor([[1, 2, 3, 4, eos], [1, 2, 4, 3, eos], [1, 2, 3, 4, 4],
                             [0, 0, 0, 7, eos], [0, 9, 9, 9, eos]])
    assert task.prompts(targets)[0].tolist() == [task.bos, 3, 1, 4, 2]
    assert task.rewards(targets, response).tolist() == [1, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    examples = task.format_examples(task.sample_targets(64, g, "cpu"), g)
    assert (examples[:, -1] == eos).all() and (examples[:, :-1] < 10).all()
    ids = task.sample_targets(8, torch.Generator().manual_seed(3), "cpu")
    perm = task.format_examples(ids, torch.Generator().manual_seed(4))[:, :-1]
    assert torch.equal(perm.sort(1).values, task._digits(ids).sort(1).values)  # same multiset
    assert torch.equal(task.eval_targets("cpu"), task.eval_targets("cpu"))


# --------------------------------------------------------------------------- smoke study
def _without_timing(runs):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def test_smoke_study_structure_resume_and_reproducibility(tmp_path):
    cfg = study.StudyConfig(**{**study.SMOKE.__dict__, "overrides": dict(study.SMOKE.overrides)})
    results = study.run_study(cfg, str(tmp_path / "a"), verbose=False)
    assert set(results["tasks"]) == {"digit_sum", "sort"}
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for name, res in saved["tasks"].items():
        res = {**res, "runs": results["tasks"][name]["runs"]}
        assert "runs" not in saved["tasks"][name]  # they stay in <task>/runs.jsonl
        assert len(res["runs"]) == cfg.seeds * len(cfg.methods)
        assert res["machine"]["threads"] == 1 and res["machine"]["torch"] == torch.__version__
        assert set(res["summary"]) == set(cfg.methods)
        for row in res["summary"].values():
            for key in ("final_reward", "final_pass", "auc", "mean_entropy", "final_entropy"):
                s = row[key]
                assert s["n"] == cfg.seeds and s["lo"] <= s["mean"] <= s["hi"]
            assert 0.0 <= row["final_reward"]["mean"] <= 1.0
        pairs = {(t["candidate"], t["baseline"], t["metric"]) for t in res["tests"]}
        assert ("lpo_forward_kl", "grpo", "final_reward") in pairs
        assert ("lpo_forward_kl", "grpo_dapo", "final_reward") in pairs
        for t in res["tests"]:
            assert 0.0 <= t["paired_t"]["p"] <= 1.0 and 0.0 <= t["wilcoxon"]["p"] <= 1.0
            assert t["paired_t"]["ci_lo"] <= t["paired_t"]["mean_diff"] <= t["paired_t"]["ci_hi"]
        # the reported AUC is the mean of the stored train-reward curves
        run = res["runs"][0]
        metrics = study.per_seed_metrics(run, res["run_config"]["group_size"])
        assert metrics["auc"] == pytest.approx(sum(run["curves"]["reward"]) / cfg.steps)
    table = (tmp_path / "a" / "table.md").read_text()
    assert all(m in table for m in cfg.methods) and "Wilcoxon" in table
    if results["plot"]:
        assert (tmp_path / "a" / "curves.png").stat().st_size > 0
    # resume: nothing is trained twice
    lines = (tmp_path / "a" / "sort" / "runs.jsonl").read_text().count("\n")
    study.run_task(cfg, "sort", str(tmp_path / "a"))
    assert (tmp_path / "a" / "sort" / "runs.jsonl").read_text().count("\n") == lines
    # same seed, same process, fresh start: bit-identical runs (curves, evals, all floats)
    again = study.run_task(cfg, "sort", str(tmp_path / "b"))
    assert _without_timing(again) == _without_timing(results["tasks"]["sort"]["runs"])


def test_demo_run_is_reproducible_in_process():
    cfg = demo.Config(steps=4, seeds=1, group_size=4, prompts_per_step=4, warmup_steps=3,
                      max_digits=1, max_target=4, dim=16, layers=1, heads=2, eval_every=2,
                      eval_samples=4, smooth=2, methods=["lpo_forward_kl", "grpo_dapo"])
    first = demo.run(cfg, verbose=False)["runs"]
    torch.manual_seed(123)  # global RNG state must not matter
    second = demo.run(cfg, verbose=False)["runs"]
    assert first == second
    assert torch.get_num_threads() == 1  # the caller's thread setting is restored


def test_cli_study_flag_dispatches(tmp_path, capsys):
    demo.main(["--study", "--smoke", "--tasks", "sort", "--methods", "lpo_forward_kl", "grpo",
               "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["tasks"]) == ["sort"] and saved["tasks"]["sort"]["seeds"] == 2
    assert "lpo_forward_kl − grpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.parse_args(["--seeds", "1"])
    cfg, out, report_only = study.parse_args(["--updates-per-batch", "1", "--report-only"])
    assert cfg.run_config().updates_per_batch == 1 and cfg.seeds == 10 and report_only
