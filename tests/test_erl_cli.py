"""erl_trader.py end to end with tiny flags: outputs, tags, eval-only, resume, bad flags and data."""

import json

import numpy as np
import pytest
from flax.serialization import msgpack_restore, msgpack_serialize

from conftest import (
    assert_divergence_stops_and_keeps_the_last_good_checkpoint,
    assert_one_line_error,
    assert_results_table_matches,
    assert_run_outputs,
    run_script,
    tiny_run_dir,
)

TINY = [
    "--pop-size",
    "4",
    "--generations",
    "4",
    "--episodes-per-agent",
    "2",
    "--worst-k",
    "1",
    "--num-elites",
    "1",
    "--rl-updates",
    "2",
    "--batch-size",
    "16",
    "--buffer-size",
    "2000",
    "--window",
    "8",
    "--trading-days",
    "6",
    "--settlement-days",
    "2",
    "--hidden",
    "8",
    "--conv-channels",
    "4",
    "--eval-every",
    "2",
    "--num-seeds",
    "1",
]
SPLITS = [
    "--train-end",
    "2010-01-01",
    "--val-end",
    "2015-01-01",
]  # not the defaults: --eval-only must take them from the checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # --obs-norm train: eval-only must also rebuild the observation's training statistics from the checkpoint's splits
    return tiny_run_dir(tmp_path_factory, "erl_trader.py", TINY + SPLITS + ["--obs-norm", "train"])


def test_tiny_run_writes_every_output(tiny_run):
    run_dir, r = tiny_run
    rows = assert_run_outputs(run_dir)
    assert [x["generation"] for x in rows] == [1, 2, 3, 4]
    assert rows[1]["injected"] and not rows[0]["injected"] and "champion_val_return" in rows[1]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["split"] == "test" and "2015-01-01" < report["start"] < "2015-03-01"  # the first decision, after the embargo
    (row,) = report["seeds"]
    for who in ("champion", "td3_learner", "td3_learner_at_start", "random", "buy_and_hold"):
        for k in (
            "total_return",
            "annualised_return",
            "annualised_volatility",
            "sharpe",
            "sortino",
            "max_drawdown",
            "calmar",
            "trades",
        ):
            assert np.isfinite(row[who][k]), (who, k)
    trades = (run_dir / "trades.csv").read_text().splitlines()
    assert (
        trades[0] == "fold,seed,ticker,entry_date,exit_date,entry_price,exit_price,return_pct"
        and len(trades) - 1 == row["champion"]["trades"]
    )
    for word in ("gen", "fitness mean", "learner", "critic", "injected", "env-steps/s", "ETA", "bytes/transition"):
        assert word in r.stdout, word
    ckpt = msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())["runner"]
    assert set(ckpt) == {"pop", "learner", "replay", "rng", "gen"}


def test_results_table_of_the_report(tiny_run):
    """The README's results tables (benchmarks/results.py) show this report's summary and verdict as it holds them."""
    run_dir, _ = tiny_run
    assert_results_table_matches("erl", json.loads((run_dir / "report.json").read_text()))


def test_tensorboard_tags(tiny_run):
    from tensorboard_reader import scalar_tags

    tags = scalar_tags(tiny_run[0])
    for tag in (
        "charts/fitness_mean",
        "charts/fitness_max",
        "charts/fitness_min",
        "charts/learner_fitness",
        "charts/explore_return",
        "charts/champion_fitness",
        "charts/injected_is_elite",
        "losses/critic_loss",
        "losses/actor_loss",
        "eval/champion_val_return",
        "eval/learner_val_return",
        "perf/SPS",
    ):
        assert tag in tags, tag


def test_eval_only_reproduces_the_report_in_its_own_folder(tiny_run):
    """With no other flag, --eval-only plays the checkpoint's own test split (its data and dates), says which
    dates, and writes into eval_test_<data>/, leaving the training run's outputs as they were; a second
    evaluation into the same folder is refused."""
    run_dir, _ = tiny_run
    outputs = {name: (run_dir / name).read_bytes() for name in ("report.json", "trades.csv", "equity.png")}
    before = json.loads(outputs["report.json"])
    r = run_script("erl_trader.py", "--eval-only", "--checkpoint", run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"first decision {before['start']}, last day {before['end']}" in r.stdout, r.stdout[-2000:]
    eval_dir = run_dir / "eval_test_sp500_daily"
    after = json.loads((eval_dir / "report.json").read_text())
    assert (after["start"], after["end"]) == (before["start"], before["end"])
    for who in ("champion", "random", "buy_and_hold"):
        assert after["seeds"][0][who] == before["seeds"][0][who]
    assert (eval_dir / "trades.csv").read_bytes() == outputs["trades.csv"] and (eval_dir / "equity.png").is_file()
    assert {name: (run_dir / name).read_bytes() for name in outputs} == outputs
    again = run_script("erl_trader.py", "--eval-only", "--checkpoint", run_dir)
    assert_one_line_error(again, "eval_test_sp500_daily")


def test_eval_only_refuses_a_test_split_inside_the_selection_period(tiny_run):
    run_dir, _ = tiny_run
    r = run_script(
        "erl_trader.py",
        "--eval-only",
        "--checkpoint",
        run_dir / "seed0" / "best.msgpack",
        "--val-end",
        "2013-01-01",
        "--run-name",
        "x",
        "--out-dir",
        run_dir,
    )
    assert_one_line_error(r, "--eval-split test")
    assert not (run_dir / "x").exists()
    later = run_script(
        "erl_trader.py",
        "--eval-only",
        "--checkpoint",
        run_dir,
        "--val-end",
        "2018-01-01",
        "--run-name",
        "y",
        "--out-dir",
        run_dir,
    )
    assert later.returncode == 0, later.stderr[-2000:]
    assert json.loads((run_dir / "y" / "eval_test_sp500_daily" / "report.json").read_text())["start"] > "2018-01-01"


def test_ga_only_run_with_a_checkpoint_without_replay_resumes(tmp_path):
    """--rl-updates 0 (the GA alone) runs to the end; --no-checkpoint-replay leaves the memory out of the
    checkpoint, and --resume continues from it with an empty memory."""
    flags = [*TINY, "--rl-updates", "0", "--no-checkpoint-replay", "--out-dir", tmp_path, "--run-name", "ga"]
    part = run_script("erl_trader.py", *flags, "--stop-after", "1")
    assert part.returncode == 0, part.stderr[-2000:]
    assert "replay" not in msgpack_restore((tmp_path / "ga" / "checkpoint.msgpack").read_bytes())["runner"]
    resumed = run_script("erl_trader.py", "--resume", tmp_path / "ga")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "ga" / "metrics.jsonl").read_text().splitlines()]
    assert [x["generation"] for x in rows] == [1, 2, 3, 4] and all(np.isfinite(x["fitness_max"]) for x in rows)
    (row,) = json.loads((tmp_path / "ga" / "report.json").read_text())["seeds"]
    assert row["td3_learner"] == row["td3_learner_at_start"]  # no TD3 step: the learner is its start


