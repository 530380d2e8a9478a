"""Throughput of both scripts on 1, 2 and 4 devices (fake CPU devices unless real ones are present).

    python benchmarks/device_scaling.py              # prints a markdown table
    python benchmarks/device_scaling.py --fake 0     # real devices (e.g. several GPUs), no XLA_FLAGS

Each run trains briefly into a temporary folder; the figure is the median env steps/s of the chunks after
the first (the first includes warm-up). Fake CPU devices share the machine's cores, so on CPU this
measures the overhead of the sharded program, not a speed-up.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ppo_trader.py": [
        "--num-envs",
        "256",
        "--num-steps",
        "64",
        "--chunk-updates",
        "5",
        "--total-timesteps",
        str(256 * 64 * 5 * 4),
        "--eval-every",
        "100",
    ],
    "erl_trader.py": ["--pop-size", "16", "--generations", "4", "--eval-every", "100", "--num-seeds", "1"],
}


def run(script: str, flags: list, devices: int, fake: bool, out: Path) -> tuple[float, float]:
    env = dict(os.environ)
    if fake:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    name = f"{Path(script).stem}_{devices}"
    r = subprocess.run(
        [sys.executable, script, *flags, "--devices", str(devices), "--out-dir", str(out), "--run-name", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"{script} on {devices} devices failed: {r.stderr[-2000:]}")
    compile_s = float(r.stdout.split("compile ")[1].split("s")[0])
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(x["sps"] for x in rows[1:]), compile_s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--fake", type=int, default=1, help="1: fake CPU devices via XLA_FLAGS; 0: the machine's real devices")
    a = p.parse_args()
    print("| script | flags | devices | env steps/s | vs 1 device | compile s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for script, flags in CONFIGS.items():
            base = None
            for d in a.devices:
                sps, comp = run(script, flags, d, bool(a.fake), Path(tmp))
                base = base or sps
                print(f"| {script} | `{' '.join(flags)}` | {d} | {sps:,.0f} | {sps / base:.2f}x | {comp:.0f} |", flush=True)


if __name__ == "__main__":
    main()
