"""erl_trader.py learns: on synthetic-daily data with a planted signal (data seed 1), the champion beats
buy-and-hold and every random policy on the test split, the TD3 learner alone improves clearly over its initial
policy, and a random policy does not; whether the champion gets close to the oracle (the learning issue's goal) is
reported as a pass or an expected failure with the measured shares."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_prep as dp
import erl_trader as et
from conftest import run_script

# 10 stocks, each with the planted signal (half-life 2 days), seen in a 20-day window. Fitness is the mean of all 5
# episodes (less noisy than the worst 2 on 25-day slices).
# n-step 4 targets hold a trade's whole outcome (fill the next day, sale at the latest two days later). The critic
# trains alone for the first 4 generations (--critic-warmup, chosen on the validation returns of data seeds 2 and 3).
# --obs-norm train (the features standardised with the training days' statistics, so the signal's level is seen)
# raised the best validation share on data seed 3 from 0.26 to 0.47 (benchmarks/erl_validation_shares.py).
DATA = ["--stocks", "10", "--signal-stocks", "10", "--signal-halflife", "2", "--signal-strength", "4", "--days", "2000"]
FLAGS = [
    "--train-end",
    "0.6",
    "--val-end",
    "0.8",
    "--window",
    "20",
    "--max-holding-days",
    "2",
    "--worst-k",
    "5",
    "--rl-updates",
    "256",
    "--n-step",
    "4",
    "--critic-warmup",
    "4",
    "--pop-size",
    "8",
    "--generations",
    "24",
    "--eval-every",
    "2",
    "--obs-norm",
    "train",
    "--seed",
    "1",
]


def planted_rule(signal_of, carries_signal: jax.Array):
    """The planted rule on the signal `signal_of(data, obs, t)` ([n investable]) reads: buys the stocks that carry
    the signal (`carries_signal`) whose signal exceeds the threshold, the strongest first.
    policy_args = (split data, threshold, target in [0, 1])."""

    def policy(policy_args, key, obs, t):
        data, threshold, target = policy_args
        s = signal_of(data, obs, t)
        coef = jnp.where((s > threshold) & carries_signal, 0.51 + 0.49 * jnp.tanh(s), 0.0)
        return jnp.stack([coef, jnp.full(coef.shape, target)], -1)

    return policy


SEEDS = 3  # trained in one program (--num-seeds); the assertions read their median, and at least 2 must pass alone
GOAL = 0.7  # the learning issue's target: the median champion at 70% of the oracle's test return, 2 of 3 seeds there


def rule_policies(info: dict) -> dict:
    """{'oracle', 'observation_rule'}: the planted rule on the data `info` describes, each buying only the stocks that
    carry the planted signal (the data's meta names them; the others' signal channel predicts nothing).

    The oracle reads the true signal. The observation rule reads what the actor sees: the last normalised value of
    the signal channel. Under --obs-norm window the window's z-score keeps the signal's rank within the window but
    not its level (a 20-day mean of a 2-day half-life AR(1) is a noisy estimate of 0); under --obs-norm train it is
    a per-stock rescaling of the true signal. A yardstick of what the observation allows, not a bound."""
    signal = list(info["feature_names"]).index("signal")
    signal_stocks = set(info["meta"]["synthetic"]["signal_stocks"])
    carries_signal = jnp.array([info["tickers"][i] in signal_stocks for i in info["inv"]])
    true_signal = lambda data, obs, t: data.features[t, data.inv, signal]  # noqa: E731
    observed_signal = lambda data, obs, t: obs[-1, data.inv, signal]  # noqa: E731
    return dict(oracle=planted_rule(true_signal, carries_signal),
                observation_rule=planted_rule(observed_signal, carries_signal))


def rule_returns(data, flags: list) -> dict:
    """{rule: {'val', 'test'}} for the oracle and the observation rule: each rule's best validation return over the
    threshold x target grid, and its test return at that threshold and target (played once on the test split)."""
    args = et.parse_args(["--data", str(data), *flags])
    datasets, info = et.load_data(args)
    env_params = et.env_params_from_args(args)
    bts = {s: et.make_backtest(env_params, et.split_days(info, s)) for s in ("val", "test")}

    def split_return(policy, split, threshold, target) -> float:
        policy_args = (datasets[split], jnp.float32(threshold), jnp.float32(target))
        out = bts[split](policy, policy_args, jax.random.PRNGKey(0), datasets[split])
        return float(np.asarray(out["equity"])[-1] - 1.0)

    grid = [(th, tg) for th in (0.0, 0.5, 1.0) for tg in (0.3, 0.6, 1.0)]
    returns = {}
    for name, policy in rule_policies(info).items():
        val = {point: split_return(policy, "val", *point) for point in grid}
        best = max(grid, key=val.get)
        returns[name] = dict(val=val[best], test=split_return(policy, "test", *best))
    return returns


# data seed 1 only: the recipe's first flags were chosen on data seed 0, so 1 is the stronger check, and one data seed
# keeps the suite's time (other data seeds: python benchmarks/results.py --tables learning-erl --data-seeds ...)
@pytest.mark.parametrize("data_seed", [1])
def test_erl_learns_the_planted_signal(tmp_path, data_seed):
    """Over 3 seeds trained in one program: the champion beats buy-and-hold and every random run in at least 2 of the
    3 seeds, the TD3 learner's median gain over its initial policy is at least 15% of the oracle's test return, and
    random's median stays below 20%. Then the learning issue's goal: a median champion at 70% of the oracle (and 2
    of 3 seeds there); ERL does not reach it robustly yet, and the test reports that as an expected failure with
    the measured shares (a pass when the goal is met)."""
    data = tmp_path / "syn.npz"
    assert dp.main(["synthetic-daily", "--out", str(data), *DATA, "--seed", str(data_seed)]) == 0
    r = run_script(
        "erl_trader.py", "--data", data, *FLAGS, "--num-seeds", str(SEEDS), "--out-dir", tmp_path, "--run-name", "learn"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "learn" / "report.json").read_text())
    rows = report["seeds"]
    rules = rule_returns(data, FLAGS)
    oracle = rules["oracle"]["test"]
    share = {
        who: np.array([row[who]["total_return"] for row in rows]) / oracle
        for who in ("champion", "td3_learner", "td3_learner_at_start", "random", "buy_and_hold")
    }
    observation_share = rules["observation_rule"]["test"] / oracle
    print(
        f"data seed {data_seed}: oracle {oracle:+.3f}, observation rule {observation_share:.2f} of it; shares of the "
        "oracle per seed",
        {who: np.round(values, 2).tolist() for who, values in share.items()},
    )

    assert oracle > 0.5, oracle  # the planted signal is worth trading after costs
    percentile_among_random = np.array(report["summary"]["champion"]["percentile_among_random"]["per_run"])
    beats_baselines = (percentile_among_random == 100.0) & (share["champion"] > share["buy_and_hold"])
    assert beats_baselines.sum() >= 2, (share, percentile_among_random)
    assert np.median(share["td3_learner"] - share["td3_learner_at_start"]) >= 0.15, share  # TD3 alone learns
    assert np.median(share["random"]) < 0.2, share
    if not (np.median(share["champion"]) >= GOAL and (share["champion"] >= GOAL).sum() >= 2):
        pytest.xfail(
            f"the champion's shares of the oracle {np.round(share['champion'], 2).tolist()} are short of the goal "
            f"(median {GOAL:.0%}, 2 of 3 seeds): ERL does not yet learn the planted signal close to the oracle "
            "robustly (issue: learning across data; README: Learning on synthetic data)"
        )


def test_oracle_buys_only_the_stocks_that_carry_the_signal(tmp_path):
    """Where only some stocks carry the planted signal, the others' `signal` channel predicts nothing: the rules that
    `rule_returns` plays (the oracle and the observation rule) never put a coefficient on them (they once did, which
    made the partial universe's "oracle" a diluted rule), and they do on the stocks that carry it."""
    data = tmp_path / "partial.npz"
    generator = ["--stocks", "6", "--signal-stocks", "2", "--signal-strength", "4", "--days", "400", "--seed", "7"]
    assert dp.main(["synthetic-daily", "--out", str(data), *generator]) == 0
    args = et.parse_args(["--data", str(data), "--train-end", "0.6", "--val-end", "0.8", "--obs-norm", "train"])
    datasets, info = et.load_data(args)
    env_params = et.env_params_from_args(args)
    test = datasets["test"]
    carries = np.array([True, True, False, False, False, False])  # the generator's first 2 stocks
    for name, policy in rule_policies(info).items():
        coefs = np.array([np.asarray(policy((test, jnp.float32(0.0), jnp.float32(0.5)), None,
                                            et.get_obs(jnp.int32(t), env_params, test), t))[:, 0]
                          for t in range(int(test.lo), int(test.hi))])
        assert (coefs[:, ~carries] == 0).all(), name
        assert 0.0 < (coefs[:, carries] > 0).mean() < 1.0, name  # bought on the days their signal is above 0
