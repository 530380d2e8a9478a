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
    return et.MarketData(
        open=f32("open"),
        high=f32("high"),
        low=f32("low"),
        close=f32("close"),
        valid=jnp.asarray(d["valid"]),
        feature_valid=jnp.asarray(d["feature_valid"]),
        features=f32("features"),
        inv=jnp.asarray(np.flatnonzero(d["investable"]), jnp.int32),
        lo=jnp.int32(0),
        hi=jnp.int32(len(d["close"])),
    )


def env_params(p: dict) -> et.EnvParams:
    return et.EnvParams(
        window=p["window"],
        max_positions=p["max_positions"],
        trading_days=p["trading_days"],
        settlement_days=p["settlement_days"],
        max_holding_days=p["max_holding_days"],
        coef_max=p["coef_max"],
        coef_threshold=p["coef_threshold"],
        cost_bps=p["cost_bps"],
        hurdle_pct=p["hurdle_pct"],
        inaction_penalty=p["inaction_penalty"],
    )


@jax.jit
def _run(params: et.EnvParams, data: et.MarketData, start, coefs, targets):
    state = et.reset_at(start, params)

    def body(state, ct):
        nxt, reward, done, info = et.step(state, ct[0], ct[1], params, data)
        held = jnp.zeros(data.open.shape[1], bool).at[nxt.col].max(nxt.held)
        return nxt, dict(
            obs=et.get_obs(nxt.t, params, data),
            reward=reward,
            done=done,
            cash=nxt.cash,
            equity=nxt.equity,
            held=held,
            n_exits=info["n_exits"],
            exit_reward_sum=info["exit_reward"].sum(),
            opened=info["opened"],
        )

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
    valid = a["valid"] & (px["close"] > 0)
    return dict(
        px,
        valid=valid,
        feature_valid=a["feature_valid"] & valid,
        investable=a["investable"],
        features=a["features"][..., :4].astype(np.float64),
    )


def test_parity_with_reference_on_random_episodes():
    d = synthetic_universe()
    rng = np.random.default_rng(0)
    T = len(d["close"])
    totals = dict(exits=0, opens=0, delisted_held=0)
    for ep in range(200):
        params = ref.default_params(
            window=int(rng.choice([3, 5])),
            trading_days=int(rng.choice([10, 30])),
            settlement_days=int(rng.choice([0, 3])),
            max_positions=int(rng.choice([1, 3])),
            max_holding_days=int(rng.choice([2, 6])),
            coef_threshold=float(rng.choice([30.0, 60.0])),
            cost_bps=float(rng.choice([0.0, 10.0])),
            hurdle_pct=float(rng.choice([0.0, 0.5])),
            inaction_penalty=0.01,
        )
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
        alt[k][t_cut + 1 :] *= rng.uniform(0.5, 1.5, alt[k][t_cut + 1 :].shape)
    alt["features"] = d["features"].copy()
    alt["features"][t_cut + 1 :] = rng.normal(size=alt["features"][t_cut + 1 :].shape)
    for k in ("valid", "feature_valid"):
        alt[k] = d[k].copy()
        alt[k][t_cut + 1 :, 3] = False
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


@pytest.mark.parametrize(
    "num_days,train_end,val_end,window", [(400, 200, 300, 20), (2000, 900, 1400, 151), (3000, 1000, 2008, 504)]
)
def test_splits_match_the_reference_and_observations_never_read_the_previous_split(num_days, train_end, val_end, window):
    """One embargo of `window` days: a split's decisions (first decision day to the day before its end) are the
    reference's, a backtest covers all of them, and no observation of validation (test) reads a training
    (validation) day."""
    bounds = et.split_bounds(num_days, train_end, val_end, window)
    expect = ref.split_decision_days(num_days, train_end, val_end, window)
    previous_end = {"train": 0, "val": train_end, "test": val_end}
    for name, (first, end) in bounds.items():
        decisions = list(range(first, first + et.split_days({"bounds": bounds}, name)))
        assert decisions == expect[name], name
        assert decisions[0] - window + 1 >= previous_end[name], name  # the first observation's window
        assert decisions[0] - window + 1 - previous_end[name] <= 1, name  # and no more than one embargo
    assert bounds["val"][0] - (train_end - 1) == window + 1  # window days between the last training day and the first decision


