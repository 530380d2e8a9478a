"""erl_trader.py --walk-forward: the folds' test blocks tile the history after the first validation split, each fold
selects on data before its own test block only (changing that block changes nothing in its selection), every fold
plays one compiled chunk and one compiled backtest, and the report, eval-only and --resume follow the folds."""

import json

import numpy as np
import pytest

import erl_trader as et
from conftest import assert_one_line_error, assert_trees_close, policy_params, report_of, run_script
from test_erl_cli import SPLITS, TINY

FOLDS, SEEDS = 2, 2
WALK_FORWARD = [*TINY, *SPLITS, "--walk-forward", str(FOLDS), "--num-seeds", str(SEEDS)]


@pytest.mark.parametrize(
    "num_days,train_end,val_end,window,folds,train_days",
    [
        (1000, 400, 600, 20, 1, None),
        (1000, 400, 600, 20, 4, None),
        (1003, 400, 600, 8, 3, 250),
        (8000, 5000, 6000, 60, 5, None),
    ],
)
def test_fold_blocks_are_consecutive_and_each_follows_its_own_training_and_validation(
    num_days, train_end, val_end, window, folds, train_days
):
    bounds = et.fold_bounds(num_days, train_end, val_end, window, folds, train_days)
    assert len(bounds) == folds
    if folds == 1:
        assert bounds[0] == et.split_bounds(num_days, train_end, val_end, window)
    tests = [fold["test"] for fold in bounds]
    assert tests[0][0] == val_end + window  # the first block starts where the single split's test starts
    assert all(a[1] == b[0] for a, b in zip(tests, tests[1:]))  # consecutive, disjoint
    assert num_days - folds < tests[-1][1] <= num_days  # they tile the rest, bar a remainder under `folds` days
    assert len({end - first for first, end in tests}) == 1  # equal blocks: one compiled backtest
    assert len({fold["val"][1] - fold["val"][0] for fold in bounds}) == 1
    for fold in bounds:
        (train_first, train_last), (val_first, val_last), (test_first, _) = fold["train"], fold["val"], fold["test"]
        assert train_first == (window - 1 if train_days is None else train_last - train_days)
        # the embargo: a split's observations (window - 1 days before its first decision) never read the split before it
        assert val_first - (window - 1) > train_last - 1 and test_first - (window - 1) > val_last - 1
        assert train_last < val_first < val_last < test_first


def test_walk_forward_flags_and_too_short_folds_are_one_line_errors(tmp_path):
    out = ["--out-dir", tmp_path]
    assert_one_line_error(run_script("erl_trader.py", *TINY, *SPLITS, "--walk-forward", "0", *out), "--walk-forward")
    assert_one_line_error(
        run_script("erl_trader.py", *TINY, *SPLITS, "--walk-forward-train-days", "500", *out), "--walk-forward-train-days"
    )
    r = run_script("erl_trader.py", *TINY, *SPLITS, "--walk-forward", "400", *out)
    assert_one_line_error(r, "walk-forward fold 0's test split")
    assert "--walk-forward" in r.stderr
    r = run_script("erl_trader.py", *TINY, *SPLITS, "--walk-forward", "2", "--walk-forward-train-days", "20000", *out)
    assert_one_line_error(r, "--walk-forward-train-days")
    assert not any(tmp_path.iterdir())  # nothing written