def test_original_architecture_trains_end_to_end(tmp_path):
    """The original system's network (2 bidirectional LSTM layers, 4-head attention with residual and LayerNorm,
    a 3-layer stock path), recomputed in the backward pass (--remat), at toy widths: a run writes its outputs and
    its best policy loads back into the same network for --eval-only."""
    flags = [
        "--extractor",
        "lstm",
        "--bidirectional",
        "--lstm-layers",
        "2",
        "--attention-heads",
        "4",
        "--layer-norm",
        "--stock-layers",
        "16",
        "12",
        "6",
        "--remat",
    ]
    run = run_script("erl_trader.py", *TINY, "--generations", "2", *flags, "--out-dir", tmp_path, "--run-name", "original")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "original" / "config.json").read_text())["stock_layers"] == [16, 12, 6]
    best = tmp_path / "original" / "seed0" / "best.msgpack"
    evaluated = run_script("erl_trader.py", "--eval-only", "--checkpoint", best, "--eval-split", "val")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads((best.parent / "eval_val_sp500_daily" / "report.json").read_text())
    assert np.isfinite(report["seeds"][0]["champion"]["total_return"])


def test_resume_is_bit_identical(tmp_path):
    """Two seeds stopped after 3 chunks and resumed end bit for bit where the uninterrupted run ends."""
    flags = [*TINY, "--num-seeds", "2"]
    full = run_script("erl_trader.py", *flags, "--out-dir", tmp_path, "--run-name", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    part = run_script("erl_trader.py", *flags, "--out-dir", tmp_path, "--run-name", "part", "--stop-after", "3")
    assert part.returncode == 0 and "stopped after chunk 3" in part.stdout, part.stdout[-2000:] + part.stderr[-2000:]
    resumed = run_script("erl_trader.py", "--resume", tmp_path / "part")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (msgpack_restore((tmp_path / run / "checkpoint.msgpack").read_bytes())["runner"] for run in ("full", "part"))
    assert msgpack_serialize(a) == msgpack_serialize(b)  # population, learner, replay, RNG: bit for bit
    for seed in ("seed0", "seed1"):
        a, b = (msgpack_restore((tmp_path / run / seed / "best.msgpack").read_bytes())["params"] for run in ("full", "part"))
        assert msgpack_serialize(a) == msgpack_serialize(b), seed


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--pop-size", "many"], "--pop-size"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--data", "data/eurusd_1h.npz"], "daily"),
        (["--worst-k", "6"], "--worst-k"),
        (["--generations", "5", "--chunk-generations", "2"], "--chunk-generations"),
        (["--train-end", "someday"], "--train-end"),
        (["--eval-only", "--checkpoint", "data/README.md"], "data/README.md"),
        (["--eval-only", "--checkpoint", "runs/x/best.msgpack", "--cost-bps", "5"], "--cost-bps"),
        (["--resume", "runs/x", "--generations", "8"], "--generations"),
        (["--checkpoint", "runs/x/best.msgpack"], "--checkpoint"),
        (["--num-elites", "0"], "--num-elites"),
        (["--rl-updates", "-1"], "--rl-updates"),
        (["--settlement-days", "-1"], "--settlement-days"),
        (["--buffer-size", "100"], "--buffer-size"),
        (["--generations", "4", "--chunk-generations", "2", "--eval-every", "3"], "--eval-every"),
        (["--bidirectional"], "--bidirectional"),
        (["--lstm-layers", "2"], "--lstm-layers"),
        (["--attention-heads", "3"], "--attention-heads"),
        (["--stock-layers", "16", "0"], "--stock-layers"),
        (["--num-seeds", "0"], "--num-seeds"),
        (["--random-runs", "0"], "--random-runs"),
        (["--critic-warmup", "-1"], "--critic-warmup"),
        (["--critic-stock-embedding", "-1"], "--critic-stock-embedding"),
        (["--eval-only", "--checkpoint", "data"], "config.json"),
    ],
)
def test_bad_flags_and_data_give_one_line(argv, needle):
    r = run_script("erl_trader.py", *argv)
    assert_one_line_error(r, needle)


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    assert_divergence_stops_and_keeps_the_last_good_checkpoint(
        "erl_trader.py",
        TINY,
        tmp_path,
        {"critic_lr": 1e30, "actor_lr": 1e30},
        final_policy="seed0/final.msgpack",
        names="seed 0 (--seed 1)",
    )