def test_changing_the_training_days_leaves_validation_observations_unchanged():
    d = synthetic_universe()
    T, window = len(d["close"]), 10
    bounds = et.split_bounds(T, 200, 300, window)
    alt = dict(d, features=d["features"].copy(), valid=d["valid"].copy(), feature_valid=d["feature_valid"].copy())
    alt["features"][:200] = np.random.default_rng(0).normal(size=alt["features"][:200].shape)
    alt["valid"][:200, 2] = alt["feature_valid"][:200, 2] = False
    params = et.EnvParams(window=window)
    days = jnp.arange(bounds["val"][0], bounds["val"][1])
    obs, obs_alt = (jax.vmap(et.get_obs, in_axes=(0, None, None))(days, params, market_data(x)) for x in (d, alt))
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(obs_alt))


def test_train_obs_norm_uses_the_training_days_statistics_only(tmp_path):
    """--obs-norm train: each stock's features standardised with the mean and std of its fold's valid training days
    (NumPy, stock by stock), clipped to +-5; changing every day after a fold's training split changes neither its
    statistics nor any observation up to the change; each walk-forward fold has its own training days' statistics."""
    path = tmp_path / "syn.npz"
    assert dp.main(["synthetic-daily", "--out", str(path), "--stocks", "4", "--days", "600", "--seed", "0"]) == 0
    args = et.Args(data=str(path), window=10, trading_days=6, settlement_days=2, train_end="0.5", val_end="0.7",
                   walk_forward=2, obs_norm="train")
    datasets, info = et.load_data(args)
    raw = dict(np.load(path))
    valid = raw["feature_valid"] & raw["valid"]
    for fold in (0, 1):
        fold_sets, fold_info = et.fold_data(datasets, info, fold)
        first, end = fold_info["bounds"]["train"]
        for stock in range(raw["features"].shape[1]):
            days = first + np.flatnonzero(valid[first:end, stock])
            values = raw["features"][days, stock].astype(np.float64)
            np.testing.assert_allclose(np.asarray(fold_sets["val"].feature_mean[stock]), values.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(fold_sets["val"].feature_std[stock]), values.std(0), rtol=1e-4, atol=1e-5)
        data = fold_sets["val"]
        params = et.env_params_from_args(args)
        t = int(data.lo)
        obs = np.asarray(et.get_obs(jnp.int32(t), params, data))
        window = np.asarray(data.features[t - 9 : t + 1])
        expected = np.clip((window - np.asarray(data.feature_mean)) / np.asarray(data.feature_std), -5, 5)
        np.testing.assert_allclose(obs[..., :-1], expected, rtol=1e-5, atol=1e-5)
    fold_means = [np.asarray(et.fold_data(datasets, info, fold)[0]["train"].feature_mean) for fold in (0, 1)]
    assert not np.allclose(*fold_means)  # fold 1 trains on more days

    fold_sets, fold_info = et.fold_data(datasets, info, 0)
    train_end = fold_info["bounds"]["train"][1]
    changed = dict(raw, features=raw["features"].copy())
    changed["features"][train_end:] = np.random.default_rng(1).normal(size=changed["features"][train_end:].shape)
    np.savez(tmp_path / "changed.npz", **changed)
    changed_sets, _ = et.fold_data(*et.load_data(dataclasses.replace(args, data=str(tmp_path / "changed.npz"))), 0)
    np.testing.assert_array_equal(np.asarray(changed_sets["val"].feature_mean), np.asarray(fold_sets["val"].feature_mean))
    params = et.env_params_from_args(args)
    days = jnp.arange(9, train_end)
    obs, changed_obs = (jax.vmap(et.get_obs, in_axes=(0, None, None))(days, params, sets["train"])
                        for sets in (fold_sets, changed_sets))
    np.testing.assert_array_equal(np.asarray(obs), np.asarray(changed_obs))


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


