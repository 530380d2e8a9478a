"""erl_trader.py --num-seeds: every seed is its own ERL run (own population, learner, replay, model selection, policy
files, backtest), seed k of an N-seed run is the 1-seed run of --seed SEED+k, and the report, trades, logs, eval-only
and the NaN stop all follow the seeds."""

import json

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

import erl_trader as et
from conftest import RUN_OUTPUTS, assert_run_outputs, assert_trees_close, policy_params, report_of, run_script
from test_erl_cli import TINY

BASE_SEED, NUM_SEEDS = 5, 3
POLICIES = ("champion", "td3_learner", "td3_learner_at_start", "random", "buy_and_hold")


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """A 3-seed run (--seed 5: seeds 5, 6, 7) and the 1-seed run of --seed 6 (its seed 1)."""
    out = tmp_path_factory.mktemp("erl_seeds")
    three = run_script(
        "erl_trader.py",
        *TINY,
        "--num-seeds",
        str(NUM_SEEDS),
        "--seed",
        str(BASE_SEED),
        "--out-dir",
        out,
        "--run-name",
        "three",
    )
    assert three.returncode == 0, three.stderr[-3000:]
    one = run_script("erl_trader.py", *TINY, "--seed", str(BASE_SEED + 1), "--out-dir", out, "--run-name", "one")
    assert one.returncode == 0, one.stderr[-3000:]
    return out, three


def test_every_seed_has_its_own_policy_files_and_they_differ(seed_runs):
    out, _ = seed_runs
    assert_run_outputs(
        out / "three", RUN_OUTPUTS + tuple(f"seed{k}/{f}.msgpack" for k in range(NUM_SEEDS) for f in ("best", "final"))
    )
    assert not (out / "three" / f"seed{NUM_SEEDS}").exists()
    finals = [msgpack_restore((out / "three" / f"seed{k}" / "final.msgpack").read_bytes()) for k in range(NUM_SEEDS)]
    assert [f["seed_index"] for f in finals] == list(range(NUM_SEEDS))
    kernels = [np.asarray(f["params"]["params"][et.STOCK_HEAD]["kernel"]) for f in finals]
    for i in range(NUM_SEEDS):
        for j in range(i + 1, NUM_SEEDS):
            assert not np.allclose(kernels[i], kernels[j]), (i, j)


