"""ppo_trader.py env and PPO pieces against the NumPy reference, hand scenarios, causality, masking, GAE."""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import data_prep as dp
import ppo_reference as ref
import ppo_trader as pt
from test_ppo_reference import PHASE2_SCENARIOS, SCENARIOS


def market_data(d: dict, spec: dict, start: int, end: int) -> pt.MarketData:
    """One-market MarketData from a reference-style data dict (episodes always reset at `start`)."""
    f32 = lambda k: jnp.asarray(np.asarray(d[k])[None], jnp.float32)  # noqa: E731
    return pt.MarketData(
        open=f32("open"),
        high=f32("high"),
        low=f32("low"),
        close=f32("close"),
        atr=f32("atr"),
        rth=jnp.asarray(d["rth"][None]),
        session_end=jnp.asarray(d["session_end"][None]),
        bars_to_close=jnp.asarray(d["bars_to_close"][None], jnp.int32),
        hours_to_close=f32("hours_to_close"),
        features=jnp.asarray(np.asarray(d["features"])[None], jnp.float32),
        starts=jnp.array([[start]], jnp.int32),
        n_starts=jnp.array([1], jnp.int32),
        lo=jnp.array([0], jnp.int32),
        hi=jnp.array([end], jnp.int32),
        point_value=jnp.array([spec["point_value"]], jnp.float32),
        tick_size=jnp.array([spec["tick_size"]], jnp.float32),
        commission=jnp.array([spec["commission"]], jnp.float32),
        market_weights=jnp.array([1.0]),
    )


def env_params(p: dict) -> pt.EnvParams:
    return pt.EnvParams(
        window=p["window"],
        episode_bars=p["episode_bars"],
        no_entry_bars=p["no_entry_bars"],
        flatten_at_close=p["flatten_at_close"],
        contracts=float(p["contracts"]),
        sl_atr_mult=p["sl_atr_mult"],
        tp_atr_mult=p["tp_atr_mult"],
        slippage_ticks=p["slippage_ticks"],
        initial_balance=p["initial_balance"],
        dd_limit=p["dd_limit"],
        dd_lock_offset=p["dd_lock_offset"],
        breach_penalty=p["breach_penalty"],
        phase=p["phase"],
        trail_atr_mult=p["trail_atr_mult"],
    )


@jax.jit
def _run_jax_episode(params: pt.EnvParams, data: pt.MarketData, start, actions):
    """Scans pt.step over an action sequence from a reset at `start` (static fields of params key the cache)."""
    state = pt.reset_at(0, start)
    obs0 = pt.get_obs(state, params, data)

    def body(state, a):
        mask = pt.legal_mask(state, params, data)
        core, _, _, _ = pt.step_core(
            state, a, params, data
        )  # the pre-reset account (step returns the next episode's when done)
        obs, nxt, reward, term, trunc, info = pt.step(jax.random.PRNGKey(0), state, a, params, data)
        return nxt, dict(
            obs=info["final_obs"],
            reward=reward,
            terminated=term,
            truncated=trunc,
            mask=mask,
            entry_price=info["entry_price"],
            exit_price=info["exit_price"],
            pnl=core.pnl,
            equity=core.equity,
            dir=core.dir,
            sl=core.sl,
        )

    _, out = jax.lax.scan(body, state, actions)
    return obs0, out


PAD = 512


def jax_run_episode(data, spec, params, start, end, actions) -> dict:
    """Same signature and outputs as ppo_reference.run_episode, computed by ppo_trader's env."""
    actions = np.asarray(actions, np.int32).reshape(-1)
    padded = np.zeros(max(PAD, len(actions)), np.int32)  # one compilation per static config, not per length
    padded[: len(actions)] = actions
    obs0, out = _run_jax_episode(
        env_params(params), market_data(data, spec, start, end), jnp.int32(start), jnp.asarray(padded)
    )
    out = {k: np.asarray(v)[: len(actions)] for k, v in out.items()}  # slice on the host: a device slice compiles per length
    done = out["terminated"] | out["truncated"]
    n = int(np.argmax(done)) + 1 if done.any() else len(actions)
    ib = params["initial_balance"]
    res = {
        k: out[k][:n] for k in ("obs", "reward", "terminated", "truncated", "mask", "entry_price", "exit_price", "dir", "sl")
    }
    res.update(
        obs0=np.asarray(obs0), balance=ib + out["pnl"][:n].astype(np.float64), equity=ib + out["equity"][:n].astype(np.float64)
    )
    return res


# ---- HAND SCENARIOS (the reference's scenarios, run on the JAX env) ----
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_scenarios_on_jax_env(scenario):
    scenario(jax_run_episode)


@pytest.mark.parametrize("scenario", PHASE2_SCENARIOS, ids=[s.__name__ for s in PHASE2_SCENARIOS])
def test_phase2_scenarios_on_jax_env(scenario):
    scenario(jax_run_episode)


# ---- PARITY WITH THE NUMPY REFERENCE ----
@lru_cache(maxsize=1)
def synthetic_market():
    """Two weeks of synthetic ES-like minute bars (sessions, RTH, gaps), as a reference data dict."""
    frame, signal, _ = dp.synthetic_intraday_frame(6, 3, 1.0, 30.0, "2024-03-06")
    a, _ = dp.build_intraday([("ES", frame, 60, dp.MARKETS["ES"])], "America/New_York", None, "17:00", 1, {})
    feats = a["features"][0][:, [0, 1, 3, 8, 10]].astype(np.float64)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    atr = np.maximum(
        np.round(a["atr"][0] * 256) / 256, 0.25
    )  # dyadic ATR: stop/target arithmetic exact in float32 and float64
    d = ref.make_data(
        a["open"][0],
        a["high"][0],
        a["low"][0],
        a["close"][0],
        atr=atr,
        rth=a["rth"][0],
        session_end=a["session_end"][0],
        features=feats.astype(np.float32),
        timestamps_hours=a["timestamps"][0] / 3.6e12,
    )
    return d


