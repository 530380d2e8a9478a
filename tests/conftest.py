"""Shared test helpers: the repository root on sys.path and a subprocess runner for the scripts."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def script_env(env=None) -> dict:
    """The environment of the scripts' subprocesses: CPU, a shared compilation cache, plus `env`."""
    # a persistent compilation cache shared by the subprocesses: the same tiny configs compile once per machine
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / "jax_test_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return dict(os.environ, JAX_PLATFORMS="cpu", **cache, **(env or {}))


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Runs `python <args>` from the repository root; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout)


RUN_OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.msgpack", "best.msgpack", "final.msgpack", "report.json", "trades.csv", "equity.png")


def tiny_run_dir(tmp_path_factory, script: str, flags: list) -> tuple:
    """Runs `script` with tiny flags into a fresh folder; returns (run folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("runs")
    r = run_script(script, *flags, "--out-dir", out, "--run-name", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny", r


def assert_run_outputs(run_dir: Path) -> list:
    """Every file a training run writes is there; returns the metrics.jsonl rows."""
    import json

    names = {p.name for p in run_dir.iterdir()}
    for f in RUN_OUTPUTS:
        assert f in names, f
    assert any(n.startswith("events.out.tfevents") for n in names)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(r, needle: str) -> None:
    """Exit status 2 and a single stderr line that names `needle` and says how to fix it."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Fix:" in lines[0], r.stderr
