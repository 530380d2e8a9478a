"""ppo_trader.py end to end with tiny flags: outputs, eval-only, resume, bad flags and data (seeds: test_ppo_seeds.py)."""

import json

import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

from conftest import (
    RUN_OUTPUTS,
    assert_divergence_stops_and_keeps_the_last_good_checkpoint,
    assert_one_line_error,
    assert_results_table_matches,
    assert_run_outputs,
    run_script,
    tiny_run_dir,
)

DATA_STEM, MARKET = "spy_1min", "SPY"  # the default --data
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory, "ppo_trader.py", TINY)


def test_tiny_run_writes_every_output(tiny_run):
    run_dir, r = tiny_run
    rows = assert_run_outputs(run_dir, RUN_OUTPUTS)
    assert [x["update"] for x in rows] == [2, 4, 6, 8]
    for key in ("episodic_return", "policy_loss", "value_loss", "entropy", "sps", "val_return"):
        assert key in rows[-1]
    report = json.loads((run_dir / "report.json").read_text())
    eur = report["seeds"][0][MARKET]
    for who in ("policy", "sampled", "random", "buy_and_hold"):
        for k in ("total_return", "annualised_return", "annualised_volatility", "sharpe", "sortino", "max_drawdown", "calmar"):
            assert np.isfinite(eur[who][k]), (who, k)
    for k in ("trades", "win_rate", "profit_factor", "average_trade", "exposure"):
        assert k in eur["policy"]
    assert report["split"] == "test"
    trades = (run_dir / "trades.csv").read_text().splitlines()
    assert trades[0] == "seed,market,entry_time,exit_time,direction,entry_price,exit_price,pnl"
    assert len(trades) - 1 == eur["policy"]["trades"]
    assert "update" in r.stdout and "SPS" in r.stdout and "ETA" in r.stdout and "validation backtests:" in r.stdout


def test_results_table_of_the_report(tiny_run):
    """The README's results tables (benchmarks/results.py) show this report's summary and verdict as it holds them."""
    run_dir, _ = tiny_run
    assert_results_table_matches("ppo", json.loads((run_dir / "report.json").read_text()))


def test_tensorboard_tags(tiny_run):
    from tensorboard_reader import scalar_tags

    tags = scalar_tags(tiny_run[0])
    for tag in (
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/learning_rate",
        "losses/policy_loss",
        "losses/value_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "eval/val_return",
        "perf/SPS",
    ):
        assert tag in tags, tag


def test_eval_only_reproduces_the_report_in_its_own_folder(tiny_run):
    """--eval-only of the run folder plays seed0/best.msgpack again into runs/NAME/eval_test_<data>/ and leaves the
    training run's files as they were; a second eval-only into the same folder is refused."""
    run_dir, _ = tiny_run
    before = {f: (run_dir / f).read_bytes() for f in ("report.json", "trades.csv", "equity.png")}
    r = run_script("ppo_trader.py", "--eval-only", "--checkpoint", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    eval_dir = run_dir / f"eval_test_{DATA_STEM}"
    after = json.loads((eval_dir / "report.json").read_text())
    assert after["seeds"][0][MARKET] == json.loads(before["report.json"])["seeds"][0][MARKET] and after["overrides"] == {}
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert (eval_dir / "trades.csv").read_text() == before["trades.csv"].decode()
    assert_one_line_error(run_script("ppo_trader.py", "--eval-only", "--checkpoint", run_dir), str(eval_dir))


def test_eval_only_takes_cost_overrides_and_states_them(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    r = run_script(
        "ppo_trader.py",
        "--eval-only",
        "--checkpoint",
        run_dir / "seed0" / "best.msgpack",
        "--slippage-ticks",
        "50",
        "--commission",
        "100",
        "--out-dir",
        tmp_path,
        "--run-name",
        "stress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    plain = json.loads((run_dir / "report.json").read_text())["seeds"][0][MARKET]
    stress = json.loads((tmp_path / "stress" / "report.json").read_text())
    assert stress["overrides"] == {"slippage_ticks": 50.0, "commission": 100.0} and "--commission 100" in r.stdout
    # the same policy pays more: every trade and buy-and-hold lose the extra costs
    assert stress["seeds"][0][MARKET]["buy_and_hold"]["final_equity"] < plain["buy_and_hold"]["final_equity"]
    if plain["policy"]["trades"]:
        assert stress["seeds"][0][MARKET]["policy"]["average_trade"] < plain["policy"]["average_trade"]


def test_reports_are_strict_json(tiny_run):
    """No NaN or Infinity (a profit factor without losing trades is null); buy-and-hold reports its breach."""
    run_dir, _ = tiny_run

    def refuse(constant):
        raise AssertionError(f"{constant} in report.json")

    report = json.loads((run_dir / "report.json").read_text(), parse_constant=refuse)
    assert isinstance(report["seeds"][0][MARKET]["buy_and_hold"]["breached"], bool)


def test_flags_a_run_cannot_use_are_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    config = (run_dir / "config.json").read_bytes()
    assert_one_line_error(run_script("ppo_trader.py", "--resume", run_dir, "--learning-rate", "1e30"), "--learning-rate")
    assert_one_line_error(
        run_script("ppo_trader.py", "--eval-only", "--checkpoint", run_dir / "seed0" / "best.msgpack", "--learning-rate", "1"),
        "--learning-rate",
    )
    assert_one_line_error(run_script("ppo_trader.py", "--checkpoint", run_dir / "seed0" / "best.msgpack"), "--eval-only")
    # a run folder that holds a run is not reused
    assert_one_line_error(
        run_script("ppo_trader.py", *TINY, "--out-dir", run_dir.parent, "--run-name", run_dir.name), "--resume"
    )
    assert (run_dir / "config.json").read_bytes() == config


def test_resume_is_bit_identical(tmp_path):
    full = run_script("ppo_trader.py", *TINY, "--out-dir", tmp_path, "--run-name", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    part = run_script("ppo_trader.py", *TINY, "--out-dir", tmp_path, "--run-name", "part", "--stop-after", "2")
    assert part.returncode == 0 and "stopped after chunk 2" in part.stdout, part.stdout[-2000:] + part.stderr[-2000:]
    assert not (tmp_path / "part" / "seed0" / "final.msgpack").exists()
    resumed = run_script("ppo_trader.py", "--resume", tmp_path / "part")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for f, keys in (
        ("seed0/final.msgpack", ("params", "obs_norm")),
        ("seed0/best.msgpack", ("params", "obs_norm")),
        ("checkpoint.msgpack", ("runner",)),
    ):
        a, b = (msgpack_restore((tmp_path / run / f).read_bytes()) for run in ("full", "part"))
        for k in keys:  # parameters, optimiser, env states, normaliser, RNG: bit for bit
            assert msgpack_serialize(a[k]) == msgpack_serialize(b[k]), (f, k)
    rows_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    rows_part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(x).items() if k not in ("sps", "elapsed")} for x in rows]  # noqa: E731
    assert strip(rows_full) == strip(rows_part)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--num-envs", "abc"], "--num-envs"),
        (["--bogus-flag", "1"], "--bogus-flag"),
        (["--data", "data/sp500_daily.npz"], "intraday"),
        (["--data", "nope.npz"], "nope.npz"),
        (["--num-envs", "10", "--num-steps", "3", "--num-minibatches", "4"], "divisible"),
        (["--train-end", "yesterday"], "--train-end"),
        (["--eval-only"], "--checkpoint"),
        (["--eval-only", "--checkpoint", "README.md"], "README.md"),
        (["--random-runs", "0"], "--random-runs"),
        (["--trials", "0"], "--trials"),
    ],
)
def test_bad_flags_and_data_give_one_line(argv, needle):
    r = run_script("ppo_trader.py", *argv)
    assert_one_line_error(r, needle)