# the env's static fields (each combination compiles once): every value of each appears, not every combination
STATIC_COMBOS = [
    dict(window=1, episode_bars=60, no_entry_bars=0, flatten_at_close=True),
    dict(window=3, episode_bars=400, no_entry_bars=5, flatten_at_close=True),
    dict(window=1, episode_bars=400, no_entry_bars=0, flatten_at_close=False),
    dict(window=3, episode_bars=60, no_entry_bars=5, flatten_at_close=True),
]


def random_params(rng):
    return ref.default_params(
        **STATIC_COMBOS[rng.integers(len(STATIC_COMBOS))],
        sl_atr_mult=float(rng.choice([0.5, 1.0, 1.5])),
        tp_atr_mult=float(rng.choice([1.0, 2.0, 3.0])),
        slippage_ticks=float(rng.integers(0, 3)),
        dd_limit=float(rng.choice([300.0, 800.0, 3000.0])),
        dd_lock_offset=float(rng.choice([0.0, 100.0])),
        breach_penalty=float(rng.choice([0.0, 1.0])),
        contracts=int(rng.integers(1, 3)),
    )


def assert_episode_matches(j: dict, r: dict, ep: int, exact: tuple, close: tuple) -> None:
    """The JAX env's episode `j` equals the reference's `r`: observations and rewards to 1e-5, the `exact` arrays
    exactly, the `close` prices to 1e-6 relative."""
    assert len(j["reward"]) == len(r["reward"]), ep
    np.testing.assert_allclose(j["obs0"], r["obs0"], rtol=1e-5, atol=1e-5)
    for k in ("obs", "reward"):
        np.testing.assert_allclose(j[k], r[k], rtol=1e-5, atol=1e-5, err_msg=f"episode {ep} {k}")
    for k in ("terminated", "truncated") + exact:
        np.testing.assert_array_equal(j[k], r[k], err_msg=f"episode {ep} {k}")
    for k in close:
        np.testing.assert_allclose(j[k], r[k], rtol=1e-6, err_msg=f"episode {ep} {k}")


def count_episode(counts: dict, r: dict) -> None:
    """Adds the reference episode's exits, breach and truncation to `counts`."""
    counts["exits"] += int(np.isfinite(r["exit_price"]).sum())
    counts["breaches"] += int(r["terminated"].any())
    counts["truncations"] += int(r["truncated"].any())


def test_parity_with_reference_on_random_episodes():
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    rng = np.random.default_rng(0)
    T = len(d["open"])
    counts = dict(steps=0, exits=0, breaches=0, truncations=0)
    for ep in range(200):
        params = random_params(rng)
        start = int(rng.integers(params["window"] - 1, T - 50))
        end = int(rng.integers(start + 2, T + 1))
        r = ref.random_legal_episode(d, spec, params, start, end, PAD, rng)
        assert_episode_matches(
            jax_run_episode(d, spec, params, start, end, r["actions"]), r, ep, exact=("mask", "dir"), close=("exit_price",)
        )
        counts["steps"] += len(r["reward"])
        count_episode(counts, r)
    # the episodes exercised the rules, not just HOLD
    assert counts["exits"] > 300 and counts["breaches"] > 10 and counts["truncations"] > 50, counts


