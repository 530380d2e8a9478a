"""Regenerates the README's learning tables: each trainer's learning-test recipe over data seeds x run seeds, per
synthetic universe, as shares of the oracle's test return (median, min, max), with the wall-clock of each run.

    python benchmarks/results.py --trainer ppo                         # PPO: planted signal, data seeds 2 3 4
    python benchmarks/results.py --trainer erl --universes all partial # ERL: two universes
    python benchmarks/results.py --trainer ppo --data-seeds 0 --num-seeds 3   # the learning test's own run

Every run is the trainer script itself (`python ppo_trader.py ...` / `python erl_trader.py ...`) with the learning
test's flags and `--seed 1 --num-seeds N` (seeds 1..N in one program); the shares and the oracles are computed as
the learning tests compute them (tests/test_ppo_learning.py, tests/test_erl_learning.py). The default data seeds
(2, 3, 4) are ones the tests' recipes were not chosen on. Writes benchmarks/results/learning-<trainer>-<device>.md.
The other tables: benchmarks/run.py (speed against the peers), benchmarks/time_to_result.py (time to a result).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import data_prep as dp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# per trainer and universe: (data_prep arguments without --out/--seed, the trainer's flags without --data, the
# share the learning issue asks of the median)
PPO_DATA = ["synthetic-intraday", "--days", "60", "--signal-strength", "2"]
PPO_FLAGS = ["--window", "8", "--total-timesteps", "2000000"]
UNIVERSES = {
    "ppo": {
        "planted": (PPO_DATA, PPO_FLAGS, 0.8),
        "continuous": (PPO_DATA, [*PPO_FLAGS, "--action-space", "continuous", "--max-contracts", "1"], 0.8),
        "none": (["synthetic-intraday", "--days", "60", "--signal-strength", "0"], PPO_FLAGS, None),
    },
    "erl": {
        "all": (["synthetic-daily", "--stocks", "10", "--signal-stocks", "10", "--signal-halflife", "2",
                 "--signal-strength", "4", "--days", "2000"], None, 0.7),
        "partial": (["synthetic-daily", "--stocks", "20", "--signal-stocks", "5", "--signal-halflife", "2",
                     "--signal-strength", "4", "--days", "2000"], None, 0.7),
        "halflife": (["synthetic-daily", "--stocks", "10", "--signal-stocks", "10", "--signal-halflife", "5",
                      "--signal-strength", "4", "--days", "2000"], None, 0.7),
        "none": (["synthetic-daily", "--stocks", "10", "--signal-stocks", "10", "--signal-strength", "0",
                  "--days", "2000"], None, None),
    },
}


def erl_flags() -> list:
    """The ERL learning test's flags without its --seed (set here)."""
    from test_erl_learning import FLAGS

    flags = list(FLAGS)
    del flags[flags.index("--seed"): flags.index("--seed") + 2]
    return flags


def run_trainer(script: str, data: Path, flags: list, num_seeds: int, out: Path) -> tuple[dict, float]:
    """One run of the trainer script; returns (its report.json, wall-clock seconds)."""
    started = time.time()
    command = [sys.executable, script, "--data", str(data), *flags, "--seed", "1", "--num-seeds", str(num_seeds),
               "--out-dir", str(out), "--run-name", "run"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "run" / "report.json").read_text()), time.time() - started


def ppo_oracle(data: Path, window: int) -> float:
    """The PPO learning test's oracle: the signal-threshold rule, its threshold chosen on validation; its test P&L."""
    import ppo_trader as pt
    from test_ppo_learning import oracle_policy, split_return

    args = pt.Args(data=str(data), window=window)
    datasets, _ = pt.load_data(args)
    env_params = pt.env_params_from_args(args)
    num_features = datasets["train"].features.shape[-1]
    val_bt, test_bt = pt.make_backtest(env_params, datasets["val"]), pt.make_backtest(env_params, datasets["test"])
    oracles = {th: oracle_policy(th, args.window, num_features) for th in (0.0, 0.25, 0.5, 1.0, 1.5)}
    best = max(oracles, key=lambda th: split_return(val_bt, oracles[th]))
    return split_return(test_bt, oracles[best])


def ppo_row(report: dict, data: Path, flags: list) -> dict:
    """Per seed test P&L of the greedy policy and of random, the oracle's, and the verdict."""
    initial = report["initial_balance"]
    seeds = [row["SYN"] for row in report["seeds"]]
    return dict(trained=[row["policy"]["total_return"] * initial for row in seeds],
                random=[row["random"]["total_return"] * initial for row in seeds],
                oracle=ppo_oracle(data, int(flags[flags.index("--window") + 1])), verdict=report["verdict"]["SYN"])


