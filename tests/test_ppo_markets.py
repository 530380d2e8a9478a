"""ppo_trader.py on several markets and with a curriculum: market draw by weight, per-market metrics, curriculum values."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

import data_prep as dp
import ppo_trader as pt
from conftest import RUN_OUTPUTS, assert_run_outputs, run_script

TINY = [
    "--total-timesteps",
    "4096",
    "--num-envs",
    "8",
    "--num-steps",
    "64",
    "--chunk-updates",
    "2",
    "--eval-every",
    "2",
    "--window",
    "8",
    "--episode-bars",
    "64",
    "--hidden",
    "32",
]
CURRICULUM = [
    "--curriculum",
    "--curriculum-dd-start",
    "5000",
    "--curriculum-commission-start",
    "0.25",
    "--curriculum-end",
    "0.5",
]


@pytest.fixture(scope="module")
def two_markets(tmp_path_factory):
    """Synthetic ES-like SYN and NQ-like SYN2 minute bars in one file."""
    path = tmp_path_factory.mktemp("data") / "two.npz"
    assert dp.main(["synthetic-intraday", "--out", str(path), "--days", "25", "--seed", "0", "--markets", "2"]) == 0
    return path


@pytest.fixture(scope="module")
def two_market_run(two_markets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    flags = [*TINY, "--data", two_markets, "--market-weights", "1", "3", *CURRICULUM]
    r = run_script("ppo_trader.py", *flags, "--out-dir", out, "--run-name", "full")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, flags


# ---- DATA: the two-market file ----
def test_two_market_file(two_markets):
    a, meta = dp.load_npz(two_markets)
    assert list(a["market"]) == ["SYN", "SYN2"] and a["close"].shape[0] == 2
    assert meta["markets"]["SYN"]["point_value"] == 50.0 and meta["markets"]["SYN2"]["point_value"] == 20.0
    assert 4000 < a["close"][0, 0] < 6000 and 15000 < a["close"][1, 0] < 21000
    assert not np.allclose(a["features"][0, :, -1], a["features"][1, :, -1])  # each market has its own signal
    np.testing.assert_array_equal(a["timestamps"][0], a["timestamps"][1])


# ---- MARKET DRAW ----
def draw_fraction(weights, two_markets, n=20_000):
    args = pt.Args(data=str(two_markets), window=8, episode_bars=64, market_weights=weights)
    datasets, info = pt.load_data(args)
    data = datasets["train"]
    _, states = jax.jit(jax.vmap(pt.reset, in_axes=(0, None, None)))(
        jax.random.split(jax.random.PRNGKey(0), n), pt.env_params_from_args(args), data
    )
    market, t = np.asarray(states.market), np.asarray(states.t)
    for m in range(2):  # every start lies inside its own market's training split
        lo, hi = info["bounds"][m]["train"]
        assert ((t[market == m] >= lo + 7) & (t[market == m] < hi)).all()
    return np.asarray(data.market_weights), np.bincount(market, minlength=2) / n, info


@pytest.mark.parametrize("weights", [(1.0, 3.0), (0.5, 0.5), (1.0, 0.0)])
def test_each_market_is_drawn_as_often_as_its_weight(two_markets, weights):
    p, freq, _ = draw_fraction(weights, two_markets)
    expect = np.array(weights) / sum(weights)
    np.testing.assert_allclose(p, expect, rtol=1e-6)
    sigma = np.sqrt(expect * (1 - expect) / 20_000)
    assert (np.abs(freq - expect) <= 5 * sigma + 1e-12).all(), (freq, expect)


def test_default_weights_follow_training_bars(two_markets):
    p, freq, info = draw_fraction(None, two_markets)
    bars = np.array([b["train"][1] - b["train"][0] for b in info["bounds"]], float)
    np.testing.assert_allclose(p, bars / bars.sum(), rtol=1e-6)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / 20_000)).all(), (freq, p)


def assert_main_one_line_error(argv, needle, capsys):
    """pt.main in this process (no subprocess start-up): exit status 2, one stderr line naming `needle` with a fix."""
    assert pt.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Fix:" in lines[0], lines


@pytest.mark.parametrize(
    "weights,needle",
    [
        (["1"], "--market-weights has 1 numbers"),
        (["1", "-1"], "--market-weights"),
        (["0", "0"], "--market-weights"),
        (["1", "nan"], "--market-weights"),
    ],
)
def test_bad_market_weights_give_one_line(two_markets, weights, needle, capsys):
    assert_main_one_line_error(["--data", two_markets, "--market-weights", *weights], needle, capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--curriculum-end", "0"],
        ["--curriculum-end", "1.5"],
        ["--curriculum-dd-start", "-5"],
        ["--curriculum-commission-start", "-1"],
    ],
)
def test_bad_curriculum_flags_give_one_line(argv, capsys):
    assert_main_one_line_error(["--curriculum", *argv], "--curriculum", capsys)


# ---- CURRICULUM VALUES ----
def test_curriculum_values_at_progress_0_half_and_1(two_markets):
    args = pt.Args(
        data=str(two_markets),
        window=8,
        episode_bars=64,
        dd_limit=2000.0,
        curriculum=True,
        curriculum_dd_start=5000.0,
        curriculum_commission_start=0.2,
        curriculum_end=1.0,
    )
    datasets, _ = pt.load_data(args)
    data, params = datasets["train"], pt.env_params_from_args(args)
    real = np.asarray(data.commission)
    in_force = jax.jit(lambda progress: pt.curriculum_in_force(args, params, data, progress))
    for progress, dd, scale in ((0.0, 5000.0, 0.2), (0.5, 3500.0, 0.6), (1.0, 2000.0, 1.0)):
        p, d, values = in_force(jnp.float32(progress))
        np.testing.assert_allclose([float(p.dd_limit), float(values["dd_limit"])], dd, rtol=1e-6)
        np.testing.assert_allclose(float(values["commission_scale"]), scale, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(d.commission), real * scale, rtol=1e-6)
        assert p.window == params.window and float(p.sl_atr_mult) == params.sl_atr_mult  # the other rules untouched
    # with --curriculum-end 0.5 the real values are reached half-way and kept; the default dd start is 2 x dd_limit
    half = dataclasses.replace(args, curriculum_end=0.5, curriculum_dd_start=None)
    for progress, dd in ((0.0, 4000.0), (0.25, 3000.0), (0.5, 2000.0), (0.9, 2000.0)):
        p, _, _ = pt.curriculum_in_force(half, params, data, jnp.float32(progress))
        np.testing.assert_allclose(float(p.dd_limit), dd, rtol=1e-6)


def first_update_metrics(args: pt.Args, data: pt.MarketData) -> dict:
    init, train_chunk, _, _ = pt.make_train(args, pt.env_params_from_args(args), data)
    _, metrics = jax.jit(train_chunk)(jax.jit(init)(jax.random.PRNGKey(0)))
    return {k: np.asarray(v)[0] for k, v in metrics.items()}


def test_training_loop_plays_the_rules_in_force(two_markets):
    """The first update of a curriculum run plays the start values: it matches a run with those values as the real
    rules (dd limit 150 instead of 2,000, no commission: rewards and breaches a run with the real rules cannot match)."""
    base = pt.Args(
        data=str(two_markets),
        window=8,
        episode_bars=64,
        hidden=16,
        num_envs=16,
        num_steps=32,
        num_minibatches=1,
        update_epochs=1,
        chunk_updates=1,
        total_timesteps=16 * 32 * 4,
        market_weights=(1.0, 0.0),
        dd_limit=2000.0,
    )
    datasets, _ = pt.load_data(base)
    data = datasets["train"]
    commission = float(data.commission[0])
    cur = first_update_metrics(
        dataclasses.replace(base, curriculum=True, curriculum_dd_start=150.0, curriculum_commission_start=0.0), data
    )
    eased = first_update_metrics(dataclasses.replace(base, dd_limit=150.0), data.replace(commission=data.commission * 0.0))
    assert commission > 0
    np.testing.assert_allclose(cur["curriculum_dd_limit"], 150.0)
    np.testing.assert_allclose(cur["curriculum_commission_scale"], 0.0)
    for k in ("episodic_return", "episodes", "breaches", "value_loss", "policy_loss", "entropy"):
        np.testing.assert_allclose(cur[k], eased[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert cur["breaches"].sum() > 0  # episodes of 64 bars end within 32 steps only by a breach of the small limit
    # market weights 1, 0: every finished episode is SYN's
    for m in (cur, eased):
        np.testing.assert_array_equal(m["market_episodes"][..., 1], 0)
        np.testing.assert_allclose(m["market_episodes"][..., 0], m["episodes"])


# ---- END TO END: two markets, weights, curriculum ----
def test_per_market_metrics_add_up_to_the_totals(two_market_run):
    out, _ = two_market_run
    rows = assert_run_outputs(out / "full", RUN_OUTPUTS)
    assert len(rows) == 4
    seen = {"SYN": 0.0, "SYN2": 0.0}
    for row in rows:
        by = row["markets"]
        assert set(by) == {"SYN", "SYN2"}
        np.testing.assert_allclose(sum(v["episodes"] for v in by.values()), row["episodes"], rtol=1e-6)
        np.testing.assert_allclose(sum(v["breaches"] for v in by.values()), row["breaches"], rtol=1e-6, atol=1e-9)
        for key in ("episodic_return", "episodic_length"):  # episode-weighted means: the market sums give the total sum
            total = sum(v[key] * v["episodes"] for v in by.values() if v["episodes"] > 0)
            np.testing.assert_allclose(total, row[key] * row["episodes"], rtol=1e-4, atol=1e-5, err_msg=key)
        for k, v in by.items():
            seen[k] += v["episodes"]
            assert (v["episodic_return"] is None) == (v["episodes"] == 0)
    assert seen["SYN"] > 0 and seen["SYN2"] > seen["SYN"]  # weights 1:3
    report = json.loads((out / "full" / "report.json").read_text())
    for market in ("SYN", "SYN2"):
        assert {"policy", "random", "buy_and_hold"} <= set(report["seeds"][0][market])
        assert set(report["over_seeds"][market]) == {"policy", "sampled", "random", "buy_and_hold"}
        assert set(report["summary"][market]) == {"policy", "sampled", "random", "buy_and_hold"}
        # one tiny seed: fewer runs than an edge needs, so no edge is claimed in either market's sentence
        assert (
            report["verdict"][market].startswith("no evidence of an edge over random")
            and "fewer than the 5" in report["verdict"][market]
        )
    # P(improvement) over the markets: a task per market (one fold), so the mean of the markets' own
    for name in ("policy", "sampled"):
        for other in ("random", "buy_and_hold"):
            per_market = [report["summary"][m][name]["probability_of_improvement"][other]["value"] for m in ("SYN", "SYN2")]
            over = report["improvement_over_markets"][name][other]
            assert over["value"] == pytest.approx(np.mean(per_market)), (name, other)
            assert over["ci"] is None or 0 <= over["ci"][0] <= over["ci"][1] <= 1


def test_tags_and_curriculum_values_in_the_log(two_market_run):
    from tensorboard_reader import scalar_tags

    out, _ = two_market_run
    tags = scalar_tags(out / "full")
    for tag in (
        "charts/SYN/episodic_return",
        "charts/SYN2/episodic_return",
        "charts/SYN2/episodic_length",
        "charts/SYN/episodes",
        "charts/SYN2/breaches",
        "curriculum/dd_limit",
        "curriculum/commission_scale",
        "charts/episodic_return",
    ):
        assert tag in tags, tag
    rows = [json.loads(x) for x in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    num_updates = rows[-1]["update"]
    for row in rows:  # the values of the chunk's last update (0-based update - 1), curriculum end 0.5
        frac = min((row["update"] - 1) / num_updates / 0.5, 1.0)
        np.testing.assert_allclose(row["curriculum_dd_limit"], 5000.0 + (2000.0 - 5000.0) * frac, rtol=1e-6)
        np.testing.assert_allclose(row["curriculum_commission_scale"], 0.25 + 0.75 * frac, rtol=1e-6)
    assert rows[0]["curriculum_dd_limit"] > 4000 and rows[-1]["curriculum_dd_limit"] == 2000.0


def test_backtests_use_the_real_rules(two_market_run):
    """Validation and the test report are played with the real dd limit and commission, not the curriculum's."""
    out, _ = two_market_run
    run_dir = out / "full"
    cfg = json.loads((run_dir / "config.json").read_text())
    args = pt.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    datasets, info = pt.load_data(args)
    real = pt.env_params_from_args(args)
    eased, eased_data, _ = pt.curriculum_in_force(args, real, datasets["test"], jnp.float32(0.0))
    # the random policy's test rows: reproduced with the real rules, not with the start values
    report = json.loads((run_dir / "report.json").read_text())["seeds"][0]
    for params, data, same, markets in (
        (real, datasets["test"], True, info["markets"]),
        (eased, eased_data, False, info["markets"][:1]),
    ):
        bt = pt.make_backtest(params, data)
        for m, market in enumerate(markets):
            o = pt.play_one(bt, pt.random_policy, None, m, jax.random.PRNGKey(args.seed))
            total = float(o["equity"][-1]) / real.initial_balance
            assert np.isclose(total, report[market]["random"]["total_return"], rtol=1e-5, atol=1e-9) == same, (market, same)
    # the last validation return: final.msgpack's, with the real rules
    obs_dim = args.window * datasets["train"].features.shape[-1] + pt.NUM_POSITION_FEATURES
    network, params, norm, _ = pt.load_policy(str(run_dir / "seed0" / "final.msgpack"), args, obs_dim)
    val = pt.validation_return(args, network, params, norm, real, pt.make_backtest(real, datasets["val"]))
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    np.testing.assert_allclose(val, last["val_return"], rtol=1e-6)


def test_resume_with_markets_and_curriculum_is_bit_identical(two_market_run):
    out, flags = two_market_run
    part = run_script("ppo_trader.py", *flags, "--out-dir", out, "--run-name", "part", "--stop-after", "1")
    assert part.returncode == 0 and "stopped after chunk 1" in part.stdout, part.stdout[-2000:] + part.stderr[-2000:]
    resumed = run_script("ppo_trader.py", "--resume", out / "part")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for f, keys in (
        ("seed0/final.msgpack", ("params", "obs_norm")),
        ("seed0/best.msgpack", ("params", "obs_norm")),
        ("checkpoint.msgpack", ("runner",)),
    ):
        a, b = (msgpack_restore((out / run / f).read_bytes()) for run in ("full", "part"))
        for k in keys:
            assert msgpack_serialize(a[k]) == msgpack_serialize(b[k]), (f, k)
    strip = lambda run: [
        {k: v for k, v in json.loads(x).items() if k not in ("sps", "elapsed")}  # noqa: E731
        for x in (out / run / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip("full") == strip("part")