def test_phase2_parity_with_reference_on_random_episodes():
    """Phase 2 (6 actions, break-even, trailing) against the reference, random legal actions."""
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    rng = np.random.default_rng(5)
    T = len(d["open"])
    counts = dict(steps=0, exits=0, breaches=0, truncations=0, be_moves=0, ratchets=0)
    for ep in range(200):
        params = ref.default_params(
            phase=2,
            window=3,
            trail_atr_mult=float(rng.choice([0.5, 1.0, 2.0])),
            sl_atr_mult=float(rng.choice([1.0, 2.0, 4.0])),
            tp_atr_mult=float(rng.choice([2.0, 6.0])),
            slippage_ticks=float(rng.integers(0, 3)),
            dd_limit=float(rng.choice([300.0, 800.0, 3000.0])),
            dd_lock_offset=float(rng.choice([0.0, 100.0])),
            breach_penalty=float(rng.choice([0.0, 1.0])),
            episode_bars=int(rng.choice([60, 400])),
            no_entry_bars=5,
            contracts=int(rng.integers(1, 3)),
            flatten_at_close=bool(rng.random() < 0.5),
        )
        start = int(rng.integers(params["window"] - 1, T - 50))
        end = int(rng.integers(start + 2, T + 1))
        r = ref.random_legal_episode(d, spec, params, start, end, PAD, rng)
        j = jax_run_episode(d, spec, params, start, end, r["actions"])
        n = len(r["reward"])
        assert len(j["reward"]) == n, ep
        assert r["mask"].shape == (n, 6)
        np.testing.assert_allclose(j["obs0"], r["obs0"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(j["obs"], r["obs"], rtol=1e-5, atol=1e-5, err_msg=f"episode {ep}")
        np.testing.assert_allclose(j["reward"], r["reward"], rtol=1e-5, atol=1e-5, err_msg=f"episode {ep}")
        np.testing.assert_array_equal(j["mask"], r["mask"])
        np.testing.assert_array_equal(j["terminated"], r["terminated"])
        np.testing.assert_array_equal(j["truncated"], r["truncated"])
        np.testing.assert_array_equal(j["dir"], r["dir"])
        np.testing.assert_allclose(j["sl"], r["sl"], rtol=1e-6, err_msg=f"episode {ep}")
        np.testing.assert_allclose(j["exit_price"], r["exit_price"], rtol=1e-6)
        counts["steps"] += n
        counts["exits"] += int(np.isfinite(r["exit_price"]).sum())
        counts["breaches"] += int(r["terminated"].any())
        counts["truncations"] += int(r["truncated"].any())
        counts["be_moves"] += int((r["actions"] == ref.MOVE_SL_TO_BE).sum())
        # the stop moved while the same position stayed open, without a break-even move: a trailing ratchet
        same_pos = (
            (r["dir"][1:] != 0)
            & (r["dir"][1:] == r["dir"][:-1])
            & np.isnan(r["entry_price"][1:])
            & np.isnan(r["exit_price"][:-1])
        )
        counts["ratchets"] += int((same_pos & (r["sl"][1:] != r["sl"][:-1]) & (r["actions"][1:] != ref.MOVE_SL_TO_BE)).sum())
    # the episodes exercised the rules, the new ones included
    assert counts["exits"] > 300 and counts["breaches"] > 10 and counts["truncations"] > 50, counts
    assert counts["be_moves"] > 100 and counts["ratchets"] > 300, counts


# ---- BACKTEST ----
SPLIT_END_ROWS = [
    (100, 100.5, 99.5, 100),
    (100, 100.5, 99.5, 100),  # t=1: BUY
    (100, 101, 99.5, 100.5),  # entry 100.25, stop 98.25, target 104.25
    (100.5, 101.5, 100, 101),
    (101, 102, 100.5, 101.5),
    (101.5, 102, 101, 101.5),  # the split's last bar (hi = 6): exit 101.5 - 0.25
    (150, 150, 150, 150),
]  # after the split: would fill the target


def _buy_when_legal(policy_args, key, obs, mask):
    return jnp.where(mask[pt.BUY], pt.BUY, pt.HOLD)


@pytest.mark.parametrize("flatten_at_close", [True, False])
def test_backtest_closes_the_open_position_at_the_split_end(flatten_at_close):
    """A long still open on the split's last bar is sold at that bar's close minus slippage, with the exit
    commission, whether or not flatten_at_close is on; bars after the split end play no part."""
    rows = SPLIT_END_ROWS
    p = ref.default_params(flatten_at_close=flatten_at_close)
    data = market_data(ref.make_data_ohlc(rows, session_end=[False] * 7), ref.default_spec(), 1, 6)
    out = pt.play_one(pt.make_backtest(env_params(p), data), _buy_when_legal, None, 0, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out["t"], [2, 3, 4, 5])
    np.testing.assert_array_equal(out["dir"], [1, 1, 1, 0])
    np.testing.assert_allclose(out["closed_price"][:, 1], [np.nan, np.nan, np.nan, 101.25])
    assert np.isnan(out["closed_price"][:, 0]).all()  # discrete actions never close at the open
    # (101.25 - 100.25) x 50 - 2 x 2 commissions = 46, realised: the last equity holds no open position
    np.testing.assert_allclose(out["closed_round_trip"][:, 1], [0, 0, 0, 46.0])
    np.testing.assert_allclose(out["equity"], [-2 + 0.25 * 50, -2 + 0.75 * 50, -2 + 1.25 * 50, 46.0])


def test_backtest_keeps_a_position_through_a_session_end_without_flatten_at_close():
    """flatten_at_close off: the session end at bar 3 closes nothing, the split end at bar 5 does. On: the
    session end closes at bar 3, and no new entry is allowed within no_entry_bars (1) of the split's last bar."""
    rows = SPLIT_END_ROWS
    session_end = [False, False, False, True, False, False, False]
    for flatten, exits in ((False, [np.nan, np.nan, np.nan, 101.25]), (True, [np.nan, 100.75, np.nan, np.nan])):
        data = market_data(ref.make_data_ohlc(rows, session_end=session_end), ref.default_spec(), 1, 6)
        bt = pt.make_backtest(env_params(ref.default_params(flatten_at_close=flatten)), data)
        out = pt.play_one(bt, _buy_when_legal, None, 0, jax.random.PRNGKey(0))
        # flatten on: closed at bar 3 (101 - 0.25); BUY at t=4 (1 bar before the split's last) is illegal
        np.testing.assert_allclose(out["closed_price"][:, 1], exits)
        np.testing.assert_array_equal(np.isfinite(out["entry_price"]), [True, False, False, False])


def test_backtest_split_end_close_of_a_continuous_position():
    """--action-space continuous, 2 contracts held to the split's last bar: both sold at its close minus
    slippage; (101.25 - 100.25) x 50 x 2 - 4 commissions of 2 = 92."""
    rows = SPLIT_END_ROWS
    params = env_params(ref.default_params(flatten_at_close=False)).replace(action_space="continuous", max_contracts=2)
    data = market_data(ref.make_data_ohlc(rows, session_end=[False] * 7), ref.default_spec(), 1, 6)
    out = pt.play_one(pt.make_backtest(params, data), lambda *a: jnp.float32(1.0), None, 0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["closed_price"][:, 1], [np.nan, np.nan, np.nan, 101.25])
    np.testing.assert_allclose(out["closed_round_trip"].sum(1), [0, 0, 0, 92.0])
    np.testing.assert_allclose(out["equity"][-1], 92.0)


def test_backtest_breach_caused_by_the_split_end_close_is_reported():
    """Marked to market the account ends at +60.5 (peak); the split-end close's slippage and commission
    take it to +46, at or below peak - dd_limit (60.5 - 14 = 46.5): a breach on the last bar, in the
    backtest's output and in the report."""
    rows = SPLIT_END_ROWS
    p = ref.default_params(dd_limit=14.0)
    data = market_data(ref.make_data_ohlc(rows, session_end=[False] * 7), ref.default_spec(), 1, 6)
    bt = pt.make_backtest(env_params(p), data)
    out = pt.play_one(bt, _buy_when_legal, None, 0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["equity"], [10.5, 35.5, 60.5, 46.0])
    np.testing.assert_array_equal(out["breach"], [False, False, False, True])
    info = dict(markets=["X"], bounds=[{"test": (0, 6)}], timestamps=[np.arange(7, dtype=np.int64) * 3_600_000_000_000])
    report, _ = pt.backtest_report(bt, data, info, "test", env_params(p), {"policy": (_buy_when_legal, None)}, 0)
    assert report["X"]["policy"]["breached"] is True and report["X"]["policy"]["trades"] == 1


def test_sampled_backtest_policy_draws_legal_actions_with_the_policy_probabilities():
    """The report's "sampled" row: actions drawn from the masked softmax (never an illegal one); continuous:
    targets inside (-1, 1) whose mean is E[tanh(x)] of the policy's Gaussian."""
    obs = jax.random.normal(jax.random.PRNGKey(1), (12,))
    keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
    net = pt.ActorCritic(6, 16)
    params = net.init(jax.random.PRNGKey(0), obs)
    params = jax.tree.map(lambda x: x * 40.0, params)  # far from uniform probabilities
    norm = lambda x: x  # noqa: E731
    mask = jnp.array([True, False, True, True, False, True])
    draws = np.asarray(jax.vmap(pt.sampled_policy(net), in_axes=(None, 0, None, None))((params, norm), keys, obs, mask))
    probs = np.asarray(pt.masked_policy(net.apply(params, obs)[0], mask).probs)
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert freq[~np.asarray(mask)].sum() == 0
    np.testing.assert_allclose(freq, probs, atol=5 * np.sqrt(0.25 / len(draws)))
    assert probs.max() < 0.99 and np.sort(probs)[-2] > 0.02, probs  # a real mixture, not a greedy policy in disguise

    cnet = pt.ActorCritic(1, 16, continuous=True)
    cparams = cnet.init(jax.random.PRNGKey(0), obs)
    cparams["params"]["policy_head"]["bias"] = jnp.array(
        [0.8]
    )  # mean about 0.8, std exp(-0.7): an asymmetric, narrow target law
    cparams["params"]["log_std"] = jnp.array([-0.7])
    targets = np.asarray(
        jax.vmap(pt.sampled_policy(cnet), in_axes=(None, 0, None, None))((cparams, norm), keys, obs, mask), np.float64
    )
    mean, log_std = np.asarray(cnet.apply(cparams, obs)[0], np.float64)
    ref_targets = np.tanh(mean + np.exp(log_std) * np.random.default_rng(0).normal(size=400_000))
    assert np.all(np.abs(targets) < 1)
    np.testing.assert_allclose(targets.mean(), ref_targets.mean(), atol=5 * ref_targets.std() / np.sqrt(len(targets)))
    np.testing.assert_allclose(targets.std(), ref_targets.std(), rtol=0.03)
    # the whole law: the largest gap between the two empirical CDFs (Kolmogorov-Smirnov) stays small
    grid = np.linspace(-1, 1, 401)
    ks = np.abs(
        np.searchsorted(np.sort(targets), grid) / len(targets) - np.searchsorted(np.sort(ref_targets), grid) / len(ref_targets)
    ).max()
    assert ks < 0.02, ks


# ---- NO LOOK-AHEAD ----
def test_changing_bars_and_calendar_after_t_leaves_the_past_unchanged():
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    params = ref.default_params(window=4, episode_bars=2000, dd_limit=5000.0, no_entry_bars=3)
    rng = np.random.default_rng(1)
    start, t_cut = 500, 900
    r = ref.random_legal_episode(d, spec, params, start, len(d["open"]), 1000, rng)
    base = jax_run_episode(d, spec, params, start, len(d["open"]), r["actions"])
    alt = {k: np.array(v, copy=True) for k, v in d.items()}
    k = slice(t_cut + 1, None)
    scale = rng.uniform(0.9, 1.1, len(alt["open"][k]))
    for key in ("open", "high", "low", "close"):
        alt[key][k] = alt[key][k] * scale
    alt["atr"][k] *= 3.0
    alt["features"][k] = rng.normal(size=alt["features"][k].shape)
    # the calendar arrays too: a decision at t reads them at bars up to t only
    n_after = len(alt["open"][k])
    alt["session_end"][k] = rng.random(n_after) < 0.05
    alt["rth"][k] = rng.random(n_after) < 0.7
    alt["bars_to_close"][k] = rng.integers(0, 400, n_after)
    alt["hours_to_close"][k] = rng.uniform(0, 24, n_after)
    changed = jax_run_episode(alt, spec, params, start, len(d["open"]), r["actions"])
    n_past = t_cut - start  # steps whose played bar u <= t_cut
    np.testing.assert_array_equal(changed["obs"][:n_past], base["obs"][:n_past])
    np.testing.assert_array_equal(changed["mask"][: n_past + 1], base["mask"][: n_past + 1])
    np.testing.assert_array_equal(changed["reward"][:n_past], base["reward"][:n_past])
    assert not np.array_equal(changed["obs"], base["obs"])


# ---- MASKING ----
def test_sampled_actions_are_always_legal_and_log_probs_finite():
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    params = env_params(ref.default_params(window=4, episode_bars=200, dd_limit=1000.0, no_entry_bars=5))
    data = market_data(d, spec, 300, len(d["open"]))
    data = data.replace(starts=jnp.arange(300, 2300, 20, dtype=jnp.int32)[None], n_starts=jnp.array([100], jnp.int32))
    net = pt.ActorCritic(3, 32)
    obs_dim = 4 * d["features"].shape[1] + pt.NUM_POSITION_FEATURES
    nparams = net.init(jax.random.PRNGKey(0), jnp.zeros(obs_dim))
    nparams = jax.tree.map(lambda x: x * 300.0, nparams)  # huge logits: the mask must still hold

    @jax.jit
    def rollout(key):
        obs, state = jax.vmap(pt.reset, in_axes=(0, None, None))(jax.random.split(key, 100), params, data)

        def body(carry, key):
            obs, state = carry
            k1, k2 = jax.random.split(key)
            mask = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(state, params, data)
            logits, _ = net.apply(nparams, obs)
            pi = pt.masked_policy(logits, mask)
            a = pi.sample(seed=k1)
            obs, state, *_ = jax.vmap(pt.step, in_axes=(0, 0, 0, None, None))(
                jax.random.split(k2, 100), state, a, params, data
            )
            return (obs, state), (mask, a, pi.log_prob(a), pi.entropy())

        _, out = jax.lax.scan(body, (obs, state), jax.random.split(key, 100))
        return out

    mask, a, logp, ent = (np.asarray(x) for x in rollout(jax.random.PRNGKey(3)))
    assert a.size == 10_000
    assert np.take_along_axis(mask, a[..., None], -1).all()
    assert np.isfinite(logp).all() and np.isfinite(ent).all() and (ent >= -1e-6).all()
    assert (mask[..., 1]).any() and (~mask[..., 1]).any() and (a != 0).any()


def test_masked_logits_gradients_are_finite():
    logits = jnp.array([[3.0, -2.0, 50.0], [0.1, 0.2, 0.3]])
    mask = jnp.array([[True, False, False], [True, True, False]])

    def f(lg):
        pi = pt.masked_policy(lg, mask)
        return (pi.log_prob(jnp.array([0, 1])) + pi.entropy()).sum()

    g = jax.grad(f)(logits)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.exp(pt.masked_policy(logits, mask).log_prob(jnp.array([0, 0]))), [1.0, 0.475021], rtol=1e-5)


# ---- GAE ----
def gae_loop(reward, value, term, trunc, final_value, last_value, gamma, lam):
    """Plain Python GAE over one env: bootstrap with V(final obs) at truncation, nothing at termination."""
    T = len(reward)
    adv = np.zeros(T)
    gae = 0.0
    for t in reversed(range(T)):
        if term[t]:
            next_v, cont = 0.0, 0.0
        elif trunc[t]:
            next_v, cont = final_value[t], 0.0
        else:
            next_v = last_value if t == T - 1 else value[t + 1]
            cont = 1.0
        delta = reward[t] + gamma * next_v - value[t]
        gae = delta + gamma * lam * cont * gae
        adv[t] = gae
    return adv


def test_gae_scan_matches_python_loop():
    rng = np.random.default_rng(0)
    T, N = 50, 6
    reward, value, final_value = (rng.normal(size=(T, N)) for _ in range(3))
    term = rng.random((T, N)) < 0.08
    trunc = (rng.random((T, N)) < 0.08) & ~term
    last_value = rng.normal(size=N)
    traj = pt.Transition(
        obs=jnp.zeros((T, N, 1)),
        action=jnp.zeros((T, N), jnp.int32),
        log_prob=jnp.zeros((T, N)),
        value=jnp.asarray(value, jnp.float32),
        reward=jnp.asarray(reward, jnp.float32),
        terminated=jnp.asarray(term),
        truncated=jnp.asarray(trunc),
        final_value=jnp.asarray(final_value, jnp.float32),
        mask=jnp.ones((T, N, 3), bool),
        choice=jnp.ones((T, N), bool),
    )
    adv, targets = pt.compute_gae(traj, jnp.asarray(last_value, jnp.float32), 0.99, 0.95)
    expect = np.stack(
        [
            gae_loop(reward[:, i], value[:, i], term[:, i], trunc[:, i], final_value[:, i], last_value[i], 0.99, 0.95)
            for i in range(N)
        ],
        1,
    )
    np.testing.assert_allclose(np.asarray(adv), expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(targets), expect + value, rtol=1e-4, atol=1e-5)
    assert term.any() and trunc.any()


# ---- TRANSFER: PHASE 1 -> PHASE 2 ----
def test_init_from_keeps_phase1_probabilities(tmp_path):
    """After --init-from, phase 2's probabilities over HOLD/BUY/SELL on phase 1 states match phase 1's
    to within the mass the new actions get (exactly when flat, where the new actions are illegal)."""
    args1 = pt.Args(window=4, hidden=32, num_envs=16)
    datasets, info = pt.load_data(args1)
    data = datasets["train"]
    F = data.features.shape[-1]
    p1, p2 = pt.env_params_from_args(args1), pt.env_params_from_args(pt.Args(window=4, phase=2))
    net1 = pt.ActorCritic(3, 32)
    params1 = net1.init(jax.random.PRNGKey(0), jnp.zeros(pt.obs_size(4, F, 1)))
    params1 = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 150.0 if "policy_head" in str(path) else x, params1
    )  # logits of a few units
    # a phase 1 normaliser fitted on random-play observations
    obs, states = jax.vmap(pt.reset, in_axes=(0, None, None))(jax.random.split(jax.random.PRNGKey(1), 256), p1, data)

    @jax.jit
    def play(states, obs, key):
        def body(carry, k):
            states, obs = carry
            k1, k2 = jax.random.split(k)
            mask = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(states, p1, data)
            a = jax.vmap(pt.random_policy, in_axes=(None, 0, 0, 0))(None, jax.random.split(k1, 256), obs, mask)
            obs, states, *_ = jax.vmap(pt.step, in_axes=(0, 0, 0, None, None))(jax.random.split(k2, 256), states, a, p1, data)
            return (states, obs), (states, obs)

        return jax.lax.scan(body, (states, obs), jax.random.split(key, 40))[1]

    traj_states, traj_obs = play(states, obs, jax.random.PRNGKey(2))
    norm1 = pt.ObsNorm.create(traj_obs.shape[-1]).update(traj_obs.reshape(-1, traj_obs.shape[-1]))
    ckpt = tmp_path / "phase1.msgpack"
    pt.save_policy(ckpt, params1, norm1, args1, info)

    args2 = pt.Args(window=4, hidden=32, num_envs=16, phase=2, init_from=str(ckpt))
    transfer = pt.load_transfer(str(ckpt), args2, F)
    init, _, _, net2 = pt.make_train(args2, p2, data, transfer=transfer)
    runner = jax.jit(init)(jax.random.PRNGKey(3))
    params2, norm2 = runner.train_state.params, runner.obs_norm
    D1 = pt.obs_size(4, F, 1)
    np.testing.assert_array_equal(np.asarray(norm2.mean[:D1]), np.asarray(norm1.mean))
    np.testing.assert_array_equal(np.asarray(norm2.var[:D1]), np.asarray(norm1.var))
    assert float(norm2.count) == float(norm1.count)

    states = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), traj_states)
    obs1 = jax.vmap(pt.get_obs, in_axes=(0, None, None))(states, p1, data)
    obs2 = jax.vmap(pt.get_obs, in_axes=(0, None, None))(states, p2, data)
    np.testing.assert_array_equal(np.asarray(obs2[:, :D1]), np.asarray(obs1))  # phase 1's layout is phase 2's prefix
    mask1 = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(states, p1, data)
    mask2 = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(states, p2, data)
    prob1 = np.asarray(jax.nn.softmax(pt.masked_policy(net1.apply(params1, norm1(obs1))[0], mask1).logits))
    prob2 = np.asarray(jax.nn.softmax(pt.masked_policy(net2.apply(params2, norm2(obs2))[0], mask2).logits))
    new_mass = prob2[:, 3:].sum(-1)
    flat = np.asarray(states.dir) == 0
    assert flat.any() and (~flat).any()
    assert (np.abs(prob2[:, :3] - prob1).max(-1) <= new_mass + 1e-5).all()
    np.testing.assert_allclose(prob2[flat, :3], prob1[flat], atol=1e-5)
    assert (new_mass[flat] == 0).all()
    # in a position, 1 or 2 new actions are legal, each with about 1% of HOLD's probability
    assert 0.005 < new_mass[~flat].min() and new_mass[~flat].max() < 0.03, (new_mass[~flat].min(), new_mass[~flat].max())
    # flat states with a confident phase 1 policy: the transfer is not trivially uniform
    assert prob1[flat].max() > 0.8