def erl_row(report: dict, data: Path, flags: list) -> dict:
    """Per seed test return of the champion, of the TD3 learner and of random, the oracle's, and the verdict."""
    from test_erl_learning import rule_returns

    rows = report["seeds"]
    return dict(trained=[row["champion"]["total_return"] for row in rows],
                learner=[row["td3_learner"]["total_return"] for row in rows],
                random=[row["random"]["total_return"] for row in rows],
                oracle=rule_returns(data, flags)["oracle"]["test"], verdict=report["verdict"])


def shares_text(values, oracle: float) -> str:
    shares = np.asarray(values) / oracle
    return (f"{np.median(shares):.2f} [{shares.min():.2f}..{shares.max():.2f}] "
            f"({' / '.join(f'{s:.2f}' for s in shares)})")


def learning_table(trainer: str, universes: list, data_seeds: list, num_seeds: int) -> list:
    """Runs every (universe, data seed); returns the markdown lines."""
    script = "ppo_trader.py" if trainer == "ppo" else "erl_trader.py"
    trained_name = "greedy policy" if trainer == "ppo" else "champion"
    md = []
    for universe in universes:
        data_args, flags, goal = UNIVERSES[trainer][universe]
        flags = flags if flags is not None else erl_flags()
        md += [f"### {trainer} / {universe}: `{' '.join(data_args)}`, flags `{' '.join(flags)}`", "",
               f"| data seed | oracle test | {trained_name} share: median [min..max] (per seed) | "
               + ("TD3 learner share | " if trainer == "erl" else "") + "random share | wall-clock | verdict |",
               "|---|---|---|" + ("---|" if trainer == "erl" else "") + "---|---|---|"]
        all_shares = []
        for data_seed in data_seeds:
            with tempfile.TemporaryDirectory() as workdir:
                data = Path(workdir) / "data.npz"
                assert dp.main([data_args[0], "--out", str(data), *data_args[1:], "--seed", str(data_seed)]) == 0
                report, seconds = run_trainer(script, data, flags, num_seeds, Path(workdir))
                row = (ppo_row if trainer == "ppo" else erl_row)(report, data, flags)
            oracle = row["oracle"]
            if goal is None:  # no signal: the oracle has nothing to find; the returns and the verdict are the table
                cells = [f"{oracle:+.4g}", " / ".join(f"{v:+.4g}" for v in row["trained"])]
                cells += [" / ".join(f"{v:+.4g}" for v in row["learner"])] if trainer == "erl" else []
                cells += [" / ".join(f"{v:+.4g}" for v in row["random"])]
            else:
                all_shares += list(np.asarray(row["trained"]) / oracle)
                cells = [f"{oracle:+.4g}", shares_text(row["trained"], oracle)]
                cells += [shares_text(row["learner"], oracle)] if trainer == "erl" else []
                cells += [shares_text(row["random"], oracle)]
            md.append(f"| {data_seed} | " + " | ".join(cells) + f" | {seconds:,.0f} s | {row['verdict']} |")
            print(md[-1], flush=True)
        if all_shares:
            shares = np.asarray(all_shares)
            md += ["", f"Over {len(data_seeds)} data seeds x {num_seeds} run seeds: median {np.median(shares):.2f} "
                   f"[{shares.min():.2f}..{shares.max():.2f}] of the oracle (goal: median >= {goal:.0%}; "
                   f"{'met' if np.median(shares) >= goal else 'not met'})."]
        md.append("")
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trainer", choices=("ppo", "erl"), required=True)
    ap.add_argument("--universes", nargs="+", default=None, help="default: every universe of the trainer")
    ap.add_argument("--data-seeds", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--num-seeds", type=int, default=4, help="run seeds 1..N, in one program per data seed")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/learning-<trainer>-<device>.md)")
    cli = ap.parse_args()
    universes = cli.universes or list(UNIVERSES[cli.trainer])
    unknown = [u for u in universes if u not in UNIVERSES[cli.trainer]]
    if unknown:
        ap.error(f"--universes: unknown {unknown} for {cli.trainer}; choose from {list(UNIVERSES[cli.trainer])}")
    from run import device_name

    slug, desc = device_name()
    started = time.time()
    md = learning_table(cli.trainer, universes, cli.data_seeds, cli.num_seeds)
    command = "python benchmarks/results.py " + " ".join(sys.argv[1:])
    header = [f"# Learning over data seeds x run seeds ({cli.trainer}): {desc}", "",
              f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}, {(time.time() - started) / 60:.0f} min.", ""]
    out = Path(cli.out or RESULTS / f"learning-{cli.trainer}-{slug}.md")
    out.write_text("\n".join(header + md) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
