"""ppo_trader.py's verdict controls false positives: the same CI-sized recipe (5 seeds) claims no edge on minute bars
without a planted signal and an edge over random and buy-and-hold on the same bars with one."""

import pytest

from conftest import synthetic_verdict

# data seed 5 is used by no other PPO test; 5 seeds are the fewest runs an edge can be claimed on (EDGE_MIN_RUNS)
DATA = ["synthetic-intraday", "--days", "60", "--seed", "5"]
FLAGS = ["--window", "8", "--total-timesteps", "1000000", "--seed", "1", "--num-seeds", "5"]


@pytest.mark.parametrize("signal_strength,claim", [(0, "no evidence of an edge"), (2, "edge")])
def test_verdict_claims_an_edge_only_where_one_is_planted(tmp_path, signal_strength, claim):
    verdict = synthetic_verdict(tmp_path, [*DATA, "--signal-strength", str(signal_strength)], "ppo_trader.py", FLAGS)
    assert verdict.startswith(f"{claim} over random: ") and f"; {claim} over buy-and-hold: " in verdict