# ---- WHAT TRAINING SEES ----
def test_training_visits_every_bars_to_close_value_the_backtest_plays(tmp_path):
    """Episodes start at any RTH bar of the training split: random play over the learning test's data visits every
    bars-to-the-close value of the test split's RTH decision bars, the last minutes of a session included."""
    path = tmp_path / "syn.npz"
    assert dp.main(["synthetic-intraday", "--out", str(path), "--days", "60", "--seed", "0", "--signal-strength", "2"]) == 0
    args = pt.Args(data=str(path), window=8)
    datasets, _ = pt.load_data(args)
    params, train = pt.env_params_from_args(args), datasets["train"]
    num_envs = 256

    @jax.jit
    def visited(key):
        obs, states = jax.vmap(pt.reset, in_axes=(0, None, None))(jax.random.split(key, num_envs), params, train)

        def body(carry, k):
            obs, states = carry
            k1, k2 = jax.random.split(k)
            mask = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(states, params, train)
            action = jax.vmap(pt.random_policy, in_axes=(None, 0, 0, 0))(None, jax.random.split(k1, num_envs), obs, mask)
            obs, states, *_ = jax.vmap(pt.step, in_axes=(0, 0, 0, None, None))(
                jax.random.split(k2, num_envs), states, action, params, train
            )
            return (obs, states), (states.market, states.t)

        return jax.lax.scan(body, (obs, states), jax.random.split(key, 512))[1]

    market, t = (np.asarray(x).ravel() for x in visited(jax.random.PRNGKey(0)))
    rth, bars_to_close = np.asarray(train.rth), np.asarray(train.bars_to_close)
    trained = set(bars_to_close[market, t][rth[market, t]].tolist())
    test = datasets["test"]
    lo, hi = int(test.lo[0]) + args.window - 1, int(test.hi[0]) - 1
    decision = np.arange(lo, hi)
    played = set(bars_to_close[0, decision][rth[0, decision]].tolist())
    assert min(played) == 0 and max(played) == 389  # the test split's RTH bars: every minute of the session
    assert played <= trained, sorted(played - trained)[:10]


