"""ppo_trader.py learns: on synthetic bars with a planted signal, PPO gets close to the oracle on the test split."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import data_prep as dp
import ppo_trader as pt
from conftest import run_script


def split_return(backtest, policy) -> float:
    return float(pt.play_one(backtest, policy, None, 0, jax.random.PRNGKey(0))["equity"][-1])


def oracle_policy(threshold: float, window: int, n_features: int):
    """Knows which feature is the signal: enters in its direction when it exceeds the threshold."""
    idx = (window - 1) * n_features + n_features - 1  # the signal is the last feature of the last bar in the window

    def policy(policy_args, key, obs, mask):
        s = obs[idx]
        return jnp.where(s > threshold, pt.BUY, jnp.where(s < -threshold, pt.SELL, pt.HOLD))

    return policy


SEEDS = 3  # trained in one program (--num-seeds); the assertions read their median, and at least 2 must pass alone


def test_ppo_reaches_80_percent_of_the_oracle(tmp_path):
    """The median over 3 seeds of the greedy policy's test return reaches 80% of the oracle's, at least 2 of the
    3 seeds do on their own, and random stays below 20%."""
    data = tmp_path / "syn.npz"
    assert dp.main(["synthetic-intraday", "--out", str(data), "--days", "60", "--seed", "0", "--signal-strength", "2"]) == 0
    flags = ["--data", str(data), "--window", "8", "--total-timesteps", "2000000", "--seed", "1", "--num-seeds", str(SEEDS)]
    r = run_script("ppo_trader.py", *flags, "--out-dir", tmp_path, "--run-name", "learn")
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = [row["SYN"] for row in json.loads((tmp_path / "learn" / "report.json").read_text())["seeds"]]
    initial = 50_000.0
    ppo_test = np.array([row["policy"]["total_return"] * initial for row in seeds])
    random_test = np.array([row["random"]["total_return"] * initial for row in seeds])

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
    print(f"PPO greedy per seed {np.round(ppo_test / oracle_test, 2)} of the oracle {oracle_test:+.0f}; random {random_test}")

    assert oracle_test > 5_000, oracle_test  # the planted signal is worth trading after costs
    assert np.median(ppo_test) >= 0.8 * oracle_test, (ppo_test, oracle_test)
    assert (ppo_test >= 0.8 * oracle_test).sum() >= 2, (ppo_test, oracle_test)
    assert np.median(random_test) < 0.2 * oracle_test, (random_test, oracle_test)


def test_phase2_from_phase1_beats_phase1_when_managing_pays(tmp_path):
    """On trends that revert (each planted drift taken back 120 bars later) with a far target, phase 1
    can only ride a trade into its reversal; phase 2, started from phase 1 (seed k from seed k), learns to trail
    the stop. 3 seeds in one program: the medians decide, and at least 2 seeds must pass on their own."""
    data = tmp_path / "revert.npz"
    assert (
        dp.main(
            [
                "synthetic-intraday",
                "--out",
                str(data),
                "--days",
                "60",
                "--seed",
                "0",
                "--signal-strength",
                "2",
                "--revert-fraction",
                "1",
                "--revert-after",
                "120",
            ]
        )
        == 0
    )
    flags = [
        "--data",
        str(data),
        "--window",
        "8",
        "--tp-atr-mult",
        "20",
        "--trail-atr-mult",
        "2",
        "--dd-limit",
        "5000",
        "--total-timesteps",
        "1000000",
        "--seed",
        "1",
        "--num-seeds",
        str(SEEDS),
        "--out-dir",
        tmp_path,
    ]
    r1 = run_script("ppo_trader.py", *flags, "--run-name", "phase1")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_script("ppo_trader.py", *flags, "--run-name", "phase2", "--phase", "2", "--init-from", tmp_path / "phase1")
    assert r2.returncode == 0, r2.stderr[-3000:]
    p1, p2 = (
        np.array(
            [row["SYN"]["policy"]["total_return"] for row in json.loads((tmp_path / run / "report.json").read_text())["seeds"]]
        )
        for run in ("phase1", "phase2")
    )
    # phase 1 learned to enter on the signal: the comparison is not against a no-trade policy
    assert np.median(p1) > 0.05, p1
    assert np.median(p2) > 1.3 * np.median(p1) and (p2 > 1.3 * p1).sum() >= 2, (p2, p1)

    # the gain comes from managing the trades: the same policy with the management actions masked out earns less
    args = pt.Args(data=str(data), window=8, tp_atr_mult=20.0, trail_atr_mult=2.0, dd_limit=5000.0, phase=2)
    datasets, _ = pt.load_data(args)
    F = datasets["test"].features.shape[-1]
    backtest = pt.make_backtest(pt.env_params_from_args(args), datasets["test"])
    managed_pays = []
    for seed in range(SEEDS):
        policy_file = tmp_path / "phase2" / f"seed{seed}" / "best.msgpack"
        network, params, norm, _ = pt.load_policy(str(policy_file), args, pt.obs_size(8, F, 2))
        greedy = pt.greedy_policy(network)

        def entries_only(policy_args, key, obs, mask, greedy=greedy):
            return greedy(policy_args, key, obs, mask & (jnp.arange(6) < 3))

        out = pt.play_one(backtest, greedy, (params, norm), 0, jax.random.PRNGKey(0))
        trades, trails = int(np.isfinite(out["closed_price"]).sum()), int((out["action"] == pt.ENABLE_TRAIL).sum())
        out_u = pt.play_one(backtest, entries_only, (params, norm), 0, jax.random.PRNGKey(0))
        managed, unmanaged = float(out["equity"][-1]), float(out_u["equity"][-1])
        print(
            f"seed {seed}: phase 1 {p1[seed]:+.3f}  phase 2 {p2[seed]:+.3f}  trades {trades}  trail enables {trails}  "
            f"phase 2 without management {unmanaged / 50_000:+.3f}"
        )
        managed_pays.append(trades > 20 and trails > 0.2 * trades and managed > unmanaged + 0.1 * 50_000 * p1[seed])
    assert sum(managed_pays) >= 2, managed_pays
