"""erl_trader.py's verdict controls false positives: the same CI-sized recipe (5 seeds, 10 generations) claims no
edge on a universe without a planted signal and an edge over random and buy-and-hold on the same universe with one."""

import json

import pytest

import data_prep as dp
from conftest import run_script

# data seed 5 is used by no other test; 5 seeds are the fewest runs an edge can be claimed on (EDGE_MIN_RUNS)
DATA = ["--stocks", "10", "--signal-stocks", "10", "--signal-halflife", "2", "--days", "2000", "--seed", "5"]
FLAGS = ["--train-end", "0.6", "--val-end", "0.8", "--window", "20", "--max-holding-days", "2", "--worst-k", "5",
         "--rl-updates", "128", "--n-step", "4", "--critic-warmup", "2", "--pop-size", "4", "--generations", "10",
         "--eval-every", "2", "--seed", "1", "--num-seeds", "5"]


@pytest.mark.parametrize("signal_strength,claim", [(0, "no evidence of an edge"), (4, "edge")])
def test_verdict_claims_an_edge_only_where_one_is_planted(tmp_path, signal_strength, claim):
    data = tmp_path / "syn.npz"
    assert dp.main(["synthetic-daily", "--out", str(data), *DATA, "--signal-strength", str(signal_strength)]) == 0
    r = run_script("erl_trader.py", "--data", data, *FLAGS, "--out-dir", tmp_path, "--run-name", "verdict")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "verdict" / "report.json").read_text())
    print(f"signal strength {signal_strength}: {report['verdict']}")
    assert report["summary"]["champion"]["runs"] == 5
    assert report["verdict"].startswith(f"{claim} over random: ") and f"; {claim} over buy-and-hold: " in report["verdict"]
