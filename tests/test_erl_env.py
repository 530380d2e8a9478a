"""erl_trader.py env vs the NumPy reference, hand scenarios, no look-ahead, GA operators, replay, injection."""

import dataclasses
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_prep as dp
import erl_reference as ref
import erl_trader as et
from test_erl_reference import SCENARIOS


def market_data(d: dict) -> et.MarketData:
    f32 = lambda k: jnp.asarray(np.asarray(d[k]), jnp.float32)  # noqa: E731
    return et.MarketData(open=f32("open"), high=f32("high"), low=f32("low"), close=f32("close"), valid=jnp.asarray(d["valid"]),
                         features=f32("features"), inv=jnp.asarray(np.flatnonzero(d["investable"]), jnp.int32),
                         lo=jnp.int32(0), hi=jnp.int32(len(d["close"])))


def env_params(p: dict) -> et.EnvParams:
    return et.EnvParams(window=p["window"], max_positions=p["max_positions"], trading_days=p["trading_days"], settlement_days=p["settlement_days"],
                        max_holding_days=p["max_holding_days"], coef_max=p["coef_max"], coef_threshold=p["coef_threshold"],
                        cost_bps=p["cost_bps"], hurdle_pct=p["hurdle_pct"], inaction_penalty=p["inaction_penalty"])


@jax.jit
def _run(params: et.EnvParams, data: et.MarketData, start, coefs, targets):
    state = et.reset_at(start, params)

    def body(state, ct):
        nxt, reward, done, info = et.step(state, ct[0], ct[1], params, data)
        held = jnp.zeros(data.open.shape[1], bool).at[nxt.col].max(nxt.held)
        return nxt, dict(obs=et.get_obs(nxt.t, params, data), reward=reward, done=done, cash=nxt.cash, equity=nxt.equity, held=held,
                         n_exits=info["n_exits"], exit_reward_sum=info["exit_reward"].sum(), opened=info["opened"])

    _, out = jax.lax.scan(body, state, (coefs, targets))
    return et.get_obs(jnp.int32(start), params, data), out


def jax_run_episode(data, params, start, coefs, targets) -> dict:
    """Same signature and outputs as erl_reference.run_episode, computed by erl_trader's env."""
    coefs, targets = np.asarray(coefs, np.float32), np.asarray(targets, np.float32)
    obs0, out = _run(env_params(params), market_data(data), jnp.int32(start), jnp.asarray(coefs), jnp.asarray(targets))
    out = {k: np.asarray(v) for k, v in out.items()}
    n = int(np.argmax(out["done"])) + 1 if out["done"].any() else len(coefs)
    return dict({k: v[:n] for k, v in out.items()}, obs0=np.asarray(obs0))


# ---- HAND SCENARIOS ----
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_scenarios_on_jax_env(scenario):
    scenario(jax_run_episode)


# ---- PARITY ----
@lru_cache(maxsize=1)
def synthetic_universe():
    frames, signal, _ = dp.synthetic_daily_frames(8, 400, 5, 1.0, 2, 5.0)
    a = dp.build_daily(frames, None, ("MKT",), 1, {})
    # prices on a 1/64 grid: targets and fills compare the same way in float32 and float64
    px = {k: np.maximum(np.round(a[k].astype(np.float64) * 64) / 64, 0.0) for k in ("open", "high", "low", "close")}
    px["high"] = np.maximum.reduce([px["high"], px["open"], px["close"]])
    px["low"] = np.minimum.reduce([px["low"], px["open"], px["close"]])
    return dict(px, valid=a["valid"] & (px["close"] > 0), investable=a["investable"], features=a["features"][..., :4].astype(np.float64))