ORIGINAL_ARCHITECTURE = dict(
    extractor="lstm", bidirectional=True, lstm_layers=2, attention_heads=4, layer_norm=True, stock_layers=(16, 12, 6)
)  # the original system's network, at toy widths


def test_original_architecture_has_its_layers():
    """2 bidirectional LSTM layers (4 cells), LayerNorm on the context and the stock features, the stock path's
    shared widths, 4 attention heads, per-stock outputs in [0, 1]."""
    args = et.Args(window=8, hidden=8, conv_channels=4, **ORIGINAL_ARCHITECTURE)
    actor = et.Actor(args, (0, 2, 3))
    obs = jax.random.normal(jax.random.PRNGKey(2), (8, 5, 3))
    params = actor.init(jax.random.PRNGKey(0), obs)["params"]
    cells = [k for k in params["VmapConvLSTMExtractor_0"] if k.startswith("OptimizedLSTMCell")]
    assert len(cells) == 4
    assert [params[f"Dense_{i}"]["kernel"].shape[1] for i in range(3)] == [16, 12, 6]
    assert params["stock_head"]["kernel"].shape == (3, 6, 2)
    assert sum(k.startswith("LayerNorm") for k in params) == 2
    assert params["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (8, 4, 2)
    action = np.asarray(actor.apply({"params": params}, obs))
    assert action.shape == (3, 2) and ((action > 0) & (action < 1)).all()


@pytest.mark.parametrize(
    "network", [dict(extractor="conv"), dict(extractor="lstm"), ORIGINAL_ARCHITECTURE], ids=["conv", "lstm", "original"]
)
def test_crossover_takes_whole_output_units_with_their_bias(network):
    """Crossing an all-ones actor with an all-minus-ones one: in every layer each output unit (kernel column and
    bias entry; per stock in the per-stock head) comes whole from one parent, and units come from both."""
    args = et.Args(window=8, hidden=8, conv_channels=4, **network)
    actor = et.Actor(args, (0, 2, 3))
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((8, 5, 3)))
    ones = jax.tree.map(jnp.ones_like, params)
    child = et.crossover(jax.random.PRNGKey(1), ones, jax.tree.map(lambda x: -x, ones))
    from_first = []
    for path, kernel in jax.tree_util.tree_flatten_with_path(child)[0]:
        if str(path[-1].key) != "kernel":
            continue
        module = child
        for key in path[:-1]:
            module = module[key.key]
        kernel = np.asarray(kernel)
        input_axes = (
            (1,) if et.STOCK_HEAD in str(path) else tuple(range(kernel.ndim - np.ndim(module.get("bias", np.zeros(1)))))
        )
        unit = (
            kernel.take(0, axis=input_axes[0])
            if len(input_axes) == 1
            else kernel.reshape((-1,) + kernel.shape[len(input_axes) :])[0]
        )
        assert (kernel == np.expand_dims(unit, input_axes)).all(), path  # a unit's inputs all from one parent
        if "bias" in module:
            np.testing.assert_array_equal(np.asarray(module["bias"]), unit, err_msg=str(path))
        from_first.append((unit > 0).mean())
    assert 0.3 < np.mean(from_first) < 0.7, from_first


def test_tournament_prefers_fitter_individuals():
    fitness = jnp.arange(10.0)
    winners = np.asarray(et.tournament(jax.random.PRNGKey(0), fitness, 20_000, 3))
    counts = np.bincount(winners, minlength=10) / len(winners)
    # P(win) for rank i of 10 with 3 draws with replacement: ((i+1)^3 - i^3) / 1000
    expect = np.array([((i + 1) ** 3 - i**3) / 1000 for i in range(10)])
    np.testing.assert_allclose(counts, expect, atol=0.01)
    assert np.all(np.diff(counts) > 0)


jit_step = jax.jit(et.step)


