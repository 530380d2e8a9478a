"""The GPU check: every GPU figure the README's performance table lacks, measured in one call of at most 8 minutes.

Each step runs a trainer (or `benchmarks/run.py --no-peers`) as its own process under its own time cap, so a slow
or failing step cannot eat the others' time; steps are listed in `steps()` (one line each). From each training run
it reads the compile time and the env steps/s of the chunks after the first from the progress lines, and the wall
time to the written report. It writes `gpu-<device>.md` (a table, the machine, the versions) and
`gpu-<device>.png` (training env steps/s against num-envs and pop-size) to `--out`.

    bash benchmarks/gpu.sh                    # on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu_check.py --dry-run  # the same steps at tiny sizes on a CPU (the CI checks this)
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILE = re.compile(r"compile ([0-9.]+)s")
SPS = re.compile(r"(?:SPS|env-steps/s) ([0-9,]+)")


@dataclass
class Step:
    """One measurement: a command (arguments after `python`), its time cap, and the axis value it stands for."""

    name: str
    argv: list
    cap_s: float
    group: str = ""  # curves of the plot: steps of one group share an x axis
    x: float = 0.0
    result: dict = field(default_factory=dict)


def ppo_flags(envs: int, steps_per_env: int, chunk_updates: int, chunks: int) -> list:
    """PPO sizes with a budget of `chunks` chunks (the first compiles and warms up, the rest are timed), validated once."""
    updates = chunk_updates * chunks
    return [
        "--num-envs",
        str(envs),
        "--num-steps",
        str(steps_per_env),
        "--chunk-updates",
        str(chunk_updates),
        "--eval-every",
        str(updates),
        "--total-timesteps",
        str(envs * steps_per_env * updates),
    ]


def erl_flags(pop: int, generations: int, sizes: dict) -> list:
    """ERL sizes with a budget of `generations` generations, validated at the end only."""
    flags = ["--pop-size", str(pop), "--generations", str(generations), "--eval-every", str(generations), "--num-seeds", "1"]
    return flags + [x for key, value in sizes.items() for x in ("--" + key.replace("_", "-"), str(value))]


GPU = dict(
    ppo_envs=(4096, 16384, 65536),
    ppo_steps=64,
    ppo_env_steps_per_chunk=4_194_304,
    seeds=16,
    erl_pops=(64, 256),
    erl_generations=12,
    erl_sizes=dict(episodes_per_agent=8, rl_updates=256, batch_size=512),
    # the original system's network (README, "The original architecture") on 108 stocks x 151 days, pop 16
    original_stocks=108,
    original_days=2520,
    original_sizes=dict(
        window=151,
        hidden=128,
        conv_channels=32,
        attention_heads=8,
        episodes_per_agent=2,
        worst_k=1,
        rl_updates=8,
        batch_size=64,
    ),
    original_stock_layers=("256", "128", "64"),
)
DRY_RUN = dict(
    ppo_envs=(8, 16, 32),
    ppo_steps=16,
    ppo_env_steps_per_chunk=256,
    seeds=2,
    erl_pops=(4, 8),
    erl_generations=4,
    erl_sizes=dict(
        episodes_per_agent=2,
        worst_k=1,
        num_elites=1,
        rl_updates=2,
        batch_size=16,
        buffer_size=4000,
        window=8,
        trading_days=6,
        settlement_days=2,
        hidden=8,
        conv_channels=4,
    ),
    ppo_extra=["--window", "8", "--episode-bars", "64", "--hidden", "32"],
    original_stocks=12,
    original_days=400,
    original_sizes=dict(
        window=8,
        hidden=8,
        conv_channels=4,
        attention_heads=2,
        episodes_per_agent=2,
        worst_k=1,
        rl_updates=2,
        batch_size=16,
        trading_days=6,
        settlement_days=2,
    ),
    original_stock_layers=("8", "4"),
)
ORIGINAL_NETWORK = ["--extractor", "lstm", "--bidirectional", "--lstm-layers", "2", "--layer-norm", "--remat"]
# time caps per step; the whole check also stops starting steps past total_s (7.5 minutes of steps on the GPU, leaving
# room for the wheel install in an 8-minute call). A CPU compiles the dry run's tiny programs slowly: long caps there.
GPU_CAPS = dict(run_py=75.0, training=36.0, data=15.0, total_s=450.0)
DRY_RUN_CAPS = dict(run_py=0.0, training=300.0, data=60.0, total_s=2400.0)


def steps(dry_run: bool, runs: Path, out: Path) -> list:
    """The GPU check's steps, at GPU sizes or (`dry_run`) tiny ones; run folders go under `runs`, run.py's tables to `out`."""
    size, caps = (DRY_RUN, DRY_RUN_CAPS) if dry_run else (GPU, GPU_CAPS)
    extra = size.get("ppo_extra", [])

    def ppo(name, envs, *flags, group="", x=0.0):
        chunk_updates = max(1, size["ppo_env_steps_per_chunk"] // (envs * size["ppo_steps"]))
        argv = [
            "ppo_trader.py",
            *ppo_flags(envs, size["ppo_steps"], chunk_updates, 4),
            *extra,
            *flags,
            "--out-dir",
            str(runs),
            "--run-name",
            name,
        ]
        return Step(name, argv, caps["training"], group, x)

    def erl(name, pop, *flags, group="", x=0.0):
        argv = [
            "erl_trader.py",
            *erl_flags(pop, size["erl_generations"], size["erl_sizes"]),
            *flags,
            "--out-dir",
            str(runs),
            "--run-name",
            name,
        ]
        return Step(name, argv, caps["training"], group, x)

    first = size["ppo_envs"][0]
    run_py = Step(
        "run.py --no-peers --quick", ["benchmarks/run.py", "--no-peers", "--quick", "--out", str(out)], caps["run_py"]
    )
    listed = [] if dry_run else [run_py]  # minutes on a CPU: the dry run leaves it out
    listed += [ppo(f"ppo_{envs}_envs", envs, group="ppo_trader training, num-envs", x=envs) for envs in size["ppo_envs"]]
    phase1 = runs / f"ppo_{first}_envs" / "seed0" / "best.msgpack"
    listed += [
        ppo(f"ppo_phase2_{first}_envs", first, "--phase", "2", "--init-from", str(phase1)),
        ppo(f"ppo_continuous_{first}_envs", first, "--action-space", "continuous"),
        ppo(f"ppo_{size['seeds']}_seeds_{first}_envs", first, "--num-seeds", str(size["seeds"])),
    ]
    listed += [erl(f"erl_pop_{pop}", pop, group="erl_trader training, pop-size", x=pop) for pop in size["erl_pops"]]
    listed += [
        erl(f"erl_{size['seeds']}_seeds_pop_{size['erl_pops'][0]}", size["erl_pops"][0], "--num-seeds", str(size["seeds"]))
    ]
    return listed + original_architecture_steps(size, caps, runs)


def original_architecture_steps(size: dict, caps: dict, runs: Path) -> list:
    """A synthetic universe of `original_stocks` stocks, then two generations of the original system's network on it."""
    data = runs / "synthetic_original.npz"
    make_data = Step(
        "synthetic_universe",
        [
            "data_prep.py",
            "synthetic-daily",
            "--stocks",
            str(size["original_stocks"]),
            "--days",
            str(size["original_days"]),
            "--out",
            str(data),
        ],
        caps["data"],
    )
    sizes = [x for key, value in size["original_sizes"].items() for x in ("--" + key.replace("_", "-"), str(value))]
    argv = [
        "erl_trader.py",
        "--data",
        str(data),
        "--train-end",
        "0.6",
        "--val-end",
        "0.8",
        "--pop-size",
        "16",
        "--num-seeds",
        "1",
        "--generations",
        "2",
        "--eval-every",
        "2",
        *ORIGINAL_NETWORK,
        "--stock-layers",
        *size["original_stock_layers"],
        *sizes,
        "--out-dir",
        str(runs),
        "--run-name",
        "erl_original_architecture",
    ]
    return [make_data, Step("erl_original_architecture", argv, caps["training"])]


