"""Scores a change to the ERL learning-test recipe on validation returns only (never the test split).

Trains `tests/test_erl_learning.py`'s recipe, plus the given flags (a flag given again replaces the recipe's), with 3
run seeds in one program on a synthetic-daily data seed (of the test's universe, or `--universe` another of
`benchmarks/results.py`'s), then prints per evaluation each seed's champion and TD3
learner validation return as a share of the oracle's best validation return, and per seed the best of them (what
validation-based selection picks from). The README's "Learning on synthetic data" experiments come from it:

    python benchmarks/erl_validation_shares.py --data-seed 3 --out /tmp/erl_shares -- --generations 48
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import data_prep as dp  # noqa: E402
from results import UNIVERSES  # noqa: E402
from test_erl_learning import FLAGS, SEEDS, rule_returns  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-seed", type=int, required=True)
    with_signal = [universe for universe, (_, _, goal) in UNIVERSES["erl"].items() if goal is not None]
    parser.add_argument("--universe", choices=with_signal, default="all",
                        help="results.py's synthetic universe with a planted signal (all: the learning test's data)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the data file and the run")
    parser.add_argument("flags", nargs="*", help="erl_trader.py flags added to the recipe (after --)")
    options = parser.parse_args()
    if options.out.exists():
        sys.exit(f"error: --out {options.out} exists; name a new folder")
    options.out.mkdir(parents=True)
    data = options.out / "syn.npz"
    data_args = UNIVERSES["erl"][options.universe][0]
    assert dp.main([data_args[0], "--out", str(data), *data_args[1:], "--seed", str(options.data_seed)]) == 0
    started = time.time()
    command = [
        sys.executable,
        str(ROOT / "erl_trader.py"),
        "--data",
        str(data),
        *FLAGS,
        "--num-seeds",
        str(SEEDS),
        *options.flags,
        "--out-dir",
        str(options.out),
        "--run-name",
        "run",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    oracle = rule_returns(data, [*FLAGS, *options.flags])["oracle"]["val"]  # the best over the threshold x target grid
    best = np.full(SEEDS, -np.inf)
    for line in (options.out / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        seeds = row["seeds"]
        if "champion_val_return" in seeds[0]:
            champion, learner = (np.array([s[f"{who}_val_return"] for s in seeds]) / oracle for who in ("champion", "learner"))
            best = np.maximum(best, np.maximum(champion, learner))
            print(
                f"generation {row['generation']:3d}: champion {np.round(champion, 2).tolist()}, "
                f"learner {np.round(learner, 2).tolist()}"
            )
    print(
        f"{options.universe}, data seed {options.data_seed}, flags {options.flags}: oracle validation return "
        f"{oracle:+.3f}; best validation share per seed {np.round(best, 2).tolist()}, median {np.median(best):.2f}; "
        f"{wall:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
