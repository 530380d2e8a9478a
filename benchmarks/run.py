"""Side-by-side throughput of ppo_trader.py / erl_trader.py against the tools people use today, in one process.

    python benchmarks/run.py --quick          # a few minutes on a 2-core CPU
    python benchmarks/run.py                  # more repeats, more scaling points
    python benchmarks/run.py --no-peers       # JAX figures only (a machine without the peer packages)

Writes benchmarks/results/<device>.md and benchmarks/results/<device>.png. Every figure is the median of
several timed repeats after a warm-up call; compilation is timed separately. The peers (gym-anytrading,
gymnasium, stable-baselines3 with torch on the CPU, FinRL's StockTradingEnv) run in the same process on the
same data: see benchmarks/README.md for their installation (a separate virtual environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import erl_trader as et  # noqa: E402
import ppo_trader as pt  # noqa: E402
import time_to_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- HELPERS ----
def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` (which must block until its work is done) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_timed(fn, *args):
    """(compiled, seconds): lowering and XLA compilation of a jitted function, timed apart from running it."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def device_name() -> tuple[str, str]:
    """(file-name slug, description) of the default JAX device."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        model = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        cores = os.cpu_count()
        desc = f"CPU: {model}, {cores} cores"
        slug = f"cpu-{cores}core"
    else:
        desc = f"{d.platform.upper()}: {d.device_kind} (x{jax.device_count()})"
        slug = f"{d.platform}-{d.device_kind}"
    return re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-"), desc


def jaxpr_flops(jaxpr) -> tuple[float, float]:
    """(matmul FLOPs, other FLOPs) of a jaxpr with every scan multiplied out by its length.

    XLA's cost analysis counts a loop body once whatever its trip count (our train chunks are nested
    lax.scans), so the count is taken from the jaxpr: 2*M*N*K per dot_general, 1 per output element of
    the other float ops; cond takes its costliest branch. `check_flops` compares it with XLA's cost analysis
    on a configuration whose loops all run once."""
    mm, other = 0.0, 0.0
    for eqn in _dce(jaxpr).eqns:
        name = eqn.primitive.name
        subs = []
        for v in eqn.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(x, "eqns"):
                    subs.append(x)
                elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                    subs.append(x.jaxpr)
        if name == "scan":
            a, b = jaxpr_flops(eqn.params["jaxpr"].jaxpr)
            mm, other = mm + eqn.params["length"] * a, other + eqn.params["length"] * b
        elif name == "cond":
            costs = [jaxpr_flops(br.jaxpr) for br in eqn.params["branches"]]
            a, b = max(costs, key=sum)
            mm, other = mm + a, other + b
        elif subs:
            for s in subs:
                a, b = jaxpr_flops(s)
                mm, other = mm + a, other + b
        elif name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in lc)
            mm += 2.0 * k * math.prod(eqn.outvars[0].aval.shape)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # OIW... with the default dimension numbers
            mm += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[1:])
        else:
            for o in eqn.outvars:
                if hasattr(o.aval, "dtype") and jnp.issubdtype(o.aval.dtype, jnp.floating):
                    other += float(math.prod(o.aval.shape))
    return mm, other


def _dce(jaxpr):
    """The jaxpr without the equations whose outputs are unused (XLA removes them too, e.g. the policy head when only a
    value is needed)."""
    try:
        from jax._src.interpreters import partial_eval as pe

        return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]
    except Exception:  # a private API: count without DCE if it moves
        return jaxpr


def xla_memory(compiled) -> int:
    """Peak bytes XLA plans for one call: arguments + outputs + temporaries - aliased (donated) buffers."""
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def peak_matmul_flops(repeats: int) -> tuple[float, int]:
    """Measured peak float32 matrix-multiply FLOP/s of the default device (square matmuls, best size)."""
    best, best_n = 0.0, 0
    sizes = (512, 1024, 2048) if jax.devices()[0].platform == "cpu" else (4096, 8192, 16384)
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        reps = 8
        f = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, x: (x @ a) * (1.0 / n), a))
        dt = median_time(lambda: f(a).block_until_ready(), repeats)
        rate = 2.0 * n**3 * reps / dt
        if rate > best:
            best, best_n = rate, n
    return best, best_n


# ---- PPO_TRADER ENV ----
def ppo_setup(**overrides):
    args = dataclasses.replace(pt.Args(data="data/eurusd_1h.npz"), **overrides)  # the data the peers play
    datasets, info = pt.load_data(args)
    return args, pt.env_params_from_args(args), datasets, info


def ppo_env_rollout(env_params, data, n: int, steps: int):
    """Jitted: `steps` vmapped env steps of n envs with uniform random legal actions (auto-reset included)."""

    def run(key):
        k0, key = jax.random.split(key)
        obs, state = jax.vmap(pt.reset, in_axes=(0, None, None))(jax.random.split(k0, n), env_params, data)

        def body(carry, _):
            state, key = carry
            key, k_a, k_s = jax.random.split(key, 3)
            mask = jax.vmap(pt.legal_mask, in_axes=(0, None, None))(state, env_params, data)
            # uniform over the legal actions: the k-th legal one, k uniform below the number of legal actions
            k = (jax.random.uniform(k_a, (n,)) * mask.sum(-1)).astype(jnp.int32)
            action = jnp.argmax(jnp.cumsum(mask, -1) > k[:, None], -1)
            obs, state, reward, _, _, _ = jax.vmap(pt.step, in_axes=(0, 0, 0, None, None))(
                jax.random.split(k_s, n), state, action, env_params, data
            )
            return (state, key), obs.sum() + reward.sum()  # sums keep every observation element live

        _, out = jax.lax.scan(body, (state, key), None, steps)
        return out.sum()

    return jax.jit(run)


# ---- ERL_TRADER ENV ----
def erl_setup(**overrides):
    args = dataclasses.replace(et.Args(), **overrides)
    datasets, info = et.load_data(args)
    return args, et.env_params_from_args(args), datasets, info


def erl_env_rollout(env_params, data, n_inv: int, n: int, steps: int):
    """Jitted: `steps` env steps of n accounts (vmap), uniform random actions, the actor's observation
    window built every step, a new random start when an episode ends."""

    def run(key):
        k0, key = jax.random.split(key)
        starts = jax.vmap(et.sample_start, in_axes=(0, None, None))(jax.random.split(k0, n), env_params, data)
        state = jax.vmap(et.reset_at, in_axes=(0, None))(starts, env_params)

        def body(carry, _):
            state, key = carry
            key, k_a, k_s = jax.random.split(key, 3)
            obs = jax.vmap(et.get_obs, in_axes=(0, None, None))(state.t, env_params, data)
            coef, target = jax.vmap(et.scale_action, in_axes=(0, None))(jax.random.uniform(k_a, (n, n_inv, 2)), env_params)
            nxt, reward, done, _ = jax.vmap(et.step, in_axes=(0, 0, 0, None, None))(state, coef, target, env_params, data)
            new = jax.vmap(et.reset_at, in_axes=(0, None))(
                jax.vmap(et.sample_start, in_axes=(0, None, None))(jax.random.split(k_s, n), env_params, data), env_params
            )
            state = jax.tree.map(lambda a, b: jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b), new, nxt)
            return (state, key), obs.sum() + reward.sum()

        _, out = jax.lax.scan(body, (state, key), None, steps)
        return out.sum()

    return jax.jit(run)


# ---- PEERS ----
def load_peers():
    """Imports the peer packages; a one-line error (exit 2) naming the install command when one is missing."""
    try:
        import gym_anytrading  # noqa: F401
        import gymnasium
        import stable_baselines3
        import torch
    except ImportError as e:
        print(
            f"benchmarks/run.py: error: peer package missing ({e.name}). Fix: install benchmarks/requirements.txt as "
            "benchmarks/README.md says, "
            "or pass --no-peers",
            file=sys.stderr,
        )
        sys.exit(2)
    spec = importlib.util.find_spec("finrl")
    if spec is None or not spec.submodule_search_locations:
        print(
            "benchmarks/run.py: error: FinRL is not installed. Fix: pip install --no-deps finrl==0.3.7 (see "
            "benchmarks/README.md), or pass --no-peers",
            file=sys.stderr,
        )
        sys.exit(2)
    # FinRL's package __init__ pulls in broker and data-source dependencies: load the env module file alone
    path = Path(list(spec.submodule_search_locations)[0]) / "meta" / "env_stock_trading" / "env_stocktrading.py"
    mod_spec = importlib.util.spec_from_file_location("finrl_env_stocktrading", path)
    finrl_env = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(finrl_env)
    return dict(
        gymnasium=gymnasium,
        sb3=stable_baselines3,
        torch=torch,
        finrl_env=finrl_env,
        versions=dict(
            gymnasium=gymnasium.__version__,
            stable_baselines3=stable_baselines3.__version__,
            torch=torch.__version__,
            gym_anytrading=_version("gym-anytrading"),
            finrl=_version("finrl"),
        ),
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def fastest_threads(torch, probe) -> int:
    """Sets torch's intra-op threads to whichever of 1 and all cores runs `probe()` faster here: on a shared
    machine torch's OpenMP threads can be many times slower than one thread, and the peers get their best."""
    best, best_t = None, float("inf")
    for n in sorted({1, os.cpu_count()}):
        torch.set_num_threads(n)
        t = time.perf_counter()
        probe()
        if time.perf_counter() - t < best_t:
            best, best_t = n, time.perf_counter() - t
    torch.set_num_threads(best)
    return best