@pytest.fixture(scope="module")
def phase2_run(tiny_run, tmp_path_factory):
    """Phase 2 started from the tiny phase 1 run's best policy."""
    phase1 = tiny_run[0] / "seed0" / "best.msgpack"
    return tiny_run_dir(tmp_path_factory, "ppo_trader.py", TINY + ["--phase", "2", "--init-from", str(phase1)])


def test_phase2_from_phase1_writes_every_output(phase2_run):
    run_dir, _ = phase2_run
    assert_run_outputs(run_dir, RUN_OUTPUTS)
    assert json.loads((run_dir / "config.json").read_text())["phase"] == 2
    assert msgpack_restore((run_dir / "seed0" / "best.msgpack").read_bytes())["num_actions"] == 6
    report = json.loads((run_dir / "report.json").read_text())["seeds"][0]
    assert np.isfinite(report[MARKET]["policy"]["total_return"])
    r2 = run_script("ppo_trader.py", "--eval-only", "--checkpoint", run_dir / "seed0" / "best.msgpack")
    assert r2.returncode == 0, r2.stderr[-2000:]
    again = json.loads((run_dir / "seed0" / f"eval_test_{DATA_STEM}" / "report.json").read_text())
    assert again["seeds"][0][MARKET] == report[MARKET]


def test_init_from_bad_checkpoints_give_one_line(tiny_run, phase2_run, tmp_path):
    p1, p2 = tiny_run[0] / "seed0" / "best.msgpack", phase2_run[0] / "seed0" / "best.msgpack"
    out = ["--out-dir", tmp_path, "--run-name", "bad"]
    assert_one_line_error(run_script("ppo_trader.py", *TINY, "--phase", "2", "--init-from", p2, *out), "phase 1")
    assert_one_line_error(
        run_script("ppo_trader.py", *TINY, "--hidden", "16", "--phase", "2", "--init-from", p1, *out), "--hidden 32"
    )
    assert_one_line_error(
        run_script("ppo_trader.py", *TINY, "--window", "4", "--phase", "2", "--init-from", p1, *out), "--window 8"
    )
    assert_one_line_error(run_script("ppo_trader.py", *TINY, "--phase", "2", "--init-from", "README.md", *out), "README.md")
    assert_one_line_error(run_script("ppo_trader.py", *TINY, "--init-from", p1, *out), "--phase 2")
    assert_one_line_error(run_script("ppo_trader.py", "--phase", "3"), "--phase")
    assert not (tmp_path / "bad").exists()


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    assert_divergence_stops_and_keeps_the_last_good_checkpoint(
        "ppo_trader.py", TINY, tmp_path, {"learning_rate": 1e30}, final_policy="seed0/final.msgpack", names="seed 0 (--seed 1)"
    )
