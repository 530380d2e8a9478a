#!/usr/bin/env bash
# Prepares, on a machine that reaches PyPI, the wheels the GPU machine lacks, in .whl/ at the repository root (git
# ignores it; the device call carries it). The GPU image has jax (CUDA), flax, optax, chex, numpy, pandas and
# matplotlib; it lacks distrax, tyro, tensorboardX and the dependencies of theirs listed below. Versions are the ones
# installed here (the versions the test suite runs with), for CPython 3.12 on x86-64 Linux (the GPU image's Python).
#   bash benchmarks/gpu_wheels.sh            # download into .whl/
#   bash benchmarks/gpu_wheels.sh --dry-run  # print the pip command, download nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MISSING="distrax tfp-nightly dm-tree gast decorator tyro docstring-parser typeguard tensorboardX"
pins=$("$PYTHON" - $MISSING <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
except PackageNotFoundError as missing:
    sys.exit(f"gpu_wheels.sh: {missing} is not installed here. Fix: pip install -r requirements-dev.txt first")
PY
)
platforms=""
for n in 28 27 24 17; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
command="$PYTHON -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp$platforms \
--platform manylinux2014_x86_64 -d .whl $pins"
if [[ "${1:-}" == "--dry-run" ]]; then
    echo "$command"
    exit 0
fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
$command
ls .whl
