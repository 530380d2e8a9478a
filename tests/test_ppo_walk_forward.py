"""ppo_trader.py --walk-forward: the folds' test blocks tile the history after the first validation split at one time
for every market, each fold normalises its features and selects on data before its own test block only (changing that
block changes nothing in its policy files), every fold plays one compiled chunk, init and backtest, and the report and
eval-only follow the folds."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

import data_prep as dp
import ppo_trader as pt
from conftest import ROOT, assert_one_line_error, assert_trees_close, policy_params, report_of, run_script
from test_ppo_cli import TINY

FOLDS, SEEDS, RANDOM_RUNS = 2, 2, 20
MARKETS = ("SYN", "SYN2")
FLAGS = [
    *TINY,
    "--data",
    "market.npz",
    "--walk-forward",
    str(FOLDS),
    "--num-seeds",
    str(SEEDS),
    "--random-runs",
    str(RANDOM_RUNS),
    "--out-dir",
    "runs",
]  # relative paths: runs from two folders have the same config
WALK_FORWARD = [*FLAGS, "--run-name", "wf"]
SCRIPT = ROOT / "ppo_trader.py"


def market_times(minutes: int, gaps: list) -> list:
    """Per market, the bar times (ns) of `minutes` minutes, without every gaps[m]-th minute (another calendar)."""
    span = np.arange(minutes)
    return [
        (1_700_000_000_000_000_000 + (span[span % gap != 0] if gap else span) * 60_000_000_000).astype(np.int64)
        for gap in gaps
    ]


@pytest.mark.parametrize(
    "minutes,gaps,train_frac,val_frac,window,folds,train_bars",
    [
        (3000, [0], 0.5, 0.7, 16, 1, None),
        (3000, [0], 0.5, 0.7, 16, 4, None),
        (3001, [0, 3], 0.4, 0.6, 8, 3, 500),
        (4000, [7, 5], 0.6, 0.75, 30, 5, None),
    ],
)
def test_fold_blocks_are_consecutive_and_each_follows_its_own_training_and_validation(
    minutes, gaps, train_frac, val_frac, window, folds, train_bars
):
    market_ts = market_times(minutes, gaps)
    all_ts = np.unique(np.concatenate(market_ts))
    cut1, cut2 = (int(all_ts[int(len(all_ts) * frac)]) for frac in (train_frac, val_frac))
    bounds = pt.fold_bounds(all_ts, market_ts, cut1, cut2, window, folds, train_bars)
    assert len(bounds) == folds and all(len(fold) == len(market_ts) for fold in bounds)
    for m, ts in enumerate(market_ts):
        i1, i2, n = int(np.searchsorted(ts, cut1)), int(np.searchsorted(ts, cut2)), len(ts)
        if folds == 1:  # the single split of --train-end/--val-end
            assert bounds[0][m] == {"train": (0, i1), "val": (i1 + window, i2), "test": (i2 + window, n)}
        tests = [fold[m]["test"] for fold in bounds]
        assert tests[0][0] == i2 + window  # the first block starts where the single split's test starts
        assert all(a[1] == b[0] for a, b in zip(tests, tests[1:]))  # consecutive, disjoint
        assert all(first < end for first, end in tests) and tests[-1][1] <= n
        if len(market_ts) == 1:  # equal blocks, the remainder (under `folds` bars) left out
            assert len({end - first for first, end in tests}) == 1 and n - folds < tests[-1][1]
        for fold in bounds:
            (train_first, train_end), (val_first, val_end), (test_first, _) = (fold[m][s] for s in ("train", "val", "test"))
            assert train_first == (0 if train_bars is None else train_end - train_bars)
            # the embargo: a split's observations (from its first bar) never read the split before it
            assert val_first == train_end + window and test_first == val_end + window
            assert train_end < val_first < val_end < test_first
    for fold in bounds:  # one cut time for every market: no market trains on another's validation or test period
        for a, ts_a in enumerate(market_ts):
            for b, ts_b in enumerate(market_ts):
                assert ts_a[fold[a]["train"][1] - 1] < ts_b[fold[b]["val"][0]]
                assert ts_a[fold[a]["val"][1] - 1] < ts_b[fold[b]["test"][0]]


@pytest.fixture(scope="module")
def two_markets(tmp_path_factory):
    """Synthetic ES-like SYN and NQ-like SYN2 minute bars in one file."""
    path = tmp_path_factory.mktemp("data") / "market.npz"
    assert dp.main(["synthetic-intraday", "--out", str(path), "--days", "25", "--seed", "0", "--markets", "2"]) == 0
    return path


def test_each_folds_features_are_normalised_by_its_own_training_split(two_markets):
    args = pt.Args(data=str(two_markets), window=8, episode_bars=64, walk_forward=3, walk_forward_train_bars=2000)
    _, info = pt.load_data(args)
    with np.load(two_markets) as z:
        raw = z["features"].astype(np.float64)
    means = []
    for fold in range(3):
        datasets, fold_info = pt.fold_data(info, fold)
        bounds = [b["train"] for b in info["folds"][fold]]
        assert all(hi - lo == 2000 for lo, hi in bounds) and list(np.asarray(datasets["train"].lo)) == [lo for lo, _ in bounds]
        train = np.concatenate([raw[m, lo:hi] for m, (lo, hi) in enumerate(bounds)])  # exactly its training bars
        mean, std = train.mean(0), train.std(0)
        np.testing.assert_allclose(fold_info["feature_mean"], mean, rtol=1e-9, atol=1e-12)
        expected = ((raw - mean) / np.where(std > 1e-12, std, 1.0)).clip(-10, 10)
        np.testing.assert_allclose(np.asarray(datasets["test"].features), expected, rtol=1e-5, atol=1e-5)
        means.append(fold_info["feature_mean"])
    assert means[0] != means[1] != means[2]


def test_walk_forward_flags_and_too_short_folds_are_one_line_errors(two_markets, tmp_path):
    flags = [*TINY, "--data", two_markets, "--out-dir", tmp_path]
    assert_one_line_error(run_script("ppo_trader.py", *flags, "--walk-forward", "0"), "--walk-forward")
    assert_one_line_error(run_script("ppo_trader.py", *flags, "--walk-forward-train-bars", "500"), "--walk-forward-train-bars")
    r = run_script("ppo_trader.py", *flags, "--walk-forward", "200")
    assert_one_line_error(r, "walk-forward fold 0's market SYN has")
    assert "test split" in r.stderr and "lower --walk-forward" in r.stderr
    r = run_script("ppo_trader.py", *flags, "--walk-forward", "2", "--walk-forward-train-bars", "100000")
    assert_one_line_error(r, "walk-forward fold 0's rolling training window (--walk-forward-train-bars)")
    r = run_script("ppo_trader.py", *flags, "--walk-forward", "2", "--walk-forward-train-bars", "20")
    assert_one_line_error(r, "bars in the train split")
    r = run_script("ppo_trader.py", *flags, "--walk-forward", "2", "--phase", "2", "--init-from", tmp_path / "p1.msgpack")
    assert_one_line_error(r, "one policy file cannot start every walk-forward fold")
    assert not any(tmp_path.iterdir())  # nothing written


def perturbed_copy(source, path, bounds: list) -> None:
    """The npz with every price and ATR of each market's bars [first, end) of `bounds` scaled by 1.7 and their features
    reversed in sign."""
    with np.load(source, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    for name in ("open", "high", "low", "close", "atr", "features"):
        raw[name] = raw[name].copy()
        for m, (first, end) in enumerate(bounds):
            raw[name][m, first:end] *= -1.0 if name == "features" else 1.7
    np.savez(path, **raw)


@pytest.fixture(scope="module")
def walk_forward_runs(two_markets, tmp_path_factory):
    """A 2-fold x 2-seed run on two markets, and the same run (same relative paths, so the same config) on data whose
    fold 0 test block and its embargo are changed."""
    original, perturbed = tmp_path_factory.mktemp("original"), tmp_path_factory.mktemp("perturbed")
    shutil.copy(two_markets, original / "market.npz")
    _, info = pt.load_data(pt.Args(data=str(two_markets), window=8, episode_bars=64, walk_forward=FOLDS))
    perturbed_copy(two_markets, perturbed / "market.npz", [(b["val"][1], b["test"][1]) for b in info["folds"][0]])
    run = run_script(SCRIPT, *WALK_FORWARD, cwd=original, env={"JAX_LOG_COMPILES": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    other = run_script(SCRIPT, *WALK_FORWARD, cwd=perturbed)
    assert other.returncode == 0, other.stderr[-3000:]
    return original / "runs" / "wf", perturbed / "runs" / "wf", run


def test_every_fold_and_seed_is_reported_and_the_summary_is_over_folds_x_seeds(walk_forward_runs):
    run_dir, _, run = walk_forward_runs
    json.loads((run_dir / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    report = report_of(run_dir)
    rows = report["seeds"]
    assert [(row["fold"], row["seed"]) for row in rows] == [(f, k) for f in range(FOLDS) for k in range(SEEDS)]
    assert [row["checkpoint"] for row in rows] == [
        f"runs/wf/fold{f}/seed{k}/best.msgpack" for f in range(FOLDS) for k in range(SEEDS)
    ]
    assert [fold["fold"] for fold in report["folds"]] == list(range(FOLDS))
    for market in MARKETS:
        periods = [fold[market] for fold in report["folds"]]
        assert periods[0]["val"]["end"] < periods[0]["test"]["start"] < periods[0]["test"]["end"] < periods[1]["test"]["start"]
        assert [row[market]["start"] for row in rows] == [
            periods[f]["test"]["start"] for f in range(FOLDS) for _ in range(SEEDS)
        ]
        for name, entry in report["summary"][market].items():
            runs = RANDOM_RUNS if name == "random" else SEEDS
            assert entry["folds"] == FOLDS and entry["runs"] == FOLDS * runs, name
            assert len(entry["per_run"]) == runs, name  # each run's returns stitched over the folds
            assert entry["num_trials"] == (FOLDS * SEEDS if name in ("policy", "sampled") else 1), name
        policy = report["summary"][market]["policy"]
        totals = [row[market]["policy"]["total_return"] for row in rows]
        assert policy["total_return"]["median"]["value"] == pytest.approx(np.median(totals))
        assert len(policy["percentile_among_random"]["per_run"]) == FOLDS * SEEDS
        assert report["over_seeds"][market]["policy"]["total_return"]["median"] == pytest.approx(np.median(totals))
        assert f"({FOLDS * SEEDS} trials; {FOLDS * SEEDS} runs" in report["verdict"][market]
    for f in range(FOLDS):
        for k in range(SEEDS):
            for which in ("best", "final"):
                assert pt.read_policy(str(run_dir / f"fold{f}" / f"seed{k}" / f"{which}.msgpack"))["fold"] == f
        assert (run_dir / f"fold{f}" / "metrics.jsonl").is_file() and (run_dir / f"fold{f}" / "checkpoint.msgpack").is_file()
    trades = (run_dir / "trades.csv").read_text().splitlines()
    assert trades[0].startswith("fold,seed,market,")
    for row in rows:
        for market in MARKETS:
            count = sum(line.startswith(f"{row['fold']},{row['seed']},{market},") for line in trades[1:])
            assert count == row[market]["policy"]["trades"], (row["fold"], row["seed"], market)
    assert (run_dir / "equity.png").stat().st_size > 0 and (run_dir / "summary.png").stat().st_size > 0
    assert "  fold 1 seed 1 policy " in run.stdout and "  median over folds x seeds policy " in run.stdout


def test_the_folds_share_one_compiled_chunk_init_and_backtest(walk_forward_runs):
    """With JAX_LOG_COMPILES, the seeds' train chunk and the init compile once for both folds; the backtest twice
    (validation: the greedy policy; test: the greedy, sampled and random policies) and the random runs once, not once
    per fold."""
    *_, run = walk_forward_runs
    log = run.stdout + run.stderr
    counts = {name: log.count(f"Compiling jit({name})") for name in ("train_chunk", "init", "play", "play_random")}
    assert counts == {"train_chunk": 1, "init": 1, "play": 2, "play_random": 1}, counts
    assert log.count("fold 1/2") == 1  # the second fold did train


def test_changing_fold_0s_test_block_changes_nothing_in_its_selection(walk_forward_runs):
    """Fold 0's policy files are byte for byte the same on data whose fold 0 test block (and the embargo before it)
    differs, while its test results do change."""
    run_dir, perturbed_dir, _ = walk_forward_runs
    for k in range(SEEDS):
        for which in ("best", "final"):
            name = f"fold0/seed{k}/{which}.msgpack"
            assert (run_dir / name).read_bytes() == (perturbed_dir / name).read_bytes(), name
    rows, perturbed_rows = report_of(run_dir)["seeds"], report_of(perturbed_dir)["seeds"]
    for market in MARKETS:
        assert rows[0][market]["buy_and_hold"]["total_return"] != perturbed_rows[0][market]["buy_and_hold"]["total_return"]
    # fold 1 trains up to --train-end + one block, before the changed bars (they are in its validation block): its
    # training, and so its final policies, are the same too
    folds = report_of(run_dir)["folds"]
    for market in MARKETS:
        # the changed bars start after fold 0's last validation bar
        assert folds[1][market]["train"]["end"] < folds[0][market]["val"]["end"] < folds[1][market]["val"]["end"]
    for k in range(SEEDS):
        name = f"fold1/seed{k}/final.msgpack"
        assert (run_dir / name).read_bytes() == (perturbed_dir / name).read_bytes(), name


def test_eval_only_of_the_walk_forward_folder_reproduces_its_report(walk_forward_runs):
    run_dir, _, _ = walk_forward_runs
    r = run_script(SCRIPT, "--eval-only", "--checkpoint", "runs/wf", cwd=run_dir.parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated, trained = report_of(run_dir / "eval_test_market"), report_of(run_dir)
    assert evaluated["folds"] == trained["folds"]
    assert [{k: v for k, v in row.items() if k != "checkpoint"} for row in evaluated["seeds"]] == [
        {k: v for k, v in row.items() if k != "checkpoint"} for row in trained["seeds"]
    ]
    assert evaluated["summary"] == trained["summary"] and evaluated["verdict"] == trained["verdict"]
    assert (run_dir / "eval_test_market" / "trades.csv").read_text() == (run_dir / "trades.csv").read_text()
    one = run_script(SCRIPT, "--eval-only", "--checkpoint", "runs/wf/fold1/seed0/best.msgpack", cwd=run_dir.parents[1])
    assert one.returncode == 0, one.stderr[-3000:]
    single = report_of(run_dir / "fold1" / "seed0" / "eval_test_market")
    assert [(row["fold"], row["seed"]) for row in single["seeds"]] == [(1, 0)]
    assert single["folds"] == trained["folds"][1:]
    for market in MARKETS:  # fold 1's own test block, its own feature statistics
        assert_rows_close(single["seeds"][0][market], trained["seeds"][SEEDS][market])


def assert_rows_close(a: dict, b: dict, where: str = "") -> None:
    """Two report rows with the same keys and values, floats to float32 tolerance."""
    assert set(a) == set(b), where
    for key, value in a.items():
        if isinstance(value, dict):
            assert_rows_close(value, b[key], f"{where}.{key}")
        elif isinstance(value, float):
            assert value == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"


def test_a_run_stopped_in_fold_0_and_at_its_end_resumes_to_the_same_folds(walk_forward_runs, tmp_path):
    """--stop-after counts the chunks of the fold in progress: stopped after fold 0's first chunk, then at fold 0's
    end (before its final policies), the resumed run restores fold 0, starts fold 1 new and ends with the
    uninterrupted run's policies and report."""
    run_dir, _, _ = walk_forward_runs
    shutil.copy(run_dir.parents[1] / "market.npz", tmp_path / "market.npz")
    first = run_script(SCRIPT, *WALK_FORWARD, "--stop-after", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Continue with: python ppo_trader.py --resume runs/wf" in first.stdout
    second = run_script(SCRIPT, "--resume", "runs/wf", "--stop-after", "3", cwd=tmp_path)
    assert second.returncode == 0 and "stopped after chunk 4" in second.stdout, second.stderr[-3000:]
    resumed_dir = tmp_path / "runs" / "wf"
    assert not (resumed_dir / "fold0" / "seed0" / "final.msgpack").exists() and not (resumed_dir / "fold1").exists()
    last = run_script(SCRIPT, "--resume", "runs/wf", cwd=tmp_path)
    assert last.returncode == 0, last.stderr[-3000:]
    for f in range(FOLDS):
        for k in range(SEEDS):
            for which in ("best", "final"):
                name = f"fold{f}/seed{k}/{which}.msgpack"
                assert_trees_close(policy_params(run_dir / name), policy_params(resumed_dir / name), name, atol=0.0)
    assert report_of(resumed_dir)["seeds"] == report_of(run_dir)["seeds"]


def test_init_from_a_walk_forward_run_starts_each_fold_from_its_own_phase_1(walk_forward_runs, monkeypatch):
    """Phase 2 of fold f seed k starts from phase 1's fold<f>/seed<k>/best.msgpack; a phase 1 run of other folds, or
    one policy file, is refused."""
    run_dir, _, _ = walk_forward_runs
    monkeypatch.chdir(run_dir.parents[1])  # the runs' relative paths
    config = json.loads((run_dir / "config.json").read_text())
    args = pt.Args(**dict(config, phase=2, init_from="runs/wf"))
    num_features = pt.load_data(args)[0]["train"].features.shape[-1]
    for f in range(FOLDS):
        transfers = pt.init_transfers(args, num_features, f)
        assert len(transfers) == SEEDS
        for k, (params, _) in enumerate(transfers):
            saved = policy_params(run_dir / f"fold{f}" / f"seed{k}" / "best.msgpack")
            assert_trees_close(params, saved, f"fold {f} seed {k}", atol=0.0)
    with pytest.raises(pt.DataError, match="--val-end"):
        pt.init_transfers(dataclasses.replace(args, val_end="0.8"), num_features, 0)
    with pytest.raises(pt.DataError, match="one policy file"):
        pt.init_transfers(dataclasses.replace(args, init_from="runs/wf/fold0/seed0/best.msgpack"), num_features, 0)
    r = run_script(SCRIPT, *FLAGS, "--phase", "2", "--init-from", "runs/wf", "--run-name", "p2", cwd=run_dir.parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(row["fold"], row["seed"]) for row in report_of(run_dir.parent / "p2")["seeds"]] == [
        (f, k) for f in range(FOLDS) for k in range(SEEDS)
    ]