def greedy_return(actor, params, start, env_params, data) -> float:
    """The return of one episode played step by step from `start` with the actor's greedy actions."""
    state, total, apply = et.reset_at(jnp.int32(start), env_params), 0.0, jax.jit(actor.apply)
    for _ in range(env_params.trading_days + env_params.settlement_days):
        coef, target = et.scale_action(apply(params, et.get_obs(state.t, env_params, data)), env_params)
        state, reward, *_ = jit_step(state, coef, target, env_params, data)
        total += float(reward)
    return total


def test_injected_actor_is_selected_on_its_own_fitness():
    """The TD3 actor enters the population before the evaluation, so the fitness selection gives it is that of
    the weights it carries. The population here never trades (zero weights: every coefficient at the threshold)
    and pays a large inaction penalty, so the injected actor is the champion: slot 0 after the GA step holds
    exactly the injected weights, and its logged fitness is the worst-k mean of their returns on the
    generation's slices, not that of the learner after its TD3 updates."""
    args = et.Args(
        pop_size=4,
        episodes_per_agent=3,
        worst_k=2,
        num_elites=1,
        inject_every=1,
        rl_updates=4,
        policy_delay=1,
        actor_lr=0.05,
        batch_size=16,
        buffer_size=1000,
        window=8,
        trading_days=6,
        settlement_days=2,
        hidden=8,
        conv_channels=4,
        inaction_penalty=1.0,
    )
    data = market_data(synthetic_universe())
    env_params = et.env_params_from_args(args)
    inv = tuple(np.asarray(data.inv).tolist())
    erl = et.make_erl(args, env_params, data, len(inv), inv)
    runner = erl.init(jax.random.PRNGKey(0))
    runner = runner._replace(pop=jax.tree.map(jnp.zeros_like, runner.pop))
    injected = runner.learner.actor
    new, metrics = jax.jit(erl.generation)(runner, data)
    idle_fitness = -args.inaction_penalty * args.trading_days
    assert bool(metrics["injected"]) and float(metrics["champion_fitness"]) > idle_fitness + 0.5, metrics
    assert bool(metrics["injected_is_elite"])
    champion = jax.tree.map(lambda x: x[0], new.pop)
    for a, b in zip(jax.tree.leaves(champion), jax.tree.leaves(injected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    L = args.trading_days + args.settlement_days
    starts = np.asarray(new.replay.t[: args.episodes_per_agent * L : L])  # individual 0's episodes come first
    fitness_of = lambda params: float(
        et.worst_k_mean(
            jnp.array(
                [
                    greedy_return(erl.actor, params, s, env_params, data)  # noqa: E731
                    for s in starts
                ]
            ),
            args.worst_k,
        )
    )
    np.testing.assert_allclose(float(metrics["champion_fitness"]), fitness_of(injected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["learner_fitness"]), fitness_of(injected), rtol=1e-5, atol=1e-5)
    # the TD3 updates after the evaluation changed the learner's play: its new weights have another fitness
    assert abs(fitness_of(new.learner.actor) - float(metrics["champion_fitness"])) > 1e-3


# ---- REPLAY ----
REPLAY_ARGS = et.Args(
    pop_size=3,
    episodes_per_agent=2,
    worst_k=1,
    rl_updates=2,
    batch_size=16,
    buffer_size=1000,
    window=8,
    trading_days=6,
    settlement_days=2,
    hidden=8,
    conv_channels=4,
    num_elites=1,
)


def replay_setup(args=REPLAY_ARGS):
    data = market_data(synthetic_universe())
    env_params = et.env_params_from_args(args)
    inv = tuple(np.asarray(data.inv).tolist())
    erl = et.make_erl(args, env_params, data, len(inv), inv)
    return erl, erl.init(jax.random.PRNGKey(0)), env_params, data


def test_replay_holds_what_the_actor_saw():
    """Individual 0's first episode, played again by hand from the day the replay stored: each stored action is
    the actor's output on the observation it saw then, and the observation rebuilt from the stored day (and the
    one n days later, the bootstrap's) is that observation; rewards are n-step sums, done says whether the
    episode ends within n steps, and the stored open positions spread per stock are the critic's state."""
    args = REPLAY_ARGS
    erl, runner, env_params, data = replay_setup()
    params = jax.tree.map(lambda x: x[0], runner.pop)
    runner_after, _ = jax.jit(erl.chunk)(runner, data)
    replay = runner_after.replay
    L, n, gamma = args.trading_days + args.settlement_days, args.n_step, args.gamma
    assert int(replay.size) == (args.pop_size + 2) * args.episodes_per_agent * L
    state = et.reset_at(replay.t[0], env_params)
    seen_obs, seen_action, rewards, smalls = [], [], [], [np.asarray(et.small_state(state, env_params, data))]
    for _ in range(L):
        obs = et.get_obs(state.t, env_params, data)
        action = jax.jit(erl.actor.apply)(params, obs)
        seen_obs.append(np.asarray(obs))
        seen_action.append(np.asarray(action))
        state, reward, *_ = jit_step(state, *et.scale_action(action, env_params), env_params, data)
        rewards.append(float(reward))
        smalls.append(np.asarray(et.small_state(state, env_params, data)))
    assert any(abs(r) > 0.02 for r in rewards), "the episode must contain exits for this check to mean something"
    np.testing.assert_array_equal(np.asarray(replay.t[:L]), int(replay.t[0]) + np.arange(L))
    n_inv = int(data.inv.shape[0])
    for k in range(L):
        rebuilt = np.asarray(et.get_obs(replay.t[k], env_params, data))
        np.testing.assert_array_equal(rebuilt, seen_obs[k])
        # float32 rounding differs between the vmapped rollout and a single call: equal to the last bits
        np.testing.assert_allclose(np.asarray(replay.action[k]), seen_action[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            np.asarray(erl.actor.apply(params, rebuilt)), np.asarray(replay.action[k]), rtol=1e-6, atol=1e-7
        )
        if k + n < L:
            np.testing.assert_array_equal(np.asarray(et.get_obs(replay.t[k] + n, env_params, data)), seen_obs[k + n])
        expect = sum(gamma**j * rewards[k + j] for j in range(n) if k + j < L)
        np.testing.assert_allclose(float(replay.reward[k]), expect, rtol=1e-5, atol=1e-6)
        assert bool(replay.done[k]) == (k + n >= L)
        np.testing.assert_allclose(
            np.asarray(et.small_state_of_slots(replay.slots[k], n_inv)), smalls[k], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(et.small_state_of_slots(replay.next_slots[k], n_inv)), smalls[min(k + n, L)], rtol=1e-5, atol=1e-6
        )
    # memory per transition: the open positions take K slots, not the universe; nothing depends on the window
    K = args.max_positions
    assert et.replay_bytes_per_transition(replay) == 4 + 4 * (K * et.SLOT_WIDTH + 1) * 2 + 4 * n_inv * 2 + 4 + 1


def test_replay_wraps_around():
    """Writing past the end of the circular memory continues at its start; the size stops at the capacity."""
    args = dataclasses.replace(REPLAY_ARGS, buffer_size=100)
    erl, runner, _, _ = replay_setup(args)
    replay = runner.replay._replace(ptr=jnp.int32(97), size=jnp.int32(97))
    n_inv, width = replay.action.shape[1], replay.slots.shape[1]
    days = jnp.arange(5, dtype=jnp.int32) + 500
    batch = (
        days,
        jnp.ones((5, width)) * days[:, None],
        jnp.ones((5, n_inv, 2)),
        days.astype(jnp.float32),
        jnp.ones(5, bool),
        jnp.zeros((5, width)),
    )
    out = erl.add_transitions(replay, batch)
    np.testing.assert_array_equal(np.asarray(out.t[np.array([97, 98, 99, 0, 1])]), np.arange(500, 505))
    np.testing.assert_array_equal(np.asarray(out.reward[np.array([97, 98, 99, 0, 1])]), np.arange(500, 505))
    np.testing.assert_array_equal(np.asarray(out.t[2:97]), 0)
    assert int(out.ptr) == 2 and int(out.size) == 100


def test_td3_update_target_delay_and_soft_update():
    """One TD3 step by hand: the critic loss is the twin regression to r + gamma^n (1 - done) min(Q1', Q2') of the
    target critics at the target actor's action n days later (no smoothing noise here); the actor and the targets
    move only every policy_delay-th step, the targets by tau towards the new weights, and with --critic-warmup 1 not
    during the first generation's rl_updates steps (the critic moves on every step)."""
    args = dataclasses.replace(REPLAY_ARGS, policy_noise=0.0, tau=0.3, policy_delay=2)
    erl, runner, env_params, data = replay_setup(args)
    runner, _ = jax.jit(erl.chunk)(runner, data)
    def perturb(tree, seed):
        return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed), x.shape), tree)
    learner = runner.learner._replace(
        actor_target=perturb(runner.learner.actor_target, 1), critic_target=perturb(runner.learner.critic_target, 2)
    )
    replay, idx = runner.replay, jnp.arange(0, 48, 3)  # steps 0..7 of the episodes: some done, some not
    batch = (
        replay.t[idx],
        replay.slots[idx],
        replay.action[idx],
        replay.reward[idx],
        replay.done[idx].astype(jnp.float32),
        replay.next_slots[idx],
    )
    n_inv = int(data.inv.shape[0])
    y, q = [], []
    for i in range(len(idx)):
        obs, next_obs = (et.get_obs(batch[0][i] + lag, env_params, data) for lag in (0, args.n_step))
        small, next_small = (et.small_state_of_slots(x[i], n_inv) for x in (batch[1], batch[5]))
        next_action = erl.actor.apply(learner.actor_target, next_obs)
        target = jnp.minimum(*erl.critic.apply(learner.critic_target, next_obs, next_small, next_action))
        y.append(float(batch[3][i] + args.gamma**args.n_step * (1 - batch[4][i]) * target))
        q.append([float(v) for v in erl.critic.apply(learner.critic, obs, small, batch[2][i])])
    y, q = np.array(y), np.array(q)
    expect_loss = ((q[:, 0] - y) ** 2).mean() + ((q[:, 1] - y) ** 2).mean()
    assert bool(batch[4].any()) and not bool(batch[4].all()), "the batch must hold both done and bootstrapped transitions"

    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    warm_args = dataclasses.replace(args, critic_warmup=1)
    warm_update = et.make_erl(warm_args, env_params, data, n_inv, tuple(np.asarray(data.inv).tolist())).td3_update
    first = warm_args.rl_updates  # with --critic-warmup 1, the first update on which the actor may move
    cases = [
        (erl.td3_update, 0, True),
        (erl.td3_update, 1, False),
        (warm_update, 0, False),
        (warm_update, first, True),
        (warm_update, first + 1, False),
    ]
    for td3_update, updates, actor_moves in cases:
        new, (critic_loss, actor_loss) = jax.jit(td3_update)(
            learner._replace(updates=jnp.int32(updates)), batch, jax.random.PRNGKey(3), data
        )
        np.testing.assert_allclose(float(critic_loss), expect_loss, rtol=1e-4)
        assert int(new.updates) == updates + 1
        assert not all(np.array_equal(a, b) for a, b in zip(leaves(new.critic), leaves(learner.critic)))
        assert np.isfinite(float(actor_loss)) == actor_moves
        same_actor = all(np.array_equal(a, b) for a, b in zip(leaves(new.actor), leaves(learner.actor)))
        assert same_actor != actor_moves
        for target, old_target, online in (
            (new.actor_target, learner.actor_target, new.actor),
            (new.critic_target, learner.critic_target, new.critic),
        ):
            for a, b, c in zip(leaves(target), leaves(old_target), leaves(online)):
                np.testing.assert_allclose(a, (1 - args.tau) * b + args.tau * c if actor_moves else b, rtol=1e-5, atol=1e-6)


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