def forex_df(path: str):
    """gym-anytrading's input: a DataFrame with a Close column, from the same EURUSD bars ppo_trader trains on."""
    import pandas as pd

    with np.load(ROOT / path) as z:
        n = int(z["length"][0])
        return pd.DataFrame({"Close": z["close"][0][:n].astype(np.float64)})


FOREX_ID = "gym_anytrading:forex-v0"  # the module prefix registers the env in spawned vector-env workers too


def make_forex(peers, df, window: int):
    """gym.make('forex-v0') on our EURUSD data (the registered env and its wrappers, as users get it)."""
    import gym_anytrading  # noqa: F401  (registers forex-v0)

    return peers["gymnasium"].make(FOREX_ID, df=df, window_size=window, frame_bound=(window, len(df)))


def python_loop_sps(env, n_steps: int, repeats: int, sample) -> float:
    """Steps/s of a gymnasium env stepped in a Python loop with `sample()` actions (reset at episode ends)."""
    env.reset(seed=0)

    def run():
        for _ in range(n_steps):
            _, _, term, trunc, _ = env.step(sample())
            if np.any(term) or np.any(trunc):
                env.reset()

    return n_steps / median_time(run, repeats)


def vector_sps(vec, n_steps: int, repeats: int) -> float:
    """Env steps/s of a gymnasium vector env (auto-reset inside) with random actions."""
    vec.reset(seed=0)
    vec.action_space.seed(0)

    def run():
        for _ in range(n_steps):
            vec.step(vec.action_space.sample())

    return n_steps * vec.num_envs / median_time(run, repeats)