def test_backtest_observation_is_the_training_observation():
    """The position features the backtest shows the policy are `get_obs`'s with the training EnvParams: bars in
    position / --episode-bars (64 here), not over an episode length of its own. A long is held; the policy's raw
    output records the feature it saw (0.9 - 0.01 x feature: always rounded to a target of 1 contract)."""
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    window, episode_bars = 3, 64
    params = env_params(ref.default_params(window=window, episode_bars=episode_bars, dd_limit=1e6)).replace(
        action_space="continuous"
    )
    data = market_data(d, spec, window - 1, 1500)
    index = window * d["features"].shape[1] + 4  # bars in position / episode_bars

    def policy(policy_args, key, obs, mask):
        return 0.9 - 0.01 * obs[index]

    out = pt.play_one(pt.make_backtest(params, data), policy, None, 0, jax.random.PRNGKey(0))
    held = out["dir"] != 0
    run = np.zeros(len(held), int)  # bars in position after each step
    for i in range(len(held)):
        run[i] = run[i - 1] + 1 if held[i] and i > 0 else int(held[i])
    seen = (0.9 - out["action"].astype(np.float64)) / 0.01
    expected = np.r_[0, run[:-1]] / episode_bars
    np.testing.assert_allclose(seen, expected, atol=1e-4)
    assert expected.max() > 0.25  # positions held for many bars: a feature far from 0