# ---- CRITIC STRUCTURE ----
def test_critic_rules_match_the_env():
    """What the critic hard-codes is what the env does. Random play on days when every investable stock can be
    bought (the critic ignores validity): the env opens a stock exactly when `critic_opening_rule` says a slot is
    free on a trading day and the best coefficient among the stocks not held beats the threshold, and it opens
    that stock. And the same trade opened with coefficients 60, 80 and 100 returns amounts on one line: the
    reward is linear in the coefficient."""
    d = synthetic_universe()
    data = market_data(d)
    args = et.Args(window=5, trading_days=10, settlement_days=3, max_positions=2, max_holding_days=4)
    env_params = et.env_params_from_args(args)
    inv, n = np.asarray(data.inv), int(data.inv.shape[0])
    L = args.trading_days + args.settlement_days
    tradable = d["feature_valid"][:, inv].all(1) & np.r_[d["valid"][1:, inv].all(1), False]
    starts = [t for t in range(args.window - 1, len(tradable) - L - 1) if tradable[t : t + L + 1].all()]
    assert len(starts) > 100
    rng = np.random.default_rng(0)
    opened = 0
    for start in rng.choice(starts, 12, replace=False):
        state = et.reset_at(jnp.int32(start), env_params)
        for _ in range(L):
            coef = rng.uniform(0, 100, n) * rng.choice([0.5, 1.0])  # some days nothing beats the threshold
            may_open, not_held = (np.asarray(x) for x in et.critic_opening_rule(et.small_state(state, env_params, data), args))
            action = coef / args.coef_max
            best = int(np.argmax(np.where(not_held, action, -np.inf)))
            expect = int(inv[best]) if may_open and action[best] > args.coef_threshold / args.coef_max else -1
            state, _, _, info = jit_step(state, jnp.asarray(coef, jnp.float32), jnp.full(n, 5.0), env_params, data)
            assert int(info["opened"]) == expect
            opened += expect >= 0
    assert opened > 30, opened

    def trade_return(start, stock, coef_value):
        state, total = et.reset_at(jnp.int32(start), env_params), 0.0
        for k in range(L):
            coef = jnp.zeros(n).at[stock].set(coef_value if k == 0 else 0.0)
            state, reward, *_ = jit_step(state, coef, jnp.full(n, 3.0), env_params, data)
            total += float(reward)
        return total

    for start, stock in zip(rng.choice(starts, 4, replace=False), rng.integers(0, n, 4)):
        low, mid, high = (trade_return(int(start), int(stock), c) for c in (60.0, 80.0, 100.0))
        assert abs(mid - low) > 1e-3  # the trade's gain is not nil, so the check means something
        np.testing.assert_allclose(high - mid, mid - low, rtol=1e-3, atol=1e-5)


def test_critic_stock_embedding_tells_alike_stocks_apart():
    """Without --critic-stock-embedding the critic encodes every stock by the same weights from its window alone:
    two stocks with the same window and no position get the same gain, so nothing can teach it that only one of
    them carries a signal. With it, each stock has its own learned vector and the two gains differ."""
    n, window, channels = 4, 5, 3
    obs = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (window, 1, channels)), (window, n, channels))
    small = jnp.zeros(n * et.SMALL_PER_STOCK + 1)
    nothing = jnp.stack([jnp.zeros(n), jnp.full(n, 0.5)], -1)  # no coefficient, every target 5.5%
    one_stock = [nothing.at[i, 0].set(0.9) for i in range(n)]  # only stock i's coefficient, above the threshold
    for embedding, alike in ((0, True), (4, False)):
        critic = et.Critic(et.Args(critic_stock_embedding=embedding), tuple(range(n)))
        params = critic.init(jax.random.PRNGKey(1), obs, small, nothing)
        assert ("Embed_0" in str(params)) == (embedding > 0)
        q = np.array([float(critic.apply(params, obs, small, a)[0]) for a in one_stock])
        assert np.allclose(q, q[0], atol=1e-6) == alike, q