def run_step(step: Step, seconds_left: float) -> None:
    """Runs one step under its cap (or the check's time left); keeps its compile time, env steps/s (chunks after the
    first) and wall time."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cap = min(step.cap_s, seconds_left)
    start = time.time()
    if cap <= 5:
        step.result = dict(status="skipped: the check's time was used up", wall_s=0.0, compile_s=None, sps=None, last_lines=[])
        print(f"{step.name}: {step.result['status']}", flush=True)
        return
    try:
        done = subprocess.run([sys.executable, *step.argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
        output, status = done.stdout + done.stderr, ("ok" if done.returncode == 0 else f"exit {done.returncode}")
    except subprocess.TimeoutExpired as stopped:
        text = lambda part: part.decode() if isinstance(part, bytes) else (part or "")  # noqa: E731 (bytes on a timeout)
        output = text(stopped.stdout) + text(stopped.stderr)
        status = f"stopped at its {cap:.0f} s cap"
    wall = time.time() - start
    compile_s = [float(x) for x in COMPILE.findall(output)]
    sps = [float(x.replace(",", "")) for x in SPS.findall(output)]
    timed = sps[1:] or sps  # the first chunk includes the warm-up
    step.result = dict(
        status=status,
        wall_s=wall,
        compile_s=compile_s[0] if compile_s else None,
        sps=sorted(timed)[len(timed) // 2] if timed else None,
        last_lines=output.strip().splitlines()[-3:],
    )
    print(f"{step.name}: {status}, wall {wall:.0f}s, compile {step.result['compile_s']}, SPS {step.result['sps']}", flush=True)


def device_description() -> tuple:
    """(file name slug, description) of the first JAX device, with the jax version."""
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device.platform}-{kind}".lower()).strip("-")
    return slug, f"{kind} ({device.platform}, {jax.device_count()} device(s)), jax {jax.__version__}, {platform.node()}"


def write_results(listed: list, out: Path, dry_run: bool, total_s: float) -> Path:
    """The markdown table and the scaling plot; returns the markdown file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slug, description = device_description()
    name = f"gpu-{slug}{'-dry-run' if dry_run else ''}"
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"# GPU check: {description}",
        "",
        f"`python benchmarks/gpu_check.py{' --dry-run' if dry_run else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{total_s:.0f} s in all. Env steps/s: median of the progress lines after the first chunk; wall: the whole "
        "command (compile, training, validation, test backtest, outputs).",
        "",
        "| step | status | compile (s) | env steps/s | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for step in listed:
        r = step.result
        cells = (step.name, r["status"], fmt(r["compile_s"], ".1f"), fmt(r["sps"], ",.0f"), f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Steps whose status is not ok, with their last lines:", ""]
    lines += [f"- {s.name}: " + " / ".join(s.result["last_lines"]) for s in listed if s.result["status"] != "ok"] or ["- none"]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps([dict(name=s.name, argv=s.argv, **s.result) for s in listed], indent=2))

    groups = sorted({s.group for s in listed if s.group})
    figure, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for axis, group in zip(axes[0], groups):
        points = [(s.x, s.result["sps"]) for s in listed if s.group == group and s.result["sps"]]
        if points:
            axis.plot(*zip(*points), marker="o")
        axis.set(xscale="log", yscale="log", xlabel=group.split(", ")[1], ylabel="env steps/s", title=group)
        sizes = [s.x for s in listed if s.group == group]
        axis.set_xticks(sizes, [f"{x:,.0f}" for x in sizes])
        axis.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    figure.suptitle(description, fontsize=8)
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=100)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes and short caps (a CPU check of every step)")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
        help="folder for gpu-<device>.md/.json/.png and the runs (default: $OUT, else benchmarks/results)",
    )
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as runs:  # the runs' folders stay out of --out (only the results come back)
        listed = steps(cli.dry_run, Path(runs) / "runs", out)
        for step in listed:
            run_step(step, (DRY_RUN_CAPS if cli.dry_run else GPU_CAPS)["total_s"] - (time.time() - start))
    path = write_results(listed, out, cli.dry_run, time.time() - start)
    print(path.read_text())
    return 0 if all(s.result["status"] == "ok" for s in listed) else 1


if __name__ == "__main__":
    sys.exit(main())