def test_buy_and_hold_is_held_to_the_trailing_drawdown():
    """1 contract long from bar 2's open (100 + 0.25 slippage), point value 50, commission 2 a side. Limit 100: the
    close of bar 4 (97) marks -164.5 <= 10.5 - 100, so it sells at 97 - 0.25 and stays flat: -164.5 - 2 - 12.5 = -179.
    Limit 1000: no breach, sold at the split's last close 106 - 0.25: 5.75 x 50 - 2 - 2 - 12.5 = 271."""
    rows = [
        (100, 100.5, 99.5, 100),
        (100, 100.5, 99.5, 100),
        (100, 100.5, 99.5, 100.5),
        (100.5, 100.5, 98.5, 99),
        (99, 99, 96.5, 97),
        (97, 105.5, 97, 105),
        (105, 106.5, 104.5, 106),
    ]
    data = market_data(ref.make_data_ohlc(rows), ref.default_spec(), 1, 7)
    equity, breached = pt.buy_and_hold(data, 0, env_params(ref.default_params(dd_limit=100.0)))
    np.testing.assert_allclose(equity, [10.5, -64.5, -179.0, -179.0, -179.0])
    assert breached
    equity, breached = pt.buy_and_hold(data, 0, env_params(ref.default_params(dd_limit=1000.0)))
    np.testing.assert_allclose(equity, [10.5, -64.5, -164.5, 235.5, 271.0])
    assert not breached


