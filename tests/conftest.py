"""Shared test helpers: the repository root on sys.path and a subprocess runner for the scripts."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Runs `python <args>` from the repository root; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