def finrl_frame(erl_args, split: str = "train"):
    """FinRL's input on erl_trader's universe and training split: one row per (day, stock) with the close and
    the same 8 features as technical indicators, indexed by day number (FinRL's convention)."""
    import pandas as pd

    with np.load(ROOT / erl_args.data) as z:
        raw = {k: z[k] for k in ("dates", "tickers", "investable", "close", "features", "feature_names")}
    lo, hi = {"train": (0, et.split_point(erl_args.train_end, raw["dates"], "--train-end"))}[split]
    inv = np.flatnonzero(raw["investable"])
    T, N = hi - lo, len(inv)
    names = [str(x) for x in raw["feature_names"]]
    df = pd.DataFrame(
        {
            "date": np.repeat(raw["dates"][lo:hi].astype("datetime64[D]").astype(str), N),
            "tic": np.tile(raw["tickers"][inv], T),
            "close": raw["close"][lo:hi][:, inv].reshape(-1).astype(np.float64),
        }
    )
    for i, name in enumerate(names):
        df[name] = raw["features"][lo:hi][:, inv, i].reshape(-1).astype(np.float64)
    df.index = np.repeat(np.arange(T), N)
    return df, N, names


def make_finrl(peers, df, n: int, names: list):
    """FinRL's StockTradingEnv with its tutorial settings (hmax 100, $1M, 0.1% costs each way, reward scaling 1e-4)."""
    return peers["finrl_env"].StockTradingEnv(
        df=df,
        stock_dim=n,
        hmax=100,
        initial_amount=1_000_000,
        num_stock_shares=[0] * n,
        buy_cost_pct=[0.001] * n,
        sell_cost_pct=[0.001] * n,
        reward_scaling=1e-4,
        state_space=1 + 2 * n + len(names) * n,
        action_space=n,
        tech_indicator_list=names,
        print_verbosity=10**9,
    )