def test_trades_of_a_scale_in_and_a_reversal():
    """Continuous targets by decision bar t (read from the default features 10 t + f): +1 contract at t=1, +2 at t=2,
    -1 at t=3, 0 at t=4. Fills at the next opens with 0.25 slippage: long 100.25 then 100.75 (average 100.5); the
    reversal sells both at 100.25 (2 x (-0.25 x 50 - 2) - 2 x 2 = -33) and shorts at 100.25; closed at bar 5's open."""
    rows = [(100, 100.5, 99.5, 100)] * 3 + [(100.5, 101, 100, 100.5)] * 2 + [(100, 100.5, 99.5, 100)] * 2
    data = market_data(ref.make_data_ohlc(rows), ref.default_spec(), 1, 7)
    params = env_params(ref.default_params()).replace(action_space="continuous", max_contracts=2)
    targets = jnp.array([0.0, 0.5, 1.0, -0.5, 0.0, 0.0, 0.0])

    def policy(policy_args, key, obs, mask):
        return targets[(obs[2] / 10).astype(jnp.int32)]  # obs[2]: feature 0 of the decision bar = 10 t

    out = pt.play_one(pt.make_backtest(params, data), policy, None, 0, jax.random.PRNGKey(0))
    hour = np.arange(7, dtype=np.int64) * 3_600_000_000_000
    rows_csv = pt.trade_rows(out, "X", hour)
    stamp = lambda h: str(np.datetime64(int(hour[h]), "ns"))  # noqa: E731
    assert rows_csv == [
        f"X,{stamp(2)},{stamp(4)},long,100.5,100.25,-33.00",
        f"X,{stamp(4)},{stamp(5)},short,100.25,100.25,-4.00",
    ], rows_csv
    assert pt.trade_metrics(out)["trades"] == 2


