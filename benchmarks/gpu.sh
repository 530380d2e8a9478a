#!/usr/bin/env bash
# The GPU check, run on the GPU machine from a copy of the repository: where the machine lacks the trainers'
# packages, installs the wheels carried in .whl/ (made by benchmarks/gpu_wheels.sh), then measures every step of
# benchmarks/gpu_check.py, each under its own time cap, writing gpu-<device>.md/.json/.png (and run.py's tables)
# to $OUT (else benchmarks/results).
#   bash benchmarks/gpu.sh              # GPU sizes, at most 8 minutes
#   bash benchmarks/gpu.sh --dry-run    # tiny sizes on a CPU (the CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import distrax, tensorboardX, tyro" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import distrax, flax, optax, tensorboardX, tyro, jax; print('jax', jax.__version__, jax.devices())"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
