"""ppo_trader.py learns: on synthetic bars with a planted signal, PPO gets close to the oracle on the test split."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import data_prep as dp
import ppo_trader as pt
from conftest import run_script


def split_return(backtest, policy) -> float:
    out = {k: np.asarray(v) for k, v in backtest(policy, None, 0, jax.random.PRNGKey(0)).items()}
    return float(out["equity"][out["live"]][-1])


def oracle_policy(threshold: float, window: int, n_features: int):
    """Knows which feature is the signal: enters in its direction when it exceeds the threshold."""
    idx = (window - 1) * n_features + n_features - 1  # the signal is the last feature of the last bar in the window

    def policy(policy_args, key, obs, mask):
        s = obs[idx]
        return jnp.where(s > threshold, pt.BUY, jnp.where(s < -threshold, pt.SELL, pt.HOLD))

    return policy


def test_ppo_reaches_80_percent_of_the_oracle(tmp_path):
    data = tmp_path / "syn.npz"
    assert dp.main(["synthetic-intraday", "--out", str(data), "--days", "60", "--seed", "0", "--signal-strength", "2"]) == 0
    flags = ["--data", str(data), "--window", "8", "--total-timesteps", "2000000", "--seed", "1"]
    r = run_script("ppo_trader.py", *flags, "--out-dir", tmp_path, "--run-name", "learn")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "learn" / "report.json").read_text())["SYN"]
    initial = 50_000.0
    ppo_test = report["policy"]["total_return"] * initial
    random_test = report["random"]["total_return"] * initial

    # the oracle: the signal-threshold rule, its threshold chosen on the validation split
    args = pt.Args(data=str(data), window=8)
    datasets, info = pt.load_data(args)
    env_params = pt.env_params_from_args(args)
    F = datasets["train"].features.shape[-1]
    assert info["feature_names"][-1] == "signal"
    val_bt, test_bt = pt.make_backtest(env_params, datasets["val"]), pt.make_backtest(env_params, datasets["test"])
    oracles = {th: oracle_policy(th, 8, F) for th in (0.0, 0.25, 0.5, 1.0, 1.5)}
    best = max(oracles, key=lambda th: split_return(val_bt, oracles[th]))
    oracle_test = split_return(test_bt, oracles[best])

    assert oracle_test > 5_000, oracle_test  # the planted signal is worth trading after costs
    assert ppo_test >= 0.8 * oracle_test, (ppo_test, oracle_test)
    assert random_test < 0.2 * oracle_test, (random_test, oracle_test)
