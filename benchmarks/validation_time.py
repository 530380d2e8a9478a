"""Seconds per validation backtest of ppo_trader.py (a fresh policy, after the first call has compiled).

python benchmarks/validation_time.py data/spy_1min.npz [REPO]   # REPO: a checkout of another version to compare
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[1])))
import ppo_trader as pt  # noqa: E402

args = pt.Args(data=sys.argv[1], window=8)
datasets, info = pt.load_data(args)
env_params = pt.env_params_from_args(args)
network = pt.make_network(args)
obs_dim = pt.obs_size(args.window, datasets["train"].features.shape[-1], args.phase)
params, norm = network.init(jax.random.PRNGKey(0), jnp.zeros(obs_dim)), pt.ObsNorm.create(obs_dim)
backtest = pt.make_backtest(env_params, datasets["val"])
try:  # this version's signature, then the one before the backtest played every market in one call
    validate = lambda: pt.validation_return(args, network, params, norm, env_params, backtest)  # noqa: E731
    validate()
except TypeError:
    validate = lambda: pt.validation_return(args, network, params, norm, datasets, info, env_params, backtest)  # noqa: E731
    validate()
started = time.time()
for _ in range(3):
    validate()
print(f"{sys.argv[1]}: {(time.time() - started) / 3:.2f} s per validation")
