"""The GPU check (benchmarks/gpu_check.py) fits its 8-minute call and measures every size the README's GPU rows need.
Its steps run end to end at tiny sizes in `.ci/run` (`bash benchmarks/gpu.sh --dry-run`)."""

import os
import subprocess
import sys
from importlib.metadata import version

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_gpu_steps_fit_the_call_and_cover_the_gpu_sizes(tmp_path):
    listed = gpu_check.steps(False, tmp_path / "runs", tmp_path)
    assert sum(step.cap_s for step in listed) <= gpu_check.GPU_CAPS["total_s"] <= 8 * 60 - 30  # room for the wheel install
    commands = [" ".join(step.argv) for step in listed]
    for envs in (4096, 16384, 65536):
        assert any(c.startswith(f"ppo_trader.py --num-envs {envs} ") for c in commands), envs
    for flags in ("--phase 2 --init-from", "--action-space continuous", "--num-seeds 16"):
        assert any(flags in c for c in commands), flags
    for pop in (64, 256):
        assert any(c.startswith(f"erl_trader.py --pop-size {pop} ") for c in commands), pop
    assert any(c.startswith("erl_trader.py --pop-size 64 ") and "--num-seeds 16" in c for c in commands)
    assert any(c.startswith("benchmarks/run.py --no-peers") for c in commands)
    original = next(c for c in commands if "--run-name erl_original_architecture" in c)
    for flags in (
        "--window 151",
        "--bidirectional --lstm-layers 2",
        "--stock-layers 256 128 64",
        "--attention-heads 8",
        "--hidden 128",
        "--conv-channels 32",
        "--remat",
    ):
        assert flags in original, flags
    assert any("synthetic-daily --stocks 108" in c for c in commands)


def test_dry_run_runs_the_gpu_commands_at_tiny_sizes(tmp_path):
    """Step for step the dry run calls the same script with every flag of the GPU call, so a dry run that passes
    means the GPU call's flags parse (run.py, minutes on a CPU, is left out of the dry run)."""
    gpu = [s for s in gpu_check.steps(False, tmp_path / "runs", tmp_path) if s.argv[0] != "benchmarks/run.py"]
    dry = gpu_check.steps(True, tmp_path / "runs", tmp_path)
    assert len(gpu) == len(dry)
    flags = lambda step: {x for x in step.argv if x.startswith("--")}  # noqa: E731
    for big, tiny in zip(gpu, dry):
        assert big.argv[0] == tiny.argv[0] and flags(big) <= flags(tiny), (big.name, tiny.name)


def test_wheel_list_names_what_the_gpu_image_lacks():
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert r.returncode == 0, r.stderr
    for name in ("distrax", "tyro", "tensorboardX", "tfp-nightly", "dm-tree"):
        assert f"{name}=={version(name)}" in r.stdout, name
    assert "--python-version 3.12" in r.stdout and "-d .whl" in r.stdout
