"""ppo_trader.py --num-seeds: every seed is its own run (own model selection, policy files, backtest), seed k of an
N-seed run is the 1-seed run of --seed SEED+k, and the report, trades, logs, eval-only, --init-from and the NaN stop
all follow the seeds."""

import json

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

import ppo_trader as pt
from conftest import (
    RUN_OUTPUTS,
    ROOT,
    assert_one_line_error,
    assert_run_outputs,
    assert_trees_close,
    policy_params,
    report_of,
    run_script,
)
from test_ppo_cli import DATA_STEM, MARKET, TINY

BASE_SEED, NUM_SEEDS = 5, 3


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """A 3-seed run (--seed 5: seeds 5, 6, 7) and the 1-seed run of --seed 6 (its seed 1)."""
    out = tmp_path_factory.mktemp("seeds")
    three = run_script(
        "ppo_trader.py",
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
    one = run_script("ppo_trader.py", *TINY, "--seed", str(BASE_SEED + 1), "--out-dir", out, "--run-name", "one")
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
    kernels = [np.asarray(f["params"]["params"]["actor_hidden_0"]["kernel"]) for f in finals]
    for i in range(NUM_SEEDS):
        for j in range(i + 1, NUM_SEEDS):
            assert not np.allclose(kernels[i], kernels[j]), (i, j)


def test_seed_k_is_the_one_seed_run_of_seed_plus_k(seed_runs):
    out, _ = seed_runs
    for f in ("final", "best"):
        assert_trees_close(
            policy_params(out / "three" / "seed1" / f"{f}.msgpack"), policy_params(out / "one" / "seed0" / f"{f}.msgpack"), f
        )
    row, single = report_of(out / "three")["seeds"][1], report_of(out / "one")["seeds"][0]
    assert row["prng_seed"] == single["prng_seed"] == BASE_SEED + 1
    for name in ("policy", "sampled", "random", "buy_and_hold"):
        for metric, value in single[MARKET][name].items():
            if isinstance(value, float):
                np.testing.assert_allclose(row[MARKET][name][metric], value, rtol=1e-4, atol=1e-6, err_msg=(name, metric))
            else:
                assert row[MARKET][name][metric] == value, (name, metric)


def test_report_has_a_row_per_seed_and_the_median_min_max_over_seeds(seed_runs):
    out, three = seed_runs
    report = report_of(out / "three")
    rows = report["seeds"]
    assert [row["seed"] for row in rows] == list(range(NUM_SEEDS))
    assert [row["prng_seed"] for row in rows] == [BASE_SEED + k for k in range(NUM_SEEDS)]
    assert [row["checkpoint"] for row in rows] == [str(out / "three" / f"seed{k}" / "best.msgpack") for k in range(NUM_SEEDS)]
    for name in ("policy", "sampled", "random", "buy_and_hold"):
        stats = report["over_seeds"][MARKET][name]
        for metric in ("total_return", "sharpe", "max_drawdown", "final_equity"):
            values = [row[MARKET][name][metric] for row in rows]
            assert stats[metric] == dict(median=float(np.median(values)), min=min(values), max=max(values)), (name, metric)
        assert "breached" not in stats
    # the end-of-run table: a line per seed and policy and the medians
    for k in range(NUM_SEEDS):
        assert f"  seed {k} policy " in three.stdout and f"  seed {k} buy_and_hold " in three.stdout
    assert "  median over seeds policy " in three.stdout


SUMMARY_STATISTICS = ("mean", "median", "iqm", "std")


def assert_strict_numbers(tree, where: str) -> None:
    """Every number in the tree is finite (null allowed): what strict JSON can hold."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            assert_strict_numbers(value, f"{where}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            assert_strict_numbers(value, f"{where}[{i}]")
    elif isinstance(tree, float):
        assert np.isfinite(tree), where


def assert_summary_schema(report: dict, num_seeds: int, random_runs: int, trials: int) -> None:
    """Every summary field of every policy is present and finite or null; the verdict is a sentence per market."""
    summary = report["summary"][MARKET]
    assert set(summary) == {"policy", "sampled", "random", "buy_and_hold"}
    for name, entry in summary.items():
        runs = random_runs if name == "random" else num_seeds
        assert entry["folds"] == 1 and entry["runs"] == runs, name
        for metric in ("total_return", "annualised_return", "sharpe"):
            assert set(entry[metric]) == set(SUMMARY_STATISTICS), (name, metric)
            for statistic in SUMMARY_STATISTICS:
                value, ci = entry[metric][statistic]["value"], entry[metric][statistic]["ci"]
                undefined = statistic == "std" and runs == 1  # the spread of a single run
                assert value is None if undefined else isinstance(value, float), (name, metric, statistic)
                assert ci is None or (len(ci) == 2 and ci[0] <= ci[1]), (name, metric, statistic, ci)
        for key in ("probabilistic_sharpe", "deflated_sharpe"):
            assert entry[key] is None or 0 <= entry[key] <= 1, (name, key)
        assert entry["num_trials"] == (num_seeds * trials if name in ("policy", "sampled") else 1), name
        assert len(entry["per_run"]) == runs
        assert set(entry["probability_of_improvement"]) == {"random", "buy_and_hold"} - {name}
        for improvement in entry["probability_of_improvement"].values():
            assert 0 <= improvement["value"] <= 1 and (improvement["ci"] is None or len(improvement["ci"]) == 2)
        if name != "random":
            assert len(entry["percentile_among_random"]["per_run"]) == num_seeds
        assert_strict_numbers(entry, name)
    assert report["random_runs"] == random_runs and report["trials"] == trials
    assert report["verdict"][MARKET].startswith("no evidence of an edge over random") or report["verdict"][MARKET].startswith(
        "edge over random"
    )


def test_report_summary_has_every_field_over_the_seeds_and_the_random_runs(seed_runs):
    out, three = seed_runs
    report = json.loads((out / "three" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report"))
    assert_summary_schema(report, NUM_SEEDS, random_runs=100, trials=1)
    summary, rows = report["summary"][MARKET], report["seeds"]
    for name in ("policy", "buy_and_hold"):  # the statistics are of the seeds' own report rows
        totals = [row[MARKET][name]["total_return"] for row in rows]
        assert summary[name]["total_return"]["mean"]["value"] == pytest.approx(np.mean(totals))
        assert summary[name]["total_return"]["median"]["value"] == pytest.approx(np.median(totals))
    # buy-and-hold is the same run for every seed: no spread, a zero-width interval
    bh = summary["buy_and_hold"]["total_return"]["mean"]
    assert bh["ci"] == pytest.approx([bh["value"], bh["value"]])
    # one fold: P(improvement) over random is the mean over the seeds of their percentiles among the random runs / 100
    percentiles = summary["policy"]["percentile_among_random"]["per_run"]
    assert summary["policy"]["probability_of_improvement"]["random"]["value"] == pytest.approx(np.mean(percentiles) / 100)
    # 3 seeds are fewer than an edge needs: whatever the numbers, no edge is claimed; the print ends with the verdict
    assert (
        report["verdict"][MARKET].startswith("no evidence of an edge over random")
        and "fewer than the 5" in report["verdict"][MARKET]
    )
    assert three.stdout.strip().splitlines()[-1] == f"verdict, test split, {MARKET}: {report['verdict'][MARKET]}"


def test_eval_only_summarises_with_its_own_random_runs_and_trials(seed_runs, tmp_path):
    out, _ = seed_runs
    r = run_script(
        "ppo_trader.py",
        "--eval-only",
        "--checkpoint",
        out / "three",
        "--random-runs",
        "7",
        "--trials",
        "4",
        "--out-dir",
        tmp_path,
        "--run-name",
        "seven",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = report_of(tmp_path / "seven")
    assert_summary_schema(report, NUM_SEEDS, random_runs=7, trials=4)
    assert report["summary"][MARKET]["policy"]["num_trials"] == NUM_SEEDS * 4
    assert r.stdout.strip().splitlines()[-1].startswith(f"verdict, test split, {MARKET}: ")


def test_trades_csv_has_each_seeds_trades(seed_runs):
    out, _ = seed_runs
    lines = (out / "three" / "trades.csv").read_text().splitlines()
    assert lines[0].startswith("seed,market,")
    seeds = [int(line.split(",")[0]) for line in lines[1:]]
    for row in report_of(out / "three")["seeds"]:
        assert seeds.count(row["seed"]) == row[MARKET]["policy"]["trades"], row["seed"]


def test_metrics_and_tensorboard_hold_every_seed(seed_runs):
    from tensorboard_reader import scalar_tags

    out, three = seed_runs
    rows = [json.loads(x) for x in (out / "three" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["seeds"]) == NUM_SEEDS
        for key in ("episodic_return", "policy_loss", "entropy") + (("val_return",) if "val_return" in row else ()):
            np.testing.assert_allclose(row[key], np.mean([seed_row[key] for seed_row in row["seeds"]]), rtol=1e-6, err_msg=key)
    assert len({row["seeds"][k]["episodic_return"] for k in range(NUM_SEEDS) for row in rows[:1]}) == NUM_SEEDS
    best_val = json.loads(msgpack_restore((out / "three" / "checkpoint.msgpack").read_bytes())["extra"])["best_val"]
    assert best_val == [max(row["seeds"][k]["val_return"] for row in rows if "val_return" in row) for k in range(NUM_SEEDS)]
    tags = scalar_tags(out / "three")
    for tag in ("charts/episodic_return", "losses/policy_loss", "eval/val_return", "perf/SPS"):
        assert tag in tags, tag
    for k in range(NUM_SEEDS):
        for tag in pt.SEED_TAGS:
            assert f"seeds/{tag}/seed{k}" in tags, (tag, k)
    progress = [line for line in three.stdout.splitlines() if line.startswith("update")]
    assert progress and all(" [" in line and ".." in line for line in progress)


def test_eval_only_of_the_run_folder_and_of_one_seed_reproduces_the_report(seed_runs):
    out, _ = seed_runs
    report = report_of(out / "three")
    r = run_script("ppo_trader.py", "--eval-only", "--checkpoint", out / "three")
    assert r.returncode == 0, r.stderr[-2000:]
    again = report_of(out / "three" / f"eval_test_{DATA_STEM}")
    assert [row[MARKET] for row in again["seeds"]] == [row[MARKET] for row in report["seeds"]]
    assert again["over_seeds"] == report["over_seeds"]
    assert again["summary"] == report["summary"] and again["verdict"] == report["verdict"]  # the statistics too
    r = run_script("ppo_trader.py", "--eval-only", "--checkpoint", out / "three" / "seed2" / "best.msgpack")
    assert r.returncode == 0, r.stderr[-2000:]
    one = report_of(out / "three" / "seed2" / f"eval_test_{DATA_STEM}")
    assert len(one["seeds"]) == 1 and one["seeds"][0]["seed"] == 2 and one["seeds"][0][MARKET] == report["seeds"][2][MARKET]
    assert_summary_schema(one, 1, random_runs=100, trials=1)  # one seed: no CI over seeds, null where undefined
    assert one["summary"][MARKET]["policy"]["total_return"]["mean"]["ci"] is None


def test_init_from_a_run_folder_starts_seed_k_from_its_seed_k(seed_runs, tmp_path):
    out, _ = seed_runs
    config = json.loads((out / "three" / "config.json").read_text())
    args = pt.Args(**dict(config, data=str(ROOT / config["data"]), phase=2, init_from=str(out / "three")))
    transfers = pt.init_transfers(args, num_features=pt.load_data(args)[0]["train"].features.shape[-1])
    assert len(transfers) == NUM_SEEDS
    for k, (params, norm) in enumerate(transfers):
        saved = msgpack_restore((out / "three" / f"seed{k}" / "best.msgpack").read_bytes())
        for leaf, saved_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(saved["params"]), strict=True):
            np.testing.assert_array_equal(leaf, saved_leaf, err_msg=f"seed {k}")
        np.testing.assert_array_equal(norm.mean, saved["obs_norm"]["mean"], err_msg=f"seed {k}")
    phase2 = ["--phase", "2", "--out-dir", tmp_path, "--run-name", "p2"]
    assert_one_line_error(
        run_script("ppo_trader.py", *TINY, "--num-seeds", "2", "--init-from", out / "three", *phase2),
        f"--num-seeds {NUM_SEEDS}",
    )
    assert_one_line_error(run_script("ppo_trader.py", *TINY, "--init-from", tmp_path, *phase2), "config.json")
    assert not (tmp_path / "p2").exists()
    r = run_script("ppo_trader.py", *TINY, "--num-seeds", str(NUM_SEEDS), "--init-from", out / "three", *phase2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(report_of(tmp_path / "p2")["seeds"]) == NUM_SEEDS


def test_a_nan_in_one_seed_stops_the_run_naming_that_seed(tmp_path):
    """Seed 1's critic made NaN in a stopped 2-seed run's checkpoint: the resumed run stops at its next chunk with
    one line naming seed 1 only, and keeps that checkpoint."""
    flags = [*TINY, "--num-seeds", "2", "--out-dir", tmp_path, "--run-name", "nan"]
    part = run_script("ppo_trader.py", *flags, "--stop-after", "1")
    assert part.returncode == 0, part.stderr[-2000:]
    ckpt = tmp_path / "nan" / "checkpoint.msgpack"
    payload = msgpack_restore(ckpt.read_bytes())
    kernel = np.array(payload["runner"]["train_state"]["params"]["params"]["critic_hidden_0"]["kernel"])
    kernel[1] = np.nan
    payload["runner"]["train_state"]["params"]["params"]["critic_hidden_0"]["kernel"] = kernel
    ckpt.write_bytes(msgpack_serialize(payload))
    broken = ckpt.read_bytes()
    r = run_script("ppo_trader.py", "--resume", tmp_path / "nan")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: NaN/inf") and "chunk 2" in last, r.stderr[-2000:]
    assert "seed 1 (--seed 2)" in last and "seed 0" not in last, last
    assert ckpt.read_bytes() == broken
    assert not (tmp_path / "nan" / "report.json").exists()