def test_hours_and_bars_to_close_come_from_the_calendar(tmp_path):
    """A session whose bars stop at 14:14 (a gap in the data) shows at 09:30 the same 6.48 hours and 389 bars to the
    close as a complete session: the scheduled 16:00 close, not the last bar present."""
    frame, _, _ = dp.synthetic_intraday_frame(6, 0, 1.0, 30.0, "2024-03-04")
    local = (
        frame.index.tz_localize("UTC").tz_convert("America/New_York")
        if frame.index.tz is None
        else frame.index.tz_convert("America/New_York")
    )
    gap_day = sorted(set(local.date))[2]
    drop = (local.date == gap_day) & (local.hour * 60 + local.minute >= 14 * 60 + 15)
    arrays, specs = dp.build_intraday([("ES", frame[~drop], 60, dp.MARKETS["ES"])], "America/New_York", None, "17:00", 1, {})
    path = tmp_path / "gap.npz"
    dp.save_npz(path, arrays, dict(kind="intraday", tz="America/New_York", markets=specs))
    datasets, info = pt.load_data(pt.Args(data=str(path), window=4, episode_bars=64, train_end="0.9", val_end="0.95"))
    ts = info["timestamps"][0]
    opens = np.flatnonzero(pd.DatetimeIndex(ts).tz_localize("UTC").tz_convert("America/New_York").strftime("%H:%M") == "09:30")
    hours, bars = np.asarray(datasets["train"].hours_to_close)[0, opens], np.asarray(datasets["train"].bars_to_close)[0, opens]
    np.testing.assert_allclose(hours, 389 / 60, rtol=1e-6)
    np.testing.assert_array_equal(bars, 389)
    assert np.asarray(datasets["train"].session_end)[0].sum() == 6  # the gapped session still ends at its last bar (flatten)


def test_observation_normaliser_starts_from_a_random_policy_rollout():
    """The normaliser of a fresh run is fitted on random legal play, open positions included: fitted on reset
    observations alone (flat accounts) the position features would get a variance near 0, and the first rollout
    would see every open position at the +-10 clip."""
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    data = market_data(d, spec, 300, len(d["open"])).replace(
        starts=jnp.arange(300, 2300, 20, dtype=jnp.int32)[None], n_starts=jnp.array([100], jnp.int32)
    )
    args = pt.Args(window=3, num_envs=16, num_steps=32, hidden=16)
    params = env_params(ref.default_params(window=3))
    init, _, _, _ = pt.make_train(args, params, data)
    norm = jax.jit(init)(jax.random.PRNGKey(0)).obs_norm
    direction = 3 * d["features"].shape[1]
    assert float(norm.var[direction]) > 0.1, float(norm.var[direction])  # random play holds longs and shorts
    long = pt.reset_at(0, 1000).replace(
        dir=jnp.int32(1),
        entry=jnp.float32(d["close"][1000]),
        sl=jnp.float32(d["close"][1000] - 3),
        tp=jnp.float32(d["close"][1000] + 6),
        bars_in_pos=jnp.int32(5),
    )
    position = np.asarray(norm(pt.get_obs(long, params, data)))[direction:]
    assert np.abs(position).max() < 10, position  # an ordinary open position is not at the clip


@pytest.mark.parametrize("phase, action_space", [(1, "discrete"), (2, "discrete"), (1, "continuous")])
def test_rollout_log_probs_equal_the_loss_log_probs(phase, action_space):
    """At the parameters that collected a rollout, the loss recomputes the stored log-probs: ratio 1, approx_kl and
    clipfrac 0 (stored normalised observations, masks and pre-squash actions are what the loss reads)."""
    d = synthetic_market()
    spec = ref.default_spec(point_value=50.0, tick_size=0.25, commission=2.25)
    data = market_data(d, spec, 300, len(d["open"])).replace(
        starts=jnp.arange(300, 2300, 20, dtype=jnp.int32)[None], n_starts=jnp.array([100], jnp.int32)
    )
    args = pt.Args(window=3, num_envs=32, num_steps=64, hidden=16, phase=phase, action_space=action_space)
    params = env_params(ref.default_params(window=3, phase=phase)).replace(action_space=action_space)
    init, _, _, network = pt.make_train(args, params, data)
    runner = jax.jit(init)(jax.random.PRNGKey(0))
    scaled = jax.tree.map(lambda x: x * 3.0, runner.train_state.params)  # a policy far from uniform
    runner = runner._replace(train_state=runner.train_state.replace(params=scaled))
    collect = jax.jit(
        lambda r: jax.lax.scan(lambda c, x: pt.rollout_step(network, params, data, c, x), r, None, args.num_steps)
    )
    _, (traj, _, _) = collect(runner)
    batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), traj)
    log_prob, _, _ = pt.evaluate_actions(network, scaled, batch.obs, batch.action, batch.mask)
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(batch.log_prob), atol=2e-5)
    adv = jax.random.normal(jax.random.PRNGKey(1), batch.reward.shape)
    _, (_, _, _, approx_kl, clipfrac) = pt.ppo_loss(scaled, network, args, batch, adv, adv)
    assert abs(float(approx_kl)) < 1e-6 and float(clipfrac) == 0.0
    choice = np.asarray(batch.choice)
    assert choice.any() and (~choice).any()  # forced samples (flat outside RTH, or only HOLD legal) are present
    if action_space == "discrete":
        assert (np.asarray(batch.action)[choice] != pt.HOLD).any()