def perturbed_copy(source: str, path, first: int, end: int) -> None:
    """The daily npz with every price of days [first, end) scaled by 1.7 and their features reversed in sign."""
    with np.load(source, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    for name in ("open", "high", "low", "close"):
        raw[name] = raw[name].copy()
        raw[name][first:end] *= 1.7
    raw["features"] = raw["features"].copy()
    raw["features"][first:end] *= -1.0
    np.savez(path, **raw)


@pytest.fixture(scope="module")
def walk_forward_runs(tmp_path_factory):
    """A 2-fold x 2-seed run, and the same run on data whose fold 0 test block (and its embargo) is changed, stopped
    after one chunk of fold 0 and resumed."""
    out = tmp_path_factory.mktemp("erl_walk_forward")
    run = run_script("erl_trader.py", *WALK_FORWARD, "--out-dir", out, "--run-name", "wf", env={"JAX_LOG_COMPILES": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    args = et.parse_args([*WALK_FORWARD])
    _, info = et.load_data(args)
    (_, val_end), (_, test_end) = info["folds"][0]["val"], info["folds"][0]["test"]
    perturbed_copy(args.data, out / "perturbed.npz", val_end, test_end)
    flags = [*WALK_FORWARD, "--data", out / "perturbed.npz", "--out-dir", out, "--run-name", "perturbed"]
    part = run_script("erl_trader.py", *flags, "--stop-after", "1")
    assert part.returncode == 0 and "Continue with: python erl_trader.py --resume" in part.stdout, part.stderr[-3000:]
    assert not (out / "perturbed" / "fold1").exists()
    resumed = run_script("erl_trader.py", "--resume", out / "perturbed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, run


def test_every_fold_and_seed_is_reported_and_the_summary_is_over_folds_x_seeds(walk_forward_runs):
    out, _ = walk_forward_runs
    report = report_of(out / "wf")
    json.loads((out / "wf" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert [(row["fold"], row["seed"]) for row in report["seeds"]] == [(f, k) for f in range(FOLDS) for k in range(SEEDS)]
    assert [fold["fold"] for fold in report["folds"]] == list(range(FOLDS))
    assert report["folds"][0]["test"]["end"] < report["folds"][1]["test"]["start"]
    assert report["start"] == report["folds"][0]["test"]["start"] and report["end"] == report["folds"][1]["test"]["end"]
    for name, entry in report["summary"].items():
        assert entry["folds"] == FOLDS, name
        runs = FOLDS * (report["random_runs"] if name == "random" else SEEDS)
        assert entry["runs"] == runs and len(entry["per_run"]) == (report["random_runs"] if name == "random" else SEEDS)
    champion = report["summary"]["champion"]
    assert champion["num_trials"] == FOLDS * SEEDS
    assert champion["total_return"]["median"]["value"] == pytest.approx(
        np.median([row["champion"]["total_return"] for row in report["seeds"]])
    )
    assert len(champion["percentile_among_random"]["per_run"]) == FOLDS * SEEDS
    for fold in range(FOLDS):
        for k in range(SEEDS):
            for f in ("best", "final"):
                assert (out / "wf" / f"fold{fold}" / f"seed{k}" / f"{f}.msgpack").is_file()
        assert (out / "wf" / f"fold{fold}" / "metrics.jsonl").is_file()
    trades = (out / "wf" / "trades.csv").read_text().splitlines()
    assert trades[0].startswith("fold,seed,ticker") and {line.split(",")[0] for line in trades[1:]} <= {"0", "1"}
    assert (out / "wf" / "equity.png").stat().st_size > 0 and (out / "wf" / "summary.png").stat().st_size > 0


def test_the_folds_share_one_compiled_chunk_and_backtest(walk_forward_runs):
    """With JAX_LOG_COMPILES, the seeds' chunk (jit of the vmapped `chunk`) compiles once for both folds, and the
    backtest (validation: the actor; test: the actor and the random policy) at most three times, not once per fold."""
    _, run = walk_forward_runs
    log = run.stdout + run.stderr
    chunks, backtests = log.count("Compiling jit(chunk)"), log.count("Compiling jit(run)")
    assert chunks == 1 and 1 <= backtests <= 3, (chunks, backtests)  # once per fold would be 2 and at least 5


def test_changing_fold_0s_test_block_changes_nothing_in_its_selection(walk_forward_runs):
    """Fold 0's policy files are the same on data whose fold 0 test block differs (that run also stopped and resumed
    in fold 0), while its test results do change."""
    out, _ = walk_forward_runs
    for k in range(SEEDS):
        for f in ("best", "final"):
            original = policy_params(out / "wf" / "fold0" / f"seed{k}" / f"{f}.msgpack")
            assert_trees_close(
                original,
                policy_params(out / "perturbed" / "fold0" / f"seed{k}" / f"{f}.msgpack"),
                f"fold 0 seed {k} {f}",
                atol=0.0,
            )
    rows, perturbed_rows = report_of(out / "wf")["seeds"], report_of(out / "perturbed")["seeds"]
    assert rows[0]["best_from"] == perturbed_rows[0]["best_from"]
    assert rows[0]["champion"]["total_return"] != perturbed_rows[0]["champion"]["total_return"]
    # fold 1 trains up to --train-end + one block, before the changed days (they are in its validation block): its
    # training is the same too
    bounds = report_of(out / "wf")["folds"]
    assert bounds[1]["train"]["end"] < bounds[0]["test"]["start"] <= bounds[1]["val"]["end"]
    for k in range(SEEDS):
        finals = [policy_params(out / name / "fold1" / f"seed{k}" / "final.msgpack") for name in ("wf", "perturbed")]
        assert_trees_close(*finals, f"fold 1 seed {k} final", atol=0.0)


def test_eval_only_of_the_walk_forward_folder_reproduces_its_report(walk_forward_runs):
    out, _ = walk_forward_runs
    r = run_script("erl_trader.py", "--eval-only", "--checkpoint", out / "wf")
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated, trained = report_of(out / "wf" / "eval_test_sp500_daily"), report_of(out / "wf")
    assert evaluated["folds"] == trained["folds"]
    for a, b in zip(evaluated["seeds"], trained["seeds"]):
        assert (a["fold"], a["seed"]) == (b["fold"], b["seed"])
        assert a["champion"] == pytest.approx(b["champion"])
    one = run_script("erl_trader.py", "--eval-only", "--checkpoint", out / "wf" / "fold1" / "seed0" / "best.msgpack")
    assert one.returncode == 0, one.stderr[-3000:]
    single = report_of(out / "wf" / "fold1" / "seed0" / "eval_test_sp500_daily")
    assert [(row["fold"], row["seed"]) for row in single["seeds"]] == [(1, 0)]
    assert single["start"] == trained["folds"][1]["test"]["start"]
    assert single["seeds"][0]["champion"] == pytest.approx(trained["seeds"][2]["champion"])
