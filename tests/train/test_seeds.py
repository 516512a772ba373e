"""Seed summaries: each seed's test value with its interval, and mean ± std (n - 1) over seeds."""

import json

import pytest

from bigjax.train.seeds import collect, seed_table
from experiments import seeds as seeds_cli


def _results(qwk_all, ci, qwk_draws):
    return {"results": [
        {"split": "val", "protocol": "all tiles", "values": {"qwk": [0.1]}, "qwk_mean_std": [0.1, 0]},
        {"split": "test", "protocol": "all tiles", "values": {"qwk": [qwk_all]},
         "qwk_mean_std": [qwk_all, 0.0], "qwk_ci95": ci},
        {"split": "test", "protocol": "3 draws of 4 tiles", "values": {"qwk": [qwk_draws] * 3},
         "qwk_mean_std": [qwk_draws, 0.0], "qwk_ci95": None}]}


def test_seed_table_reports_each_seed_and_the_spread(tmp_path):
    for seed, (q, d) in enumerate([(0.8, 0.7), (0.6, 0.5)]):
        (tmp_path / f"big_s{seed}").mkdir()
        (tmp_path / f"big_s{seed}" / "results.json").write_text(json.dumps(_results(q, [q - .2, q + .1], d)))
    (tmp_path / "frozen_s0").mkdir()
    (tmp_path / "frozen_s0" / "results.json").write_text(json.dumps(_results(0.4, None, 0.3)))
    (tmp_path / "unrelated").mkdir()
    assert set(collect(tmp_path)) == {"big", "frozen"}
    table = seed_table(tmp_path)
    assert "| big | 0, 1 | 0.80 [0.60, 0.90] / 0.60 [0.40, 0.70] | **0.70 ± 0.14** |" in table
    assert "| 0.70 / 0.50 | **0.60 ± 0.14** |" in table
    assert "| frozen | 0 | 0.40 | 0.40 (one seed) | 0.30 | 0.30 (one seed) |" in table


def test_the_cli_names_a_folder_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <name>_s<seed>/results.json"):
        seeds_cli.main([str(tmp_path)])