def ref_gym_env(peers, args, env_params, data, info):
    """tests/ppo_reference.py's NumPy env (the same rules as ppo_trader's) as a gymnasium env on market 0's
    training split: random session starts, `episode_bars` truncation, illegal actions played as HOLD."""
    import ppo_reference as ref

    gym = peers["gymnasium"]
    m = 0
    d = {
        k: np.asarray(getattr(data, k)[m], np.float64)
        for k in ("open", "high", "low", "close", "atr", "hours_to_close", "features")
    }
    d.update(
        rth=np.asarray(data.rth[m]),
        session_end=np.asarray(data.session_end[m]),
        bars_to_close=np.asarray(data.bars_to_close[m]),
    )
    spec = dict(
        point_value=float(data.point_value[m]), tick_size=float(data.tick_size[m]), commission=float(data.commission[m])
    )
    params = dict(
        window=args.window,
        contracts=args.contracts,
        sl_atr_mult=args.sl_atr_mult,
        tp_atr_mult=args.tp_atr_mult,
        slippage_ticks=args.slippage_ticks,
        initial_balance=args.initial_balance,
        dd_limit=args.dd_limit,
        dd_lock_offset=args.dd_lock_offset,
        breach_penalty=args.breach_penalty,
        episode_bars=args.episode_bars,
        no_entry_bars=args.no_entry_bars,
        flatten_at_close=args.flatten_at_close,
    )
    starts = np.asarray(data.starts[m][: int(data.n_starts[m])])
    end = int(data.hi[m])
    obs_dim = args.window * d["features"].shape[1] + pt.NUM_POSITION_FEATURES

    class RefTradingEnv(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        action_space = gym.spaces.Discrete(pt.NUM_ACTIONS)

        def __init__(self):
            self.env = ref.RefEnv(d, spec, params, end)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.env.reset(int(self.np_random.choice(starts))).astype(np.float32), {}

        def step(self, action):
            obs, reward, term, trunc, _ = self.env.step(int(action))
            return obs.astype(np.float32), reward, term, trunc, {}

    return RefTradingEnv


# ---- TRAINING THROUGHPUT ----
def ppo_train_sps(repeats: int, chunk_updates: int, **overrides) -> dict:
    """ppo_trader's compiled train chunk (as the script runs it: jit(vmap(train_chunk)) over 1 seed)."""
    args, env_params, datasets, _ = ppo_setup(chunk_updates=chunk_updates, **overrides)
    init, train_chunk, _, _ = pt.make_train(args, env_params, datasets["train"])
    runner = jax.tree.map(lambda x: x[None], jax.jit(init)(jax.random.PRNGKey(args.seed)))
    compiled, compile_s = compile_timed(jax.jit(jax.vmap(train_chunk)), runner)
    state = {"runner": runner}

    def run():
        state["runner"], metrics = compiled(state["runner"])
        block(metrics)

    dt = median_time(run, repeats)
    steps = chunk_updates * args.num_envs * args.num_steps
    mm, other = jaxpr_flops(jax.make_jaxpr(jax.vmap(train_chunk))(runner).jaxpr)
    return dict(
        sps=steps / dt,
        compile_s=compile_s,
        memory=xla_memory(compiled),
        chunk_s=dt,
        mm_flops=mm,
        other_flops=other,
        steps=steps,
    )


def erl_train_sps(repeats: int, **overrides) -> dict:
    """erl_trader's compiled chunk of generations (env steps of the population, learner and exploration per second)."""
    args, env_params, datasets, info = erl_setup(**overrides)
    inv = tuple(info["inv"])
    init, chunk, *_ = et.make_erl(args, env_params, datasets["train"], len(inv), inv)
    runner = init(jax.random.PRNGKey(args.seed))
    data = datasets["train"]
    compiled, compile_s = compile_timed(jax.jit(chunk), runner, data)
    state = {"runner": runner}

    def run():
        state["runner"], metrics = compiled(state["runner"], data)
        block(metrics)

    dt = median_time(run, repeats)
    steps = (args.pop_size + 2) * args.episodes_per_agent * (args.trading_days + args.settlement_days) * args.chunk_generations
    mm, other = jaxpr_flops(jax.make_jaxpr(chunk)(runner, data).jaxpr)
    return dict(
        sps=steps / dt,
        compile_s=compile_s,
        memory=xla_memory(compiled),
        chunk_s=dt,
        mm_flops=mm,
        other_flops=other,
        steps=steps,
    )


def check_flops() -> dict:
    """The jaxpr FLOP count against XLA's cost analysis on a ppo_trader chunk whose every loop runs once."""
    args, env_params, datasets, _ = ppo_setup(num_envs=64, num_steps=1, num_minibatches=1, update_epochs=1, chunk_updates=1)
    init, train_chunk, _, _ = pt.make_train(args, env_params, datasets["train"])
    runner = jax.jit(init)(jax.random.PRNGKey(0))
    cost = jax.jit(train_chunk).lower(runner).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mm, other = jaxpr_flops(jax.make_jaxpr(train_chunk)(runner).jaxpr)
    return dict(xla=float(cost.get("flops", float("nan"))), jaxpr=mm + other, jaxpr_mm=mm)


# ---- REPORT ----
def fmt(x: float) -> str:
    if x != x:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:,.1f}"
    return f"{x:.3g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and scaling points (a few minutes on a 2-core CPU)")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer libraries (JAX figures only)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for <device>.md and <device>.png")
    cli = ap.parse_args()
    os.chdir(ROOT)
    quick = cli.quick
    R = 3 if quick else 7  # timed repeats per figure
    slug, desc = device_name()
    load0 = os.getloadavg()
    t_start = time.time()
    peers = None if cli.no_peers else load_peers()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    rows_env, rows_train, rows_scale, rows_mem, notes = [], [], [], [], []
    curves = {}

    # 1. ENV STEPS/S: ppo_trader env vmapped vs gym-anytrading forex-v0
    p_args, p_env, p_data, p_info = ppo_setup()
    ppo_env = {}
    for n in (1, 64, 1024, 4096, 16384):
        steps = max(16, min(2048, 262_144 // n)) if quick else max(32, min(4096, 1_048_576 // n))
        compiled, cs = compile_timed(ppo_env_rollout(p_env, p_data["train"], n, steps), jax.random.PRNGKey(0))
        dt = median_time(lambda: compiled(jax.random.PRNGKey(1)).block_until_ready(), R)
        ppo_env[n] = n * steps / dt
        log(f"ppo env {n:6d} envs: {ppo_env[n]:,.0f} steps/s (compile {cs:.1f}s)")
        rows_env.append(("ppo_trader env (JAX, vmap)", f"{n} envs", ppo_env[n], cs))
    curves["ppo_env"] = ppo_env
    peer_env = {}
    if peers:
        df = forex_df(p_args.data)
        env = make_forex(peers, df, p_args.window)
        peer_env["anytrading"] = python_loop_sps(env, 5_000 if quick else 20_000, R, env.action_space.sample)
        log(f"gym-anytrading forex-v0, Python loop: {peer_env['anytrading']:,.0f} steps/s")
        rows_env.append(("gym-anytrading forex-v0, Python loop", "1 env", peer_env["anytrading"], float("nan")))
        gym = peers["gymnasium"]
        for mode, n in (("sync", 8), ("async", os.cpu_count())):
            kw = {"vector_kwargs": {"context": "spawn"}} if mode == "async" else {}  # no fork of a multithreaded (JAX) process
            vec = gym.make_vec(
                FOREX_ID,
                num_envs=n,
                vectorization_mode=mode,
                df=df,
                window_size=p_args.window,
                frame_bound=(p_args.window, len(df)),
                **kw,
            )
            peer_env[f"anytrading_{mode}"] = vector_sps(vec, 1_000 if quick else 4_000, R)
            vec.close()
            log(f"gym-anytrading forex-v0, gymnasium {mode} vector env x{n}: {peer_env[f'anytrading_{mode}']:,.0f} steps/s")
            rows_env.append(
                (
                    f"gym-anytrading forex-v0, gymnasium {mode.capitalize()}VectorEnv",
                    f"{n} envs",
                    peer_env[f"anytrading_{mode}"],
                    float("nan"),
                )
            )

    # 1b. erl_trader env vs FinRL StockTradingEnv, same 20 stocks
    e_args, e_env, e_data, e_info = erl_setup()
    n_inv = len(e_info["inv"])
    erl_env = {}
    for n in (1, 16, 64, 256, 1024):
        steps = max(16, min(1024, 32_768 // n)) if quick else max(32, min(2048, 131_072 // n))
        compiled, cs = compile_timed(erl_env_rollout(e_env, e_data["train"], n_inv, n, steps), jax.random.PRNGKey(0))
        dt = median_time(lambda: compiled(jax.random.PRNGKey(1)).block_until_ready(), R)
        erl_env[n] = n * steps / dt
        log(f"erl env {n:5d} accounts: {erl_env[n]:,.0f} steps/s (compile {cs:.1f}s)")
        rows_env.append(("erl_trader env (JAX, vmap), with the actor's observation", f"{n} accounts", erl_env[n], cs))
    curves["erl_env"] = erl_env
    if peers:
        fdf, fn, fnames = finrl_frame(e_args)
        fenv = make_finrl(peers, fdf, fn, fnames)
        rng = np.random.default_rng(0)
        fenv.reset()

        def finrl_run(n_steps):
            for _ in range(n_steps):
                _, _, term, _, _ = fenv.step(rng.uniform(-1, 1, fn).astype(np.float32))
                if term:
                    fenv.reset()

        n_f = 100 if quick else 400
        peer_env["finrl"] = n_f / median_time(lambda: finrl_run(n_f), R)
        log(f"FinRL StockTradingEnv, Python loop: {peer_env['finrl']:,.1f} steps/s")
        rows_env.append(
            (
                f"FinRL StockTradingEnv ({fn} stocks, {len(fdf) // fn} days), Python loop",
                "1 env",
                peer_env["finrl"],
                float("nan"),
            )
        )

    # 2. TRAINING THROUGHPUT: ppo_trader vs SB3 PPO (same env rules, same network and PPO sizes)
    ppo_cfg = dict(num_envs=p_args.num_envs, num_steps=p_args.num_steps)
    ours = ppo_train_sps(R, 2 if quick else 5, **ppo_cfg)
    log(
        f"ppo_trader training (defaults, {p_args.num_envs} envs x {p_args.num_steps} steps): {ours['sps']:,.0f} SPS, compile "
        f"{ours['compile_s']:.1f}s"
    )
    rows_train.append(
        (
            "ppo_trader (JAX), its env",
            f"{p_args.num_envs} envs x {p_args.num_steps} steps, 2x{p_args.hidden} tanh",
            ours["sps"],
            ours["compile_s"],
        )
    )
    peer_train = {}
    if peers:
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

        torch = peers["torch"]
        sb3_kw = time_to_result.sb3_ppo_kwargs(p_args, torch, seed=0, anneal=False)  # throughput: a constant rate
        per_iter = p_args.num_envs * p_args.num_steps
        iters = 1 if quick else 3

        def sb3_ppo_sps(make_env):
            venv = VecNormalize(
                DummyVecEnv([make_env] * p_args.num_envs), norm_obs=True, norm_reward=False
            )  # ppo_trader normalises observations too
            model = PPO("MlpPolicy", venv, **sb3_kw)
            threads = fastest_threads(
                torch, lambda: model.learn(per_iter, reset_num_timesteps=False)
            )  # doubles as the warm-up
            sps = per_iter * iters / median_time(lambda: model.learn(per_iter * iters, reset_num_timesteps=False), R, warmup=0)
            notes.append(
                f"SB3 PPO {'reference env' if make_env is RefEnvCls else 'gym-anytrading'}: torch {threads} thread(s)"
            )
            return sps

        RefEnvCls = ref_gym_env(peers, p_args, p_env, p_data["train"], p_info)
        peer_train["sb3_ppo_ref"] = sb3_ppo_sps(RefEnvCls)
        log(f"SB3 PPO on the NumPy reference env: {peer_train['sb3_ppo_ref']:,.0f} SPS")
        rows_train.append(
            (
                "stable-baselines3 PPO (torch CPU), NumPy reference of the same env",
                f"{p_args.num_envs} envs (DummyVecEnv) x {p_args.num_steps} steps, same sizes",
                peer_train["sb3_ppo_ref"],
                float("nan"),
            )
        )
        df = forex_df(p_args.data)
        peer_train["sb3_ppo_anytrading"] = sb3_ppo_sps(
            lambda: peers["gymnasium"].wrappers.FlattenObservation(make_forex(peers, df, p_args.window))
        )
        log(f"SB3 PPO on gym-anytrading forex-v0: {peer_train['sb3_ppo_anytrading']:,.0f} SPS")
        rows_train.append(
            (
                "stable-baselines3 PPO (torch CPU), gym-anytrading forex-v0",
                f"{p_args.num_envs} envs (DummyVecEnv) x {p_args.num_steps} steps, same sizes",
                peer_train["sb3_ppo_anytrading"],
                float("nan"),
            )
        )

    # 2b. erl_trader generations (learning included) vs SB3 TD3 on FinRL's env
    erl_gens = 1 if quick else 2
    erl_def = erl_train_sps(R, chunk_generations=erl_gens, generations=erl_gens)
    log(
        f"erl_trader training (defaults, pop {e_args.pop_size}): {erl_def['sps']:,.0f} env steps/s, compile "
        f"{erl_def['compile_s']:.1f}s"
    )
    rows_train.append(
        (
            "erl_trader (JAX), its env",
            f"defaults: pop {e_args.pop_size}, {e_args.rl_updates} TD3 updates/generation",
            erl_def["sps"],
            erl_def["compile_s"],
        )
    )
    erl_64 = erl_train_sps(R, pop_size=64, chunk_generations=erl_gens, generations=erl_gens)
    log(f"erl_trader training (pop 64): {erl_64['sps']:,.0f} env steps/s, compile {erl_64['compile_s']:.1f}s")
    rows_train.append(
        (
            "erl_trader (JAX), its env",
            f"pop 64, {e_args.rl_updates} TD3 updates/generation",
            erl_64["sps"],
            erl_64["compile_s"],
        )
    )
    if peers:
        from stable_baselines3 import TD3
        from stable_baselines3.common.noise import NormalActionNoise

        fdf, fn, fnames = finrl_frame(e_args)
        fvenv = peers["sb3"].common.vec_env.DummyVecEnv([lambda: make_finrl(peers, fdf, fn, fnames)])
        td3 = TD3(
            "MlpPolicy",
            fvenv,
            learning_starts=100,
            action_noise=NormalActionNoise(np.zeros(fn), 0.1 * np.ones(fn)),
            device="cpu",
            seed=0,
            verbose=0,
        )
        td3.learn(150)  # past learning_starts: every later step also trains
        n_td3 = 100 if quick else 400
        threads = fastest_threads(peers["torch"], lambda: td3.learn(n_td3 // 2, reset_num_timesteps=False))
        notes.append(f"SB3 TD3: torch {threads} thread(s)")
        peer_train["sb3_td3_finrl"] = n_td3 / median_time(lambda: td3.learn(n_td3, reset_num_timesteps=False), R, warmup=0)
        log(f"SB3 TD3 on FinRL StockTradingEnv: {peer_train['sb3_td3_finrl']:,.1f} env steps/s")
        rows_train.append(
            (
                "stable-baselines3 TD3 (torch CPU), FinRL StockTradingEnv",
                "defaults (train every step, batch 256, 400-300 MLPs)",
                peer_train["sb3_td3_finrl"],
                float("nan"),
            )
        )

    # 2c. TIME TO A RESULT: ppo_trader against SB3 PPO until 80% of the oracle (benchmarks/time_to_result.py)
    time_md = []
    if not quick:  # ~15 minutes with the peers on a 2-core CPU
        time_md, _ = time_to_result.ppo_section(peers)

    # 3. SCALING AND COST
    peak, peak_n = peak_matmul_flops(R)
    log(f"peak float32 matmul: {peak / 1e9:,.1f} GFLOP/s ({peak_n}x{peak_n})")
    gpu_sized = dict(num_envs=4096, num_steps=64)
    ppo_scale = {p_args.num_envs: ours}
    for n in (256, 1024) if quick else (256, 1024, 4096, 16384):
        ppo_scale[n] = ppo_train_sps(R, 1 if quick else 2, num_envs=n, num_steps=64)
        log(
            f"ppo_trader training {n} envs x 64 steps: {ppo_scale[n]['sps']:,.0f} SPS, compile "
            f"{ppo_scale[n]['compile_s']:.1f}s"
        )
    if 4096 not in ppo_scale:
        ppo_scale[4096] = ppo_train_sps(R, 1, **gpu_sized)
        log(
            f"ppo_trader training 4096 envs x 64 steps: {ppo_scale[4096]['sps']:,.0f} SPS, compile "
            f"{ppo_scale[4096]['compile_s']:.1f}s"
        )
    for n, r in sorted(ppo_scale.items()):
        steps = 128 if n == p_args.num_envs else 64
        rows_scale.append(
            (
                "ppo_trader training",
                f"{n} envs x {steps} steps",
                r["sps"],
                r["compile_s"],
                r["memory"],
                (r["mm_flops"] + r["other_flops"]) / r["chunk_s"],
                r["mm_flops"] / r["chunk_s"],
            )
        )
    curves["ppo_train"] = {n: r["sps"] for n, r in ppo_scale.items()}
    erl_scale = {16: erl_def, 64: erl_64}
    for pop in (
        () if quick else (8, 32, 128)
    ):  # an erl_trader chunk compiles in ~35 s on 2 cores: --quick keeps to pop 16 and 64
        erl_scale[pop] = erl_train_sps(R, pop_size=pop, chunk_generations=erl_gens, generations=erl_gens)
        log(
            f"erl_trader training pop {pop}: {erl_scale[pop]['sps']:,.0f} env steps/s, compile "
            f"{erl_scale[pop]['compile_s']:.1f}s"
        )
    for pop, r in sorted(erl_scale.items()):
        rows_scale.append(
            (
                "erl_trader training",
                f"pop {pop}",
                r["sps"],
                r["compile_s"],
                r["memory"],
                (r["mm_flops"] + r["other_flops"]) / r["chunk_s"],
                r["mm_flops"] / r["chunk_s"],
            )
        )
    curves["erl_train"] = {p: r["sps"] for p, r in erl_scale.items()}

    # memory against window length and replay size (XLA's plan for one compiled chunk call)
    mem = {}
    for w in (16, 64, 256):
        args, env_params, datasets, _ = ppo_setup(window=w, num_envs=1024, num_steps=64, chunk_updates=1)
        init, train_chunk, _, _ = pt.make_train(args, env_params, datasets["train"])
        runner = jax.tree.map(lambda x: x[None], jax.jit(init)(jax.random.PRNGKey(0)))
        compiled, cs = compile_timed(jax.jit(jax.vmap(train_chunk)), runner)
        mem[("ppo", w)] = xla_memory(compiled)
        rows_mem.append(("ppo_trader chunk, 1024 envs x 64 steps", f"window {w}", mem[("ppo", w)], cs))
        log(f"ppo memory window {w}: {mem[('ppo', w)] / 2**20:,.1f} MiB (compile {cs:.1f}s)")
    mem[("erl", e_args.window, e_args.buffer_size)] = erl_def["memory"]
    rows_mem.append(
        (
            "erl_trader chunk, pop 16",
            f"window {e_args.window}, replay {e_args.buffer_size:,}",
            erl_def["memory"],
            erl_def["compile_s"],
        )
    )
    erl_mem_cfg = ((60, 100_000), (20, 1_000_000)) if quick else ((10, 100_000), (60, 100_000), (20, 10_000), (20, 1_000_000))
    for w, buf in erl_mem_cfg:
        args, env_params, datasets, info = erl_setup(
            window=w, buffer_size=buf, chunk_generations=erl_gens, generations=erl_gens
        )
        inv = tuple(info["inv"])
        init, chunk, *_ = et.make_erl(args, env_params, datasets["train"], len(inv), inv)
        runner = init(jax.random.PRNGKey(0))
        compiled, cs = compile_timed(jax.jit(chunk), runner, datasets["train"])
        mem[("erl", w, buf)] = xla_memory(compiled)
        rows_mem.append(("erl_trader chunk, pop 16", f"window {w}, replay {buf:,}", mem[("erl", w, buf)], cs))
        log(f"erl memory window {w} replay {buf}: {mem[('erl', w, buf)] / 2**20:,.1f} MiB (compile {cs:.1f}s)")

    flops_check = check_flops()
    log(f"FLOP count check (every loop once): jaxpr {flops_check['jaxpr']:.3g}, XLA cost analysis {flops_check['xla']:.3g}")
    load1 = os.getloadavg()
    total_s = time.time() - t_start

    # ---- WRITE RESULTS ----
    out_dir = Path(cli.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    if peers:
        targets = [
            ("ppo_trader env @4096 / gym-anytrading single env", ppo_env[4096] / peer_env["anytrading"], 20),
            ("ppo_trader env @4096 / FinRL StockTradingEnv", ppo_env[4096] / peer_env["finrl"], 5000),
            ("ppo_trader training / SB3 PPO, same env rules and sizes", ours["sps"] / peer_train["sb3_ppo_ref"], 5),
            ("ppo_trader training / SB3 PPO on gym-anytrading", ours["sps"] / peer_train["sb3_ppo_anytrading"], None),
            # not a like-for-like ratio: erl_trader takes 32 TD3 updates per generation (2,250 env steps at pop 16), TD3 one
            # gradient step per env step; the time-to-result section compares what a user waits for
            (
                "erl_trader training (defaults) / SB3 TD3 on FinRL, env steps/s at their own update rates",
                erl_def["sps"] / peer_train["sb3_td3_finrl"],
                None,
            ),
            (
                "erl_trader training (pop 64) / SB3 TD3 on FinRL, env steps/s at their own update rates",
                erl_64["sps"] / peer_train["sb3_td3_finrl"],
                None,
            ),
            ("erl_trader env @1024 / FinRL StockTradingEnv", erl_env[1024] / peer_env["finrl"], None),
        ]
    gpu_row = ppo_scale[4096]
    frac = (gpu_row["mm_flops"] + gpu_row["other_flops"]) / gpu_row["chunk_s"] / peak
    targets.append(("ppo_trader training FLOP/s at 4096 envs x 64 steps / peak matmul FLOP/s", frac, 0.30))
    md = [
        f"# Benchmarks: {desc}",
        "",
        f"`python benchmarks/run.py{' --quick' if quick else ''}{' --no-peers' if cli.no_peers else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, "
        f"{total_s / 60:.1f} min. Load average (1/5/15 min) at the start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"at the end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (other processes share this machine: absolute numbers are "
        "noisy, "
        "ratios are measured back to back in one process).",
        "",
        f"Versions: jax {jax.__version__}"
        + ("".join(f", {k} {v}" for k, v in peers["versions"].items()) if peers else "")
        + f". Each figure is the median of {R} timed repeats after a warm-up call; compilation is timed apart."
        + (" Peers: " + "; ".join(notes) + " (the faster of 1 thread and all cores)." if notes else ""),
        "",
    ]
    if targets:
        md += ["## Targets", "", "| ratio | measured | target | met |", "|---|---|---|---|"]
        md += [
            f"| {name} | {fmt(v)}{'' if name.endswith('FLOP/s') else 'x'} | "
            f"{('>= ' + fmt(t) + ('' if t < 1 else 'x')) if t else '-'} | "
            f"{('yes' if v >= t else 'no') if t else ''} |"
            for name, v, t in targets
        ]
        md += [""]
    md += [
        "## 1. Env steps/s, random legal actions",
        "",
        "ppo_trader: EURUSD 1h sample, training split, auto-reset at random session starts, observation of window 16 x 11 "
        "features + 7. "
        "gym-anytrading: `gym.make('forex-v0')` on the same EURUSD closes (window 16). erl_trader: the 20-stock S&P 500 "
        "sample, "
        "training split, the actor's observation window (20 days x 21 columns x 9 channels) built every step. FinRL: its "
        "StockTradingEnv on the same 20 stocks and days with the 8 features as technical indicators.",
        "",
        "| env | batch | steps/s | compile (s) |",
        "|---|---|---|---|",
    ]
    md += [f"| {a} | {b} | {fmt(c)} | {fmt(d)} |" for a, b, c, d in rows_env]
    md += [
        "",
        "## 2. Training throughput (env steps per second, learning included)",
        "",
        "ppo_trader and SB3 PPO share the PPO sizes: 64 envs x 128 steps, 4 epochs x 4 minibatches, separate 2x128 tanh "
        "actor and critic MLPs, "
        "observation normalisation (SB3: VecNormalize). The NumPy reference env is tests/ppo_reference.py, the rules "
        "ppo_trader's env is "
        "checked against. erl_trader: one generation = pop x 5 + 10 learner episodes of 25 days and 32 TD3 updates; "
        "SB3 TD3 trains once per env step.",
        "",
        "| trainer | configuration | env steps/s | compile (s) |",
        "|---|---|---|---|",
    ]
    md += [f"| {a} | {b} | {fmt(c)} | {fmt(d)} |" for a, b, c, d in rows_train]
    md += [""] + time_md
    md += [
        "## 3. Scaling and cost",
        "",
        f"Peak float32 matmul on this device: {peak / 1e9:,.1f} GFLOP/s (measured, {peak_n}x{peak_n}). FLOPs per chunk are "
        "counted from the "
        "jaxpr with every scan multiplied out (XLA's cost analysis counts a loop body once); on a chunk whose loops all run "
        "once the count "
        f"is {flops_check['jaxpr']:.4g} against XLA's {flops_check['xla']:.4g}. Memory: XLA's plan for one chunk call "
        "(arguments + outputs + "
        "temporaries).",
        "",
        "| trainer | configuration | env steps/s | compile (s) | memory (MiB) | achieved GFLOP/s (matmul) | of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {a} | {b} | {fmt(c)} | {fmt(d)} | {fmt(e / 2**20)} | {fmt(f / 1e9)} ({fmt(g / 1e9)}) | {100 * f / peak:.1f}% |"
        for a, b, c, d, e, f, g in rows_scale
    ]
    md += ["", "| chunk | configuration | memory (MiB) | compile (s) |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {fmt(c / 2**20)} | {fmt(d)} |" for a, b, c, d in rows_mem]
    (out_dir / f"{slug}.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.loglog(list(ppo_env), list(ppo_env.values()), "o-", label="ppo_trader env")
    ax.loglog(list(erl_env), list(erl_env.values()), "s-", label="erl_trader env")
    for key, label, style in (
        ("anytrading", "gym-anytrading, 1 env", "--"),
        ("anytrading_sync", "gym-anytrading, SyncVectorEnv", "-."),
        ("finrl", "FinRL StockTradingEnv", ":"),
    ):
        if key in peer_env:
            ax.axhline(peer_env[key], ls=style, color="gray", label=label)
    ax.set(xlabel="parallel envs / accounts", ylabel="env steps/s", title="env steps/s, random actions")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.loglog(list(curves["ppo_train"]), list(curves["ppo_train"].values()), "o-", label="ppo_trader")
    if "sb3_ppo_ref" in peer_train:
        ax.axhline(peer_train["sb3_ppo_ref"], ls="--", color="gray", label="SB3 PPO, reference env (64 envs)")
    ax.set(xlabel="num envs", ylabel="env steps/s (training)", title="PPO training throughput")
    ax.legend(fontsize=7)
    ax = axes[2]
    pops = sorted(curves["erl_train"])
    ax.loglog(pops, [curves["erl_train"][p] for p in pops], "s-", label="erl_trader")
    if "sb3_td3_finrl" in peer_train:
        ax.axhline(peer_train["sb3_td3_finrl"], ls="--", color="gray", label="SB3 TD3 on FinRL")
    ax.set(xlabel="population size", ylabel="env steps/s (training)", title="ERL training throughput")
    ax.legend(fontsize=7)
    fig.suptitle(desc, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"{slug}.png", dpi=100)
    plt.close(fig)
    log(f"wrote {out_dir / (slug + '.md')} and {slug}.png in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
