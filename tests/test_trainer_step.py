"""benchmarks/trainer_step.py in its CPU smoke mode: one real optimizer step of TRL's
GRPOTrainer and of LPOTrainer (fused head) on a tiny random Qwen2, CSV + plot written."""

import csv

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from benchmarks import trainer_step  # noqa: E402


def test_synthetic_lengths_spread_over_10_to_100_percent():
    batch = trainer_step.synthetic_batch(100, 16, 8, 12, 200, torch.device("cpu"))
    lengths = batch["completion_mask"].sum(1)
    assert int(lengths.min()) >= 20 and int(lengths.max()) <= 200
    assert int(lengths.min()) < 60 and int(lengths.max()) > 160  # a real spread, not one length
    adv = batch["advantages"].view(16, 8)
    assert torch.allclose(adv.mean(1), torch.zeros(16), atol=1e-5)
    assert torch.equal(batch["lpo_group_ids"], torch.arange(128) // 8)


def test_smoke_run_writes_csv_and_plot(tmp_path):
    assert trainer_step.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = {r["trainer"]: r for r in csv.DictReader(open(tmp_path / "trainer_step.csv"))}
    assert set(rows) == set(trainer_step.TRAINERS)
    for kind in ("trl_grpo", "lpo_trainer"):
        row = rows[kind]
        assert row["status"] == "ok", row
        assert float(row["step_ms"]) > 0 and float(row["tokens_per_s"]) > 0
        assert 0 < int(row["real_tokens"]) < int(row["padded_tokens"])
        assert torch.isfinite(torch.tensor(float(row["loss"])))
    assert rows["lpo_trainer"]["note"] == "lpo_head=lpo"  # the fused head, not TRL's
    assert rows["trl_grpo_liger"]["status"] in ("ok", "skipped")
    assert (tmp_path / "trainer_step.png").stat().st_size > 0
