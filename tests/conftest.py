"""Shared test helpers: the repository root on sys.path and a subprocess runner for the scripts."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Runs `python <args>` from the repository root; returns the CompletedProcess (text mode)."""
    # a persistent compilation cache shared by the subprocesses: the same tiny configs compile once per machine
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / "jax_test_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **cache, **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