def test_parity_with_reference_on_random_episodes():
    d = synthetic_universe()
    rng = np.random.default_rng(0)
    T = len(d["close"])
    totals = dict(exits=0, opens=0, delisted_held=0)
    for ep in range(200):
        params = ref.default_params(window=int(rng.choice([3, 5])), trading_days=int(rng.choice([10, 30])), settlement_days=int(rng.choice([0, 3])),
                                    max_positions=int(rng.choice([1, 3])), max_holding_days=int(rng.choice([2, 6])),
                                    coef_threshold=float(rng.choice([30.0, 60.0])), cost_bps=float(rng.choice([0.0, 10.0])),
                                    hurdle_pct=float(rng.choice([0.0, 0.5])), inaction_penalty=0.01)
        L = params["trading_days"] + params["settlement_days"]
        start = int(rng.integers(params["window"] - 1, T - L - 1))
        r = ref.random_episode(d, params, start, rng)
        j = jax_run_episode(d, params, start, r["coefs"], r["targets"])
        assert len(j["reward"]) == len(r["reward"])
        np.testing.assert_allclose(j["obs0"], r["obs0"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(j["obs"], r["obs"], rtol=1e-4, atol=1e-4)
        for k in ("reward", "exit_reward_sum"):
            np.testing.assert_allclose(j[k], r[k], rtol=1e-5, atol=1e-5, err_msg=f"{k} episode {ep}")
        for k in ("cash", "equity"):
            np.testing.assert_allclose(j[k], r[k], rtol=1e-5, atol=1e-6, err_msg=f"{k} episode {ep}")
        for k in ("done", "held", "n_exits", "opened"):
            np.testing.assert_array_equal(j[k], r[k], err_msg=f"{k} episode {ep}")
        totals["exits"] += int(r["n_exits"].sum())
        totals["opens"] += int((r["opened"] >= 0).sum())
    assert totals["exits"] > 500 and totals["opens"] > 500, totals


# ---- NO LOOK-AHEAD ----
def test_changing_data_after_t_leaves_observations_and_actions_unchanged():
    args = et.Args(window=10, hidden=16, conv_channels=8)
    d = synthetic_universe()
    data = market_data(d)
    params = et.EnvParams(window=10)
    t_cut = 200
    rng = np.random.default_rng(2)
    alt = dict(d)
    for k in ("open", "high", "low", "close"):
        alt[k] = d[k].copy()
        alt[k][t_cut + 1:] *= rng.uniform(0.5, 1.5, alt[k][t_cut + 1:].shape)
    alt["features"] = d["features"].copy()
    alt["features"][t_cut + 1:] = rng.normal(size=alt["features"][t_cut + 1:].shape)
    alt["valid"] = d["valid"].copy()
    alt["valid"][t_cut + 1:, 3] = False
    data_alt = market_data(alt)
    for extractor in ("conv", "lstm"):
        actor = et.Actor(dataclasses.replace(args, extractor=extractor), tuple(np.flatnonzero(d["investable"])))
        prm = actor.init(jax.random.PRNGKey(0), et.get_obs(jnp.int32(50), params, data))
        days = jnp.arange(9, t_cut + 1)
        obs = jax.vmap(et.get_obs, in_axes=(0, None, None))(days, params, data)
        obs_alt = jax.vmap(et.get_obs, in_axes=(0, None, None))(days, params, data_alt)
        np.testing.assert_array_equal(np.asarray(obs), np.asarray(obs_alt))
        act, act_alt = (jax.vmap(actor.apply, in_axes=(None, 0))(prm, o) for o in (obs, obs_alt))
        np.testing.assert_array_equal(np.asarray(act), np.asarray(act_alt))
        later = jax.vmap(et.get_obs, in_axes=(0, None, None))(jnp.arange(t_cut + 1, t_cut + 20), params, data)
        later_alt = jax.vmap(et.get_obs, in_axes=(0, None, None))(jnp.arange(t_cut + 1, t_cut + 20), params, data_alt)
        assert not np.array_equal(np.asarray(later), np.asarray(later_alt))


# ---- GA ----
def toy_population(P=12, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return {"w": jax.random.normal(k[0], (P, 40, 30)), "b": jax.random.normal(k[1], (P, 30))}


def test_elites_unchanged_and_population_size_constant():
    args = et.Args(pop_size=12, num_elites=3)
    pop = toy_population()
    fitness = jnp.arange(12.0)[::-1] * 0.5 + jnp.array([0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0.0])
    new, elites = et.ga_step(jax.random.PRNGKey(1), pop, fitness, args)
    order = np.argsort(-np.asarray(fitness))[:3]
    np.testing.assert_array_equal(np.asarray(elites), order)
    for k in pop:
        assert new[k].shape == pop[k].shape
        np.testing.assert_array_equal(np.asarray(new[k][:3]), np.asarray(pop[k][order]))
    assert not np.array_equal(np.asarray(new["w"][3:]), np.asarray(pop["w"][3:]))


def test_mutation_touches_the_intended_fraction_and_respects_the_clip():
    args = et.Args(mutation_frac=0.1, mutation_strength=0.1, super_mutation_prob=0.05, reset_prob=0.05, weight_clip=2.0)
    params = {"w": jnp.full((200, 200), 1.9), "b": jnp.full((1000,), -1.5)}
    out = et.mutate(jax.random.PRNGKey(0), params, args)
    for k in params:
        changed = np.asarray(out[k] != params[k]).mean()
        assert abs(changed - 0.1) < 0.01, (k, changed)
        assert np.abs(np.asarray(out[k])).max() <= 2.0
    assert (np.asarray(out["w"]) == 2.0).any(), "some +noise on 1.9 must hit the clip"
    rel = np.abs(np.asarray(out["w"] - params["w"]))[np.asarray(out["w"] != params["w"])] / 1.9
    assert np.median(rel) < 0.15  # relative to the weight's size (strength 0.1)


def test_tournament_prefers_fitter_individuals():
    fitness = jnp.arange(10.0)
    winners = np.asarray(et.tournament(jax.random.PRNGKey(0), fitness, 20_000, 3))
    counts = np.bincount(winners, minlength=10) / len(winners)
    # P(win) for rank i of 10 with 3 draws with replacement: ((i+1)^3 - i^3) / 1000
    expect = np.array([((i + 1) ** 3 - i**3) / 1000 for i in range(10)])
    np.testing.assert_allclose(counts, expect, atol=0.01)
    assert np.all(np.diff(counts) > 0)


def test_injection_replaces_the_worst():
    pop = toy_population(P=6)
    fitness = jnp.array([3.0, -1.0, 5.0, -7.0, 0.0, 2.0])
    learner = {"w": jnp.zeros((40, 30)), "b": jnp.ones(30)}
    new, fit, slot = et.inject(pop, fitness, learner, jnp.float32(4.0))
    assert int(slot) == 3 and float(fit[3]) == 4.0
    np.testing.assert_array_equal(np.asarray(new["b"][3]), np.ones(30))
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(np.asarray(new["w"][i]), np.asarray(pop["w"][i]))


# ---- REPLAY ----
def test_observation_rebuilt_from_replay_equals_the_one_seen():
    args = et.Args(pop_size=3, episodes_per_agent=2, worst_k=1, rl_updates=2, batch_size=16, buffer_size=1000, window=8, trading_days=6,
                   settlement_days=2, hidden=8, conv_channels=4, num_elites=1)
    d = synthetic_universe()
    data = market_data(d)
    params = et.EnvParams(window=8, trading_days=6, settlement_days=2, max_positions=args.max_positions)
    inv = tuple(np.flatnonzero(d["investable"]))
    init, chunk, actor, _ = et.make_erl(args, params, data, len(inv), inv)
    runner = init(jax.random.PRNGKey(0))
    start = jnp.int32(40)
    # play one episode recording what the actor saw, then rebuild from the stored day index
    seen = []
    state = et.reset_at(start, params)
    prm = jax.tree.map(lambda x: x[0], runner.pop)
    for _ in range(8):
        o = et.get_obs(state.t, params, data)
        seen.append((int(state.t), np.asarray(o), np.asarray(actor.apply(prm, o))))
        coef, target = et.scale_action(actor.apply(prm, o), params)
        state, *_ = et.step(state, coef, target, params, data)
    runner, _ = jax.jit(chunk)(runner, data)
    rp = runner.replay
    assert int(rp.size) == (3 + 2) * 2 * 8
    for t, obs, _ in seen:
        rebuilt = np.asarray(et.get_obs(jnp.int32(t), params, data))
        np.testing.assert_array_equal(rebuilt, obs)
    # every stored transition's day lies in the training split and its next day is t + 1
    ts = np.asarray(rp.t[: int(rp.size)])
    assert ts.min() >= 7 and (ts + 1 < len(d["close"])).all()
    # n-step transitions: individual 0's first episode (the first L entries) replayed by hand from its first day
    L, n, gamma = 8, args.n_step, args.gamma
    state = et.reset_at(rp.t[0], params)
    rewards, smalls = [], [np.asarray(et.small_state(state, params, data))]
    for _ in range(L):
        coef, target = et.scale_action(actor.apply(prm, et.get_obs(state.t, params, data)), params)
        state, reward, *_ = et.step(state, coef, target, params, data)
        rewards.append(float(reward))
        smalls.append(np.asarray(et.small_state(state, params, data)))
    np.testing.assert_array_equal(np.asarray(rp.t[:L]), int(rp.t[0]) + np.arange(L))
    for k in range(L):
        expect = sum(gamma**j * rewards[k + j] for j in range(n) if k + j < L)
        np.testing.assert_allclose(float(rp.reward[k]), expect, rtol=1e-5, atol=1e-6)
        assert bool(rp.done[k]) == (k + n >= L)
        np.testing.assert_allclose(np.asarray(rp.next_small[k]), smalls[min(k + n, L)], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(rp.small[k]), smalls[k], rtol=1e-5, atol=1e-6)
    assert any(abs(r) > 0.02 for r in rewards), "the episode must contain exits for this check to mean something"
    # memory per transition does not depend on the window
    per = sum(x.dtype.itemsize * int(np.prod(x.shape[1:])) for x in rp[:6])
    assert per == 4 + 4 * (len(inv) * et.SMALL_PER_STOCK + 1) * 2 + 4 * len(inv) * 2 + 4 + 1


def test_small_state_describes_the_open_positions():
    """The critic's state: per investable stock held, unrealised gain, coefficient at entry, days held, distance
    to the target (hand-computed after one open), then the episode progress."""
    d = synthetic_universe()
    data = market_data(d)
    params = et.EnvParams(window=5, trading_days=10, settlement_days=2, max_positions=2, max_holding_days=4, target_max=10.0)
    n = int(data.inv.shape[0])
    state = et.reset_at(jnp.int32(50), params)
    flat = np.asarray(et.small_state(state, params, data))
    assert flat.shape == (n * et.SMALL_PER_STOCK + 1,) and not flat.any()
    coef = jnp.zeros(n).at[2].set(80.0)
    target = jnp.full(n, 5.0)
    state, *_ = et.step(state, coef, target, params, data)  # opens investable stock 2 at day 51's open
    state, *_ = et.step(state, jnp.zeros(n), target, params, data)  # day 52: nothing new (below threshold)
    col = int(data.inv[2])
    entry, close = float(d["open"][51, col]), float(d["close"][52, col])
    assume = bool(state.held.any()) and int(state.t) == 52
    assert assume, "stock 2 must still be held on day 52 for this scenario (no target hit)"
    per = np.asarray(et.small_state(state, params, data))[:-1].reshape(n, et.SMALL_PER_STOCK)
    expect = [1.0, (close / entry - 1) * 10, 0.8, 1 / 4, (entry * 1.05 / close - 1) * 10]
    np.testing.assert_allclose(per[2], expect, rtol=1e-4, atol=1e-5)
    assert not np.delete(per, 2, axis=0).any()
    assert abs(float(et.small_state(state, params, data)[-1]) - 2 / 12) < 1e-6