def test_seed_k_is_the_one_seed_run_of_seed_plus_k(seed_runs):
    """The whole runner state of seed 1 (population, learner with its optimisers, replay memory, RNG) and its policy
    files and report row equal the 1-seed run's, to float32 summation-order tolerance."""
    out, _ = seed_runs
    three, one = (msgpack_restore((out / name / "checkpoint.msgpack").read_bytes())["runner"] for name in ("three", "one"))
    paths_three, leaves_one = jax.tree_util.tree_flatten_with_path(three)[0], jax.tree.leaves(one)
    assert len(paths_three) == len(leaves_one)
    for (path, stacked), single in zip(paths_three, leaves_one):
        stacked, single = np.asarray(stacked), np.asarray(single)
        if stacked.ndim == 0:  # a counter every seed shares (generation, updates, replay position)
            np.testing.assert_array_equal(stacked, single, err_msg=jax.tree_util.keystr(path))
        else:  # [3 seeds, ...] against [1 seed, ...]
            np.testing.assert_allclose(stacked[1], single[0], rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
    for f in ("final", "best"):
        assert_trees_close(
            policy_params(out / "three" / "seed1" / f"{f}.msgpack"),
            policy_params(out / "one" / "seed0" / f"{f}.msgpack"),
            f,
            atol=1e-4,
        )
    row, single = report_of(out / "three")["seeds"][1], report_of(out / "one")["seeds"][0]
    assert row["prng_seed"] == single["prng_seed"] == BASE_SEED + 1 and row["best_from"] == single["best_from"]
    for name in POLICIES:
        for metric, value in single[name].items():
            if isinstance(value, float):
                np.testing.assert_allclose(row[name][metric], value, rtol=1e-4, atol=1e-5, err_msg=(name, metric))
            else:
                assert row[name][metric] == value, (name, metric)


def test_report_has_a_row_per_seed_and_the_median_min_max_over_seeds(seed_runs):
    out, three = seed_runs
    report = report_of(out / "three")
    rows = report["seeds"]
    assert [row["seed"] for row in rows] == list(range(NUM_SEEDS))
    assert [row["prng_seed"] for row in rows] == [BASE_SEED + k for k in range(NUM_SEEDS)]
    assert [row["checkpoint"] for row in rows] == [str(out / "three" / f"seed{k}" / "best.msgpack") for k in range(NUM_SEEDS)]
    assert all(row["best_from"].startswith(("champion of generation", "learner of generation")) for row in rows)
    for name in POLICIES:
        stats = report["over_seeds"][name]
        for metric in ("total_return", "sharpe", "max_drawdown", "trades"):
            values = [row[name][metric] for row in rows]
            assert stats[metric] == dict(median=float(np.median(values)), min=min(values), max=max(values)), (name, metric)
    assert len({row["random"]["total_return"] for row in rows}) == NUM_SEEDS  # each seed's own random key
    for k in range(NUM_SEEDS):  # the end-of-run table: a line per seed and policy and the medians
        assert f"  seed {k} champion " in three.stdout and f"  seed {k} buy_and_hold " in three.stdout
    assert "  median over seeds champion " in three.stdout


def test_report_summary_and_verdict_over_the_seeds_and_the_random_runs(seed_runs):
    """The STATISTICS of the report (tests/test_statistics.py checks the numbers): every field of every policy present
    and finite or null in strict JSON, the means and medians those of the seeds' rows, the verdict the print's last line."""
    out, three = seed_runs
    report = json.loads((out / "three" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report"))
    summary, rows = report["summary"], report["seeds"]
    assert set(summary) == {"champion", "td3_learner", "random", "buy_and_hold"} and report["random_runs"] == 100
    for name, entry in summary.items():
        runs = 100 if name == "random" else NUM_SEEDS
        assert entry["folds"] == 1 and entry["runs"] == runs and len(entry["per_run"]) == runs, name
        for metric in ("total_return", "annualised_return", "sharpe"):
            for statistic in ("mean", "median", "iqm", "std"):
                value, ci = entry[metric][statistic]["value"], entry[metric][statistic]["ci"]
                assert isinstance(value, float) and (ci is None or ci[0] <= ci[1] + 1e-12), (name, metric, statistic)
        assert entry["num_trials"] == (NUM_SEEDS if name in et.TRAINED_POLICIES else 1), name
        assert set(entry["probability_of_improvement"]) == {"random", "buy_and_hold"} - {name}
        for key in ("probabilistic_sharpe", "deflated_sharpe"):
            assert entry[key] is None or 0 <= entry[key] <= 1, (name, key)
        if name != "random":
            totals = [row[name]["total_return"] for row in rows]
            assert entry["total_return"]["mean"]["value"] == pytest.approx(np.mean(totals)), name
            assert entry["total_return"]["median"]["value"] == pytest.approx(np.median(totals)), name
            percentiles = entry["percentile_among_random"]["per_run"]
            assert entry["probability_of_improvement"]["random"]["value"] == pytest.approx(np.mean(percentiles) / 100)
    assert "fewer than the 5" in report["verdict"] and report["verdict"].startswith("no evidence of an edge over random")
    assert three.stdout.strip().splitlines()[-1] == f"verdict, test split: {report['verdict']}"


def test_trades_csv_has_each_seeds_trades(seed_runs):
    out, _ = seed_runs
    lines = (out / "three" / "trades.csv").read_text().splitlines()
    assert lines[0] == "fold,seed,ticker,entry_date,exit_date,entry_price,exit_price,return_pct"
    seeds = [int(line.split(",")[1]) for line in lines[1:]]
    for row in report_of(out / "three")["seeds"]:
        assert seeds.count(row["seed"]) == row["champion"]["trades"], row["seed"]


def test_metrics_and_tensorboard_hold_every_seed(seed_runs):
    from tensorboard_reader import scalar_tags

    out, three = seed_runs
    rows = [json.loads(x) for x in (out / "three" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["seeds"]) == NUM_SEEDS
        keys = ("fitness_mean", "fitness_max", "learner_fitness", "critic_loss")
        for key in keys + (("champion_val_return", "learner_val_return") if "champion_val_return" in row else ()):
            np.testing.assert_allclose(row[key], np.mean([seed_row[key] for seed_row in row["seeds"]]), rtol=1e-6, err_msg=key)
    assert len({seed_row["fitness_mean"] for seed_row in rows[0]["seeds"]}) == NUM_SEEDS
    best_val = json.loads(msgpack_restore((out / "three" / "checkpoint.msgpack").read_bytes())["extra"])["best_val"]
    assert best_val == [
        max(
            max(row["seeds"][k]["champion_val_return"], row["seeds"][k]["learner_val_return"])
            for row in rows
            if "champion_val_return" in row
        )
        for k in range(NUM_SEEDS)
    ]
    tags = scalar_tags(out / "three")
    for tag in ("charts/fitness_mean", "losses/critic_loss", "eval/champion_val_return", "perf/SPS"):
        assert tag in tags, tag
    for k in range(NUM_SEEDS):
        for tag in et.SEED_TAGS:
            assert f"seeds/{tag}/seed{k}" in tags, (tag, k)
    progress = [line for line in three.stdout.splitlines() if line.startswith("gen ")]
    assert len(progress) == 4 and all(" [" in line and ".." in line for line in progress)


def test_eval_only_of_the_run_folder_and_of_one_seed_reproduces_the_report(seed_runs):
    out, _ = seed_runs
    report = report_of(out / "three")
    r = run_script("erl_trader.py", "--eval-only", "--checkpoint", out / "three")
    assert r.returncode == 0, r.stderr[-2000:]
    again = report_of(out / "three" / "eval_test_sp500_daily")
    for name in ("champion", "random", "buy_and_hold"):
        assert [row[name] for row in again["seeds"]] == [row[name] for row in report["seeds"]], name
        assert again["over_seeds"][name] == report["over_seeds"][name], name
        assert again["summary"][name] == report["summary"][name], name  # the statistics too
    r = run_script("erl_trader.py", "--eval-only", "--checkpoint", out / "three" / "seed2" / "best.msgpack")
    assert r.returncode == 0, r.stderr[-2000:]
    one = report_of(out / "three" / "seed2" / "eval_test_sp500_daily")
    assert (
        len(one["seeds"]) == 1
        and one["seeds"][0]["seed"] == 2
        and one["seeds"][0]["champion"] == report["seeds"][2]["champion"]
    )


def test_a_nan_in_one_seed_stops_the_run_naming_that_seed(tmp_path):
    """Seed 1's critic made NaN in a stopped 2-seed run's checkpoint: the resumed run stops at its next chunk with
    one line naming seed 1 only, and keeps that checkpoint."""
    flags = [*TINY, "--num-seeds", "2", "--out-dir", tmp_path, "--run-name", "nan"]
    part = run_script("erl_trader.py", *flags, "--stop-after", "1")
    assert part.returncode == 0, part.stderr[-2000:]
    ckpt = tmp_path / "nan" / "checkpoint.msgpack"
    payload = msgpack_restore(ckpt.read_bytes())
    learner = payload["runner"]["learner"]
    learner["critic"] = jax.tree.map(
        lambda x: np.where(np.arange(len(x)).reshape((-1,) + (1,) * (x.ndim - 1)) == 1, np.nan, x), learner["critic"]
    )  # every critic weight of seed 1
    ckpt.write_bytes(msgpack_serialize(payload))
    broken = ckpt.read_bytes()
    r = run_script("erl_trader.py", "--resume", tmp_path / "nan")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: NaN/inf") and "chunk 2" in last, r.stderr[-2000:]
    assert "seed 1 (--seed 2)" in last and "seed 0" not in last, last
    assert ckpt.read_bytes() == broken
    assert not (tmp_path / "nan" / "report.json").exists()
