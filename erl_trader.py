"""erl_trader.py: evolutionary RL (GA population + injected TD3 learner) on a daily stock universe, in one file.

    python erl_trader.py                         # S&P 500 sample: train to 2012, validate 2013-2016, test 2017-2022
    python erl_trader.py --pop-size 16 --extractor lstm
    python erl_trader.py --eval-only --checkpoint runs/NAME/best.msgpack

One generation (jitted; generations run in a lax.scan, in chunks between which the host logs/checkpoints):
  1. every actor of the population (one pytree, leading axis = pop) plays `episodes_per_agent` random
     training slices (vmap); fitness = mean of its `worst_k` worst episode returns;
  2. the TD3 learner plays the same slices greedily (its fitness) and with exploration noise;
     every transition goes into one replay memory (day index, action, reward, done, small state);
  3. `rl_updates` TD3 steps (twin critics, target policy smoothing, delayed actor updates, soft targets);
  4. every `inject_every` generations the learner's actor replaces the worst individual (and we record
     whether it is then an elite);
  5. GA: elites kept, tournament selection, crossover, ERL mutation (relative Gaussian noise on a
     fraction of weights, rare super-mutation and reset, clipped).
Design: ../shared/DESIGN.md sections 2b, 3, 4. File order: args, data, env, networks, ERL, outer loop,
backtest, main.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.flatten_util import ravel_pytree


# ---- ARGS ----
@dataclasses.dataclass(frozen=True)  # frozen: hashable, so modules holding it can key jit caches
class Args:
    """Evolutionary RL on a daily universe; every flag below is documented in --help."""

    data: str = "data/sp500_daily.npz"
    """daily .npz written by data_prep.py"""
    seed: int = 1
    """random seed (same seed, same result)"""
    run_name: Optional[str] = None
    """name of the folder under runs/ (default: erl_<data>_<seed>_<time>)"""
    train_end: str = "2013-01-01"
    """first day after the training split (YYYY-MM-DD) or a fraction of the days"""
    val_end: str = "2017-01-01"
    """first day after the validation split; the test split is the rest (one window embargoed between splits)"""
    pop_size: int = 16
    """actors in the GA population"""
    generations: int = 40
    """generations to run"""
    episodes_per_agent: int = 5
    """random training slices each actor plays per generation"""
    worst_k: int = 2
    """fitness = mean of the worst_k episode returns (conservative)"""
    num_elites: int = 2
    """best individuals copied unchanged into the next generation"""
    tournament_size: int = 3
    """individuals drawn per tournament"""
    crossover_prob: float = 0.5
    """probability that a child is a crossover of two parents (else a copy of one)"""
    mutation_prob: float = 0.9
    """probability that a child is mutated"""
    mutation_frac: float = 0.1
    """fraction of each weight tensor perturbed by a mutation"""
    mutation_strength: float = 0.1
    """std of the Gaussian noise relative to each weight's magnitude"""
    super_mutation_prob: float = 0.05
    """probability, per perturbed weight, of a super-mutation (strength x 10)"""
    reset_prob: float = 0.05
    """probability, per perturbed weight, of a reset to N(0, 0.1)"""
    weight_clip: float = 10.0
    """weights are clipped to [-weight_clip, weight_clip] after mutation"""
    inject_every: int = 2
    """generations between injections of the TD3 actor into the population"""
    rl_updates: int = 32
    """TD3 gradient steps per generation"""
    batch_size: int = 128
    """TD3 minibatch size"""
    buffer_size: int = 100_000
    """replay memory capacity (transitions)"""
    gamma: float = 0.95
    """TD3 discount"""
    n_step: int = 3
    """TD3 targets sum this many rewards before bootstrapping (n-step returns): a trade's exit reward arrives
    days after the decision that opened it, and an n covering the holding period puts it in the target itself"""
    tau: float = 0.005
    """soft target update rate"""
    actor_lr: float = 1e-3
    """TD3 actor learning rate"""
    critic_lr: float = 1e-3
    """TD3 critic learning rate"""
    policy_noise: float = 0.2
    """target policy smoothing noise (action units in [0, 1])"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    policy_delay: int = 2
    """critic updates per actor update"""
    expl_noise: float = 0.1
    """exploration noise of the learner's rollouts (action units in [0, 1])"""
    window: int = 20
    """days of features in an observation"""
    trading_days: int = 20
    """days per episode on which positions may be opened"""
    settlement_days: int = 5
    """days after the trading days with no new positions; what is open at the end is sold at the close"""
    max_positions: int = 3
    """slots; each position gets 1/max_positions of equity"""
    max_holding_days: int = 10
    """a position held this many days is sold at the close"""
    coef_max: float = 100.0
    """conviction coefficients lie in [0, coef_max]"""
    coef_threshold: float = 50.0
    """the best coefficient must exceed this to open a position"""
    target_min: float = 1.0
    """lowest sale target in percent above entry"""
    target_max: float = 10.0
    """highest sale target in percent above entry (the original design used 10..50 on longer horizons)"""
    cost_bps: float = 10.0
    """transaction cost per side in basis points"""
    hurdle_pct: float = 0.0
    """gain in percent a trade must beat to earn a positive reward"""
    inaction_penalty: float = 0.01
    """reward subtracted on trading days with nothing held"""
    extractor: Literal["lstm", "conv"] = "conv"
    """per-stock feature extractor: temporal conv + LSTM, or conv only (much cheaper)"""
    bidirectional: bool = False
    """bidirectional LSTM (lstm extractor)"""
    remat: bool = False
    """recompute the extractor in the backward pass (jax.checkpoint) to save memory on long windows"""
    hidden: int = 32
    """width of the extractor, attention and heads"""
    conv_channels: int = 16
    """channels of the temporal convolution"""
    kernel_size: int = 5
    """kernel of the temporal convolution"""
    avg_last: int = 5
    """the LSTM output is the average of its last avg_last steps"""
    chunk_generations: int = 1
    """generations per jitted lax.scan chunk (the host logs and checkpoints between chunks)"""
    eval_every: int = 2
    """generations between validation runs of the champion and the TD3 learner's actor"""
    stop_after: Optional[int] = None
    """stop after this many chunks (as if interrupted) and save a checkpoint; continue with --resume"""
    resume: Optional[str] = None
    """continue the run in this folder from its last checkpoint"""
    eval_only: bool = False
    """only backtest --checkpoint on --eval-split"""
    checkpoint: Optional[str] = None
    """policy checkpoint (.msgpack) for --eval-only"""
    eval_split: str = "test"
    """split backtested by --eval-only: train, val or test"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    devices: Optional[int] = None
    """devices per process to shard over (default: all local devices); the population (and the TD3 batch) is split across them"""
    coordinator_address: Optional[str] = None
    """multi-host: HOST:PORT of process 0 (calls jax.distributed.initialize; run the same command on every host)"""
    num_processes: Optional[int] = None
    """multi-host: number of processes (one per host)"""
    process_id: Optional[int] = None
    """multi-host: this process's index, 0..num_processes-1 (process 0 writes logs and checkpoints)"""


# ---- DATA ----
class DataError(Exception):
    """Bad data or flags: one line, exit status 2."""


@struct.dataclass
class MarketData:
    """Device arrays of one daily universe (all splits; `lo`/`hi` say which days a split may use)."""

    open: jax.Array  # [T, N]
    high: jax.Array
    low: jax.Array
    close: jax.Array
    valid: jax.Array  # [T, N] bool
    features: jax.Array  # [T, N, F]
    inv: jax.Array  # [n] investable column indices
    lo: jax.Array  # first day of the split
    hi: jax.Array  # end of the split (exclusive)


def split_point(text: str, dates: np.ndarray, flag: str) -> int:
    """Index of the first day on/after a date (YYYY-MM-DD), or a fraction of the days."""
    try:
        x = float(text)
        if 0 < x < 1:
            return int(len(dates) * x)
    except ValueError:
        pass
    try:
        day = np.datetime64(text, "D").astype(np.int64)
    except ValueError:
        raise DataError(f"{flag} '{text}' is neither a date YYYY-MM-DD nor a fraction in (0, 1). Fix: e.g. {flag} 2013-01-01") from None
    return int(np.searchsorted(dates, day))


def load_data(args: Args) -> tuple[dict, dict]:
    """Loads and checks a daily npz; returns ({'train','val','test'}: MarketData, info). Embargo: one window."""
    path = Path(args.data)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Fix: build one with data_prep.py (see README) or pass --data")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}). Fix: rebuild it with data_prep.py") from None
    meta = json.loads(str(raw.get("meta", "{}")))
    if meta.get("kind") != "daily":
        raise DataError(f"{path}: kind is '{meta.get('kind')}', erl_trader needs a daily universe. Fix: use data_prep.py daily (or ppo_trader.py for intraday bars)")
    need = ("dates", "tickers", "investable", "open", "high", "low", "close", "valid", "features")
    missing = [k for k in need if k not in raw]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}. Fix: rebuild it with the current data_prep.py")
    dates = raw["dates"]
    W, ep = args.window, args.trading_days + args.settlement_days
    i1, i2 = split_point(args.train_end, dates, "--train-end"), split_point(args.val_end, dates, "--val-end")
    bounds = {"train": (0, i1), "val": (i1 + W, i2), "test": (i2 + W, len(dates))}
    for name, (lo, hi) in bounds.items():
        if hi - lo < W + ep + 1:
            raise DataError(f"{path}: the {name} split has {max(hi - lo, 0)} days, fewer than window + trading + settlement days + 1 ({W + ep + 1}). "
                            "Fix: move --train-end/--val-end or shorten --window/--trading-days")
    inv = np.flatnonzero(raw["investable"]).astype(np.int32)
    base = dict(open=jnp.asarray(raw["open"], jnp.float32), high=jnp.asarray(raw["high"], jnp.float32), low=jnp.asarray(raw["low"], jnp.float32),
                close=jnp.asarray(raw["close"], jnp.float32), valid=jnp.asarray(raw["valid"]), features=jnp.asarray(raw["features"], jnp.float32),
                inv=jnp.asarray(inv))
    out = {name: MarketData(**base, lo=jnp.int32(lo), hi=jnp.int32(hi)) for name, (lo, hi) in bounds.items()}
    info = dict(path=str(path), meta=meta, tickers=[str(t) for t in raw["tickers"]], dates=dates, bounds=bounds,
                feature_names=[str(f) for f in raw["feature_names"]], inv=inv.tolist())
    return out, info


# ---- ENV ----
@struct.dataclass
class EnvParams:
    """Env rules (see Args). `trading_days` is dynamic so the backtest can run one long episode."""

    window: int = struct.field(pytree_node=False, default=20)
    max_positions: int = struct.field(pytree_node=False, default=3)
    trading_days: int = 20
    settlement_days: int = 5
    max_holding_days: int = 10
    coef_max: float = 100.0
    coef_threshold: float = 50.0
    target_min: float = 1.0
    target_max: float = 10.0
    cost_bps: float = 10.0
    hurdle_pct: float = 0.0
    inaction_penalty: float = 0.01


@struct.dataclass
class EnvState:
    """K position slots and the cash of one account (equity unit 1.0 at reset)."""

    held: jax.Array  # [K] bool
    col: jax.Array  # [K] column index
    entry: jax.Array  # [K] entry price
    day: jax.Array  # [K] entry day
    coef: jax.Array  # [K] coefficient at entry
    target: jax.Array  # [K] target price
    shares: jax.Array  # [K]
    cash: jax.Array
    equity: jax.Array  # marked at the close of day t
    t: jax.Array  # decision day
    k: jax.Array  # step in the episode


def env_params_from_args(args: Args) -> EnvParams:
    return EnvParams(window=args.window, max_positions=args.max_positions, trading_days=args.trading_days, settlement_days=args.settlement_days,
                     max_holding_days=args.max_holding_days, coef_max=args.coef_max, coef_threshold=args.coef_threshold,
                     target_min=args.target_min, target_max=args.target_max, cost_bps=args.cost_bps, hurdle_pct=args.hurdle_pct,
                     inaction_penalty=args.inaction_penalty)


def reset_at(start: jax.Array, params: EnvParams) -> EnvState:
    """A flat account deciding at day `start`."""
    K = params.max_positions
    zf, zi = jnp.zeros(K), jnp.zeros(K, jnp.int32)
    return EnvState(held=jnp.zeros(K, bool), col=zi, entry=zf, day=zi, coef=zf, target=zf, shares=zf, cash=jnp.float32(1.0),
                    equity=jnp.float32(1.0), t=jnp.int32(start), k=jnp.int32(0))


def sample_start(key: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """A random first decision day with room for the window before and the whole episode after."""
    ep = params.trading_days + params.settlement_days
    return jax.random.randint(key, (), data.lo + params.window - 1, data.hi - ep)


def get_obs(t: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """[W, N, F+1]: each column's feature window instance-normalised, plus a validity channel."""
    W = params.window
    x = jax.lax.dynamic_slice_in_dim(data.features, t - W + 1, W, axis=0)
    x = x - x[-1]  # shift first (same maths): a flat window gives exactly 0 in float32, not rounding noise / 1e-6
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    v = jax.lax.dynamic_slice_in_dim(data.valid, t - W + 1, W, axis=0).astype(jnp.float32)
    return jnp.concatenate([z, v[..., None]], axis=-1)


def scale_action(a: jax.Array, params: EnvParams) -> tuple[jax.Array, jax.Array]:
    """Network action in [0, 1]^(n x 2) -> (coefficients in [0, coef_max], targets in percent)."""
    return a[:, 0] * params.coef_max, params.target_min + a[:, 1] * (params.target_max - params.target_min)


SMALL_PER_STOCK = 5  # held, unrealised gain, coefficient at entry, days held, distance to the target


def small_state(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """What the critic sees besides market data, [n * 5 + 1]: per investable stock whether it is held and, if so,
    its unrealised gain (percent / 10, at day t's close), the coefficient it was opened with (which scales
    its exit reward), the days held / max_holding_days and the distance to its sale target (percent / 10);
    then the episode progress. Without the open positions the critic cannot tell what a held stock will pay,
    so the value of opening it never reaches the decision that opened it."""
    N = data.open.shape[1]
    where = jnp.where(state.held, state.col, N)  # a free slot writes nowhere
    close = data.close[state.t, state.col]
    per_slot = jnp.stack([jnp.ones_like(close), (close / jnp.where(state.held, state.entry, 1.0) - 1) * 10,
                          state.coef / params.coef_max, (state.t - state.day) / params.max_holding_days,
                          (state.target / close - 1) * 10], axis=-1)
    per_col = jnp.zeros((N, SMALL_PER_STOCK)).at[where].set(jnp.where(state.held[:, None], per_slot, 0.0), mode="drop")
    ep = params.trading_days + params.settlement_days
    return jnp.concatenate([per_col[data.inv].reshape(-1), (state.k / ep)[None]]).astype(jnp.float32)


def step(state: EnvState, coef: jax.Array, target: jax.Array, params: EnvParams, data: MarketData):
    """The rules of DESIGN 2b for one day: open at t+1's open, exits on day t+1, rewards at exits.

    Returns (state, reward, done, info); info has the column opened (-1 if none) and per-slot exits.
    """
    t, k = state.t, state.k
    u = t + 1
    K = params.max_positions
    c = params.cost_bps / 10_000.0
    inv = data.inv
    last = k == params.trading_days + params.settlement_days - 1

    # OPEN: the best-coefficient investable stock, valid today and not held, into the first free slot
    held_col = jnp.zeros(data.open.shape[1], bool).at[state.col].max(state.held)
    cand = data.valid[t, inv] & ~held_col[inv]
    j = jnp.argmax(jnp.where(cand, coef, -jnp.inf))
    col = inv[j]
    free = ~state.held
    slot = jnp.argmax(free)
    do_open = (k < params.trading_days) & cand.any() & (coef[j] > params.coef_threshold) & free.any() & data.valid[u, col]
    entry = data.open[u, col]
    alloc = jnp.minimum(state.cash, state.equity / K)
    opened = jnp.arange(K) == slot
    op = opened & do_open
    held = state.held | op
    s_col = jnp.where(op, col, state.col)
    s_entry = jnp.where(op, entry, state.entry)
    s_day = jnp.where(op, u, state.day)
    s_coef = jnp.where(op, coef[j], state.coef)
    s_target = jnp.where(op, entry * (1 + target[j] / 100.0), state.target)
    s_shares = jnp.where(op, alloc * (1 - c) / entry, state.shares)
    cash = state.cash - jnp.where(do_open, alloc, 0.0)

    # EXITS on day u: delisting, target, max holding; the last step closes everything
    o, h, cl, val = data.open[u, s_col], data.high[u, s_col], data.close[u, s_col], data.valid[u, s_col]
    old = held & (s_day < u)
    delist = old & ~val
    hit = old & val & (h >= s_target)
    maxh = old & val & ~hit & (u - s_day >= params.max_holding_days)
    end = held & last & ~(delist | hit | maxh)
    exits = delist | hit | maxh | end
    price = jnp.where(hit, jnp.maximum(s_target, o), cl)
    gain_pct = (price / jnp.where(exits, s_entry, 1.0) - 1) * 100
    exit_reward = jnp.where(exits, s_coef / params.coef_max * (gain_pct - params.hurdle_pct) - 2 * params.cost_bps / 100, 0.0)
    cash = cash + jnp.sum(jnp.where(exits, s_shares * price * (1 - c), 0.0))
    held = held & ~exits

    reward = exit_reward.sum() - jnp.where((k < params.trading_days) & ~held.any(), params.inaction_penalty, 0.0)
    equity = cash + jnp.sum(jnp.where(held, s_shares * data.close[u, s_col], 0.0))
    zero = lambda x: jnp.where(held, x, jnp.zeros_like(x))  # noqa: E731
    new = EnvState(held=held, col=zero(s_col), entry=zero(s_entry), day=zero(s_day), coef=zero(s_coef), target=zero(s_target),
                   shares=zero(s_shares), cash=cash, equity=equity, t=u, k=k + 1)
    info = dict(opened=jnp.where(do_open, col, -1), exits=exits, exit_col=s_col, exit_price=price, exit_entry=s_entry, exit_day=s_day,
                exit_reward=exit_reward, n_exits=exits.sum())
    return new, reward, last, info


# ---- NETWORKS ----
def temporal_conv(x: jax.Array, features: int, kernel: int) -> jax.Array:
    """A "SAME"-padded 1-D convolution over the window, written as unfold + Dense: the same maths as nn.Conv,
    but a plain matmul, which XLA:CPU runs far faster than a convolution inside scanned training loops."""
    W = x.shape[0]
    pad = jnp.pad(x, ((kernel // 2, kernel - 1 - kernel // 2), (0, 0)))
    patches = jnp.stack([pad[i: i + W] for i in range(kernel)], axis=1).reshape(W, -1)  # [W, kernel * C]
    return nn.Dense(features)(patches)


class ConvLSTMExtractor(nn.Module):
    """One column's window [W, C] -> [hidden]: temporal conv, then LSTM (average of the last steps) or conv only."""

    hidden: int
    channels: int
    kernel: int
    kind: str
    bidirectional: bool
    avg_last: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(temporal_conv(x, self.channels, self.kernel))
        if self.kind == "conv":
            x = nn.relu(temporal_conv(x, self.hidden, self.kernel))
            return nn.Dense(self.hidden)(jnp.concatenate([x.mean(0), x[-1]]))
        if self.bidirectional:
            rnn = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.hidden)), nn.RNN(nn.OptimizedLSTMCell(self.hidden)))
        else:
            rnn = nn.RNN(nn.OptimizedLSTMCell(self.hidden))
        y = rnn(x[None])[0]
        return nn.Dense(self.hidden)(y[-self.avg_last:].mean(0))


def column_extractor(args: Args) -> nn.Module:
    """The extractor shared across columns: one set of weights, vmapped over the column axis of [W, N, C]."""
    base = nn.remat(ConvLSTMExtractor) if args.remat else ConvLSTMExtractor
    vmapped = nn.vmap(base, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=1, out_axes=0)
    return vmapped(args.hidden, args.conv_channels, args.kernel_size, args.extractor, args.bidirectional, args.avg_last)


class Actor(nn.Module):
    """Per-column extractor (shared, vmapped over columns), cross-attention from a learnable query over all
    columns for a global context, and per-stock heads -> action in [0, 1]^(n x 2) (coefficient, target).
    Each head mixes its stock's features with the context through a hidden layer shared by all stocks, then an
    output layer of its own: the stock reads the shared features its own way, and the hidden layer learns from
    every stock's gradient (per-stock hidden layers learned the planted signal of the synthetic universe to 48%
    of the oracle's return, a shared one to 79%)."""

    args: Args
    inv: tuple

    @nn.compact
    def __call__(self, obs):  # obs [W, N, C]
        feats = column_extractor(self.args)(obs)
        query = self.param("query", nn.initializers.normal(0.1), (1, self.args.hidden))
        context = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.args.hidden)(query, feats)[0]
        stock = feats[jnp.asarray(self.inv)]
        h = jnp.concatenate([stock, jnp.broadcast_to(context, stock.shape)], axis=-1)
        h = nn.relu(nn.Dense(self.args.hidden)(h))  # shared by all stocks: every stock's gradient trains it
        per_stock = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})  # own weights per stock
        return nn.sigmoid(per_stock(2)(h))


class Critic(nn.Module):
    """Twin Q networks (TD3) built the way the env uses an action.

    An action only matters through the stock it opens (the highest coefficient among investable stocks not
    held, if it beats the threshold and a slot is free on a trading day), that stock's coefficient (it scales
    the exit reward) and its sale target. So each Q is

        Q(s, a) = V(s) + open(s, a) * sum_i w_i(a) * coef_i * g_i(s, target_i)

    with w = softmax over the coefficients (a differentiable "which stock is opened", learned sharpness),
    open = a sigmoid of the soft-max coefficient minus the threshold, times whether a slot is free on a
    trading day (known from the state), g_i the value per unit of coefficient of opening stock i with its
    target, and V(s) the value of the positions already held plus the rest of the episode. A generic MLP on
    [state, action] has to learn the product coef x gain from noisy rewards, and in practice does not.
    Each investable column is encoded from its window (a shared dense layer: far cheaper than the actor's
    extractor, and the critic runs on every replay batch) and its open position, with weights shared by all stocks."""

    args: Args
    inv: tuple

    @nn.compact
    def __call__(self, obs, small, action):
        args, n = self.args, len(self.inv)
        inv = jnp.asarray(self.inv)
        cols = obs.transpose(1, 0, 2).reshape(obs.shape[1], -1)  # [N, W * C]
        positions = small[:-1].reshape(n, SMALL_PER_STOCK)
        held, progress = positions[:, 0], small[-1]
        can_open = (held.sum() < args.max_positions) & (progress < args.trading_days / (args.trading_days + args.settlement_days))
        coef, target = action[:, 0], action[:, 1]
        qs = []
        for q in range(2):
            context = nn.relu(nn.Dense(args.hidden)(cols)).mean(0)
            enc = nn.relu(nn.Dense(args.hidden)(cols[inv]))
            h = nn.relu(nn.Dense(args.hidden)(jnp.concatenate([enc, positions], axis=-1)))  # [n, hidden]: state only
            gain = nn.Dense(1)(nn.relu(nn.Dense(args.hidden)(jnp.concatenate([h, target[:, None]], axis=-1))))[:, 0]
            sharp = 1.0 + nn.softplus(self.param(f"sharpness{q}", nn.initializers.constant(3.0), ()))
            w = nn.softmax(sharp * 10.0 * coef - 1e3 * held)
            gate = nn.sigmoid(sharp * 10.0 * (w @ coef - args.coef_threshold / args.coef_max)) * can_open
            held_value = held @ nn.Dense(1)(h)[:, 0]
            x = nn.relu(nn.Dense(4 * args.hidden)(jnp.concatenate([h.mean(0), context, small[-1:]])))
            value = nn.Dense(1)(nn.relu(nn.Dense(4 * args.hidden)(x)))[0] + held_value
            qs.append(value + gate * (w @ (coef * gain)))
        return qs[0], qs[1]


# ---- ERL ----
class Replay(NamedTuple):
    """Replay memory of what cannot be recomputed: observations are gathered from `data` at day t / t + n_step."""

    t: jax.Array  # [cap] decision day
    small: jax.Array  # [cap, n * 5 + 1] small state (open positions, progress) at t
    action: jax.Array  # [cap, n, 2] network action in [0, 1]
    reward: jax.Array  # [cap] discounted sum of the n_step rewards from t
    done: jax.Array  # [cap] the episode ends within those n_step steps (nothing to bootstrap)
    next_small: jax.Array  # [cap, n * 5 + 1] small state at t + n_step
    ptr: jax.Array
    size: jax.Array


class Learner(NamedTuple):
    actor: dict
    critic: dict
    actor_target: dict
    critic_target: dict
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    updates: jax.Array


class RunnerState(NamedTuple):
    pop: dict  # actor params with a leading population axis
    learner: Learner
    replay: Replay
    rng: jax.Array
    gen: jax.Array


def worst_k_mean(returns: jax.Array, k: int) -> jax.Array:
    """Conservative fitness: the mean of the k worst episode returns (last axis)."""
    return jnp.sort(returns, axis=-1)[..., :k].mean(-1)


def tournament(key: jax.Array, fitness: jax.Array, n: int, size: int) -> jax.Array:
    """n winners of tournaments of `size` individuals drawn with replacement (the fittest of each draw wins)."""
    idx = jax.random.randint(key, (n, size), 0, fitness.shape[0])
    return idx[jnp.arange(n), jnp.argmax(fitness[idx], axis=1)]


def crossover(key: jax.Array, a: dict, b: dict) -> dict:
    """Row-wise uniform crossover: each output unit (row of every weight tensor) comes from either parent."""
    leaves, tree = jax.tree.flatten(a)
    # one draw for the rows of every tensor (a draw per tensor inlines a threefry per tensor: slow to compile)
    pick = jax.random.bernoulli(key, 0.5, (sum(x.shape[0] for x in leaves),))
    out, row = [], 0
    for x, y in zip(leaves, jax.tree.leaves(b)):
        out.append(jnp.where(pick[row: row + x.shape[0]].reshape((x.shape[0],) + (1,) * (x.ndim - 1)), x, y))
        row += x.shape[0]
    return jax.tree.unflatten(tree, out)


def mutate(key: jax.Array, params: dict, args: Args) -> dict:
    """ERL mutation (Khadka & Tumer 2018): on a fraction of each tensor's weights add Gaussian noise scaled by
    the weight's magnitude; rarely a super-mutation (x10) or a reset to N(0, 0.1); then clip."""
    # all weights as one vector, so the randomness is two draws rather than five per tensor (each draw inlines a
    # threefry: per-tensor draws made the GA most of the generation's compile time)
    w, unravel = ravel_pytree(params)
    k_u, k_n = jax.random.split(key)
    sel, sup, reset = jax.random.uniform(k_u, (3,) + w.shape) < jnp.array([args.mutation_frac, args.super_mutation_prob, args.reset_prob])[:, None]
    noise, fresh = jax.random.normal(k_n, (2,) + w.shape)
    new = jnp.where(reset, fresh * 0.1, w + noise * args.mutation_strength * jnp.abs(w) * jnp.where(sup, 10.0, 1.0))
    return unravel(jnp.clip(jnp.where(sel, new, w), -args.weight_clip, args.weight_clip))


def ga_step(key: jax.Array, pop: dict, fitness: jax.Array, args: Args) -> tuple[dict, jax.Array]:
    """Next population: the `num_elites` best unchanged (best first), the rest children of tournament winners
    (crossover with `crossover_prob`, mutation with `mutation_prob`). Returns (population, elite indices)."""
    P, E = fitness.shape[0], args.num_elites
    elites = jnp.argsort(-fitness)[:E]
    k_a, k_b, k_x, k_m, k_px, k_pm = jax.random.split(key, 6)
    n = P - E
    pa, pb = tournament(k_a, fitness, n, args.tournament_size), tournament(k_b, fitness, n, args.tournament_size)

    def child(kx, km, px, pm, a, b):
        c = jax.tree.map(lambda x, y: jnp.where(px, x, y), crossover(kx, a, b), a)
        return jax.tree.map(lambda x, y: jnp.where(pm, x, y), mutate(km, c, args), c)

    take = lambda idx: jax.tree.map(lambda x: x[idx], pop)  # noqa: E731
    children = jax.vmap(child)(jax.random.split(k_x, n), jax.random.split(k_m, n),
                               jax.random.bernoulli(k_px, args.crossover_prob, (n,)), jax.random.bernoulli(k_pm, args.mutation_prob, (n,)),
                               take(pa), take(pb))
    return jax.tree.map(lambda e, c: jnp.concatenate([e, c]), take(elites), children), elites


def inject(pop: dict, fitness: jax.Array, actor: dict, actor_fitness: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
    """The learner's actor replaces the worst individual; returns (population, fitness, slot)."""
    worst = jnp.argmin(fitness)
    pop = jax.tree.map(lambda p, a: p.at[worst].set(a), pop, actor)
    return pop, fitness.at[worst].set(actor_fitness), worst


def make_erl(args: Args, env_params: EnvParams, data_shapes: MarketData, n_inv: int, inv: tuple, mesh: Optional[Mesh] = None):
    """Returns (init(rng) -> RunnerState, chunk(RunnerState, data) -> (RunnerState, metrics), actor, critic).

    Market data is an argument of the jitted functions, never a closed-over constant (it would be baked
    into the compiled program: slow to compile and to run). With a `mesh` (axis "d"), the population and
    each TD3 batch are split over its devices; XLA gathers what selection needs (every fitness) and sums
    the TD3 gradients across devices (the same gradient as on one device)."""
    shard = (lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec("d")))) if mesh is not None else (lambda x: x)  # noqa: E731
    actor, critic = Actor(args, inv), Critic(args, inv)
    L = args.trading_days + args.settlement_days
    E, P = args.episodes_per_agent, args.pop_size
    obs_dummy = get_obs(jnp.int32(args.window - 1), env_params, data_shapes)
    small_dim = n_inv * SMALL_PER_STOCK + 1
    actor_tx = optax.adam(args.actor_lr)
    critic_tx = optax.adam(args.critic_lr)

    def init(rng) -> RunnerState:
        rng, k_pop, k_a, k_c = jax.random.split(rng, 4)
        init_actor = jax.jit(actor.init)  # one init per individual: vmapped flax inits (orthogonal LSTM kernels) can deadlock XLA:CPU
        pop = jax.tree.map(lambda *x: jnp.stack(x), *[init_actor(k, obs_dummy) for k in jax.random.split(k_pop, P)])
        a_params = init_actor(k_a, obs_dummy)
        c_params = jax.jit(critic.init)(k_c, obs_dummy, jnp.zeros(small_dim), jnp.zeros((n_inv, 2)))
        learner = Learner(a_params, c_params, a_params, c_params, actor_tx.init(a_params), critic_tx.init(c_params), jnp.int32(0))
        cap = args.buffer_size
        replay = Replay(t=jnp.zeros(cap, jnp.int32), small=jnp.zeros((cap, small_dim)), action=jnp.zeros((cap, n_inv, 2)),
                        reward=jnp.zeros(cap), done=jnp.zeros(cap, bool), next_small=jnp.zeros((cap, small_dim)), ptr=jnp.int32(0), size=jnp.int32(0))
        return RunnerState(pop, learner, replay, rng, jnp.int32(0))

    def play(params, start, key, noise, data):
        """One episode from `start`; returns (return, transitions [L, ...])."""

        def _env_step(state, k):
            obs = get_obs(state.t, env_params, data)
            a = actor.apply(params, obs)
            a = jnp.clip(a + noise * jax.random.normal(k, a.shape), 0.0, 1.0)
            coef, target = scale_action(a, env_params)
            small = small_state(state, env_params, data)
            nxt, reward, done, _ = step(state, coef, target, env_params, data)
            return nxt, (state.t, small, a, reward, done, small_state(nxt, env_params, data))

        _, tr = jax.lax.scan(_env_step, reset_at(start, env_params), jax.random.split(key, L))
        return tr[3].sum(), n_step_transitions(tr)

    def n_step_transitions(tr):
        """(t, small, a, r, done, next_small) per step -> the same with r the discounted sum of the next n rewards,
        next_small the small state n days later (the bootstrap day is always t + n) and done whether the episode
        ends within the n steps (then nothing is bootstrapped)."""
        t, small, a, r, d, nsmall = tr
        n = args.n_step
        k = jnp.arange(L)
        r_pad = jnp.concatenate([r, jnp.zeros(n - 1)])
        r_n = sum(args.gamma**j * r_pad[j: j + L] for j in range(n))
        return t, small, a, r_n, k + n - 1 >= L - 1, nsmall[jnp.minimum(k + n - 1, L - 1)]

    def add_transitions(replay: Replay, tr) -> Replay:
        """Writes a batch of transitions (any leading axes) into the circular memory."""
        t, small, a, r, d, nsmall = tr
        n = t.size
        t, r, d = t.reshape(-1), r.reshape(-1), d.reshape(-1)
        small, nsmall, a = small.reshape(n, small_dim), nsmall.reshape(n, small_dim), a.reshape(n, n_inv, 2)
        idx = (replay.ptr + jnp.arange(n)) % args.buffer_size
        return Replay(replay.t.at[idx].set(t), replay.small.at[idx].set(small), replay.action.at[idx].set(a), replay.reward.at[idx].set(r),
                      replay.done.at[idx].set(d), replay.next_small.at[idx].set(nsmall), (replay.ptr + n) % args.buffer_size,
                      jnp.minimum(replay.size + n, args.buffer_size))

    def td3_update(learner: Learner, batch, key, data):
        """One TD3 step: twin-critic regression to the clipped double-Q target with target policy smoothing;
        every `policy_delay` steps an actor step on Q1 and soft target updates (Fujimoto et al. 2018)."""
        t, small, a, r, d, nsmall = batch
        obs = jax.vmap(get_obs, in_axes=(0, None, None))(t, env_params, data)
        next_obs = jax.vmap(get_obs, in_axes=(0, None, None))(t + args.n_step, env_params, data)  # unused where done
        noise = jnp.clip(jax.random.normal(key, a.shape) * args.policy_noise, -args.noise_clip, args.noise_clip)
        next_a = jnp.clip(jax.vmap(actor.apply, in_axes=(None, 0))(learner.actor_target, next_obs) + noise, 0.0, 1.0)
        q1_t, q2_t = jax.vmap(critic.apply, in_axes=(None, 0, 0, 0))(learner.critic_target, next_obs, nsmall, next_a)
        y = r + args.gamma**args.n_step * (1.0 - d) * jnp.minimum(q1_t, q2_t)

        def critic_loss(cp):
            q1, q2 = jax.vmap(critic.apply, in_axes=(None, 0, 0, 0))(cp, obs, small, a)
            return ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

        c_loss, c_grads = jax.value_and_grad(critic_loss)(learner.critic)
        c_upd, critic_opt = critic_tx.update(c_grads, learner.critic_opt)
        critic_params = optax.apply_updates(learner.critic, c_upd)

        def actor_loss(ap):
            acts = jax.vmap(actor.apply, in_axes=(None, 0))(ap, obs)
            q1, _ = jax.vmap(critic.apply, in_axes=(None, 0, 0, 0))(critic_params, obs, small, acts)
            return -q1.mean()

        def _actor_step(_):
            a_loss, a_grads = jax.value_and_grad(actor_loss)(learner.actor)
            a_upd, actor_opt = actor_tx.update(a_grads, learner.actor_opt)
            actor_params = optax.apply_updates(learner.actor, a_upd)
            soft = lambda tgt, src: jax.tree.map(lambda x, y: (1 - args.tau) * x + args.tau * y, tgt, src)  # noqa: E731
            return actor_params, actor_opt, soft(learner.actor_target, actor_params), soft(learner.critic_target, critic_params), a_loss

        def _skip(_):
            return learner.actor, learner.actor_opt, learner.actor_target, learner.critic_target, jnp.float32(jnp.nan)

        actor_params, actor_opt, actor_target, critic_target, a_loss = jax.lax.cond(learner.updates % args.policy_delay == 0, _actor_step, _skip, None)
        return Learner(actor_params, critic_params, actor_target, critic_target, actor_opt, critic_opt, learner.updates + 1), (c_loss, a_loss)

    def generation(runner: RunnerState, data: MarketData):
        pop, learner, replay, rng, gen = runner
        rng, k_start, k_play, k_lstart, k_lplay, k_rl, k_ga = jax.random.split(rng, 7)

        # EVALUATE THE POPULATION (and the learner, greedily) on the same random training slices
        starts = jax.vmap(sample_start, in_axes=(0, None, None))(jax.random.split(k_start, E), env_params, data)
        play_keys = jax.random.split(k_play, E)
        play_all = jax.vmap(play, in_axes=(None, 0, 0, None, None))
        pop_returns, pop_tr = jax.vmap(play_all, in_axes=(0, None, None, None, None))(pop, starts, play_keys, 0.0, data)  # [P, E]
        learner_returns, learner_tr = play_all(learner.actor, starts, play_keys, 0.0, data)
        fitness = worst_k_mean(pop_returns, args.worst_k)
        learner_fitness = worst_k_mean(learner_returns, args.worst_k)

        # EXPLORE: the learner with exploration noise on fresh slices; every transition feeds the replay memory
        l_starts = jax.vmap(sample_start, in_axes=(0, None, None))(jax.random.split(k_lstart, E), env_params, data)
        explore_returns, explore_tr = play_all(learner.actor, l_starts, jax.random.split(k_lplay, E), args.expl_noise, data)
        for tr in (pop_tr, learner_tr, explore_tr):
            replay = add_transitions(replay, tr)

        # TD3 UPDATES
        def _rl_step(learner, key):
            k_idx, k_upd = jax.random.split(key)
            idx = jax.random.randint(k_idx, (args.batch_size,), 0, replay.size)
            batch = (replay.t[idx], replay.small[idx], replay.action[idx], replay.reward[idx], replay.done[idx].astype(jnp.float32), replay.next_small[idx])
            batch = shard(batch)  # each device computes the losses of its share of the batch
            return td3_update(learner, batch, k_upd, data)

        learner, (c_loss, a_loss) = jax.lax.scan(_rl_step, learner, jax.random.split(k_rl, args.rl_updates))

        # INJECT the learner's actor into the worst slot, then EVOLVE
        do_inject = (gen + 1) % args.inject_every == 0
        inj_pop, inj_fit, slot = inject(pop, fitness, learner.actor, learner_fitness)
        pop = jax.tree.map(lambda a, b: jnp.where(do_inject, a, b), inj_pop, pop)
        sel_fitness = jnp.where(do_inject, inj_fit, fitness)
        new_pop, elites = ga_step(k_ga, pop, sel_fitness, args)
        new_pop = shard(new_pop)  # the next generation stays split over the devices (each plays its slice)
        metrics = dict(fitness_mean=fitness.mean(), fitness_max=fitness.max(), fitness_min=fitness.min(), learner_fitness=learner_fitness,
                       explore_return=explore_returns.mean(), critic_loss=c_loss.mean(), actor_loss=jnp.nanmean(a_loss), injected=do_inject,
                       injected_is_elite=do_inject & jnp.any(elites == slot), champion_fitness=sel_fitness.max(), replay_size=replay.size)
        return RunnerState(new_pop, learner, replay, rng, gen + 1), metrics

    def chunk(runner: RunnerState, data: MarketData):
        """`chunk_generations` generations in one lax.scan (compiled once)."""
        return jax.lax.scan(lambda r, _: generation(r, data), runner, None, args.chunk_generations)

    return init, chunk, actor, critic


# ---- OUTER LOOP ----
def init_distributed(args: Args) -> None:
    """Multi-host: every process runs the same command with its own --process-id; jax.distributed.initialize
    connects them, after which jax.devices() lists the devices of all hosts."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if all(f is None for f in flags):
        return
    if any(f is None for f in flags):
        raise DataError("multi-host needs --coordinator-address, --num-processes and --process-id together. Fix: pass all three (see README)")
    if not (args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
        raise DataError(f"--process-id {args.process_id} must be in [0, --num-processes {args.num_processes}). Fix: number the processes 0..P-1")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id)


def make_mesh(args: Args) -> Mesh:
    """A one-axis mesh ("d") over --devices devices of every process; the population and TD3 batch divide over it."""
    local = jax.local_devices()
    n = len(local) if args.devices is None else args.devices
    if not 1 <= n <= len(local):
        raise DataError(f"--devices {n}: this process has {len(local)} {local[0].platform} device(s). Fix: pass --devices between 1 and {len(local)}")
    devices = [d for p in range(jax.process_count()) for d in [x for x in jax.devices() if x.process_index == p][:n]]
    D = len(devices)
    if args.pop_size % D:
        raise DataError(f"--pop-size {args.pop_size} does not divide over {D} devices. Fix: pass a multiple of {D} to --pop-size, or a --devices that divides it")
    if args.batch_size % D:
        raise DataError(f"--batch-size {args.batch_size} does not divide over {D} devices. Fix: pass a multiple of {D} to --batch-size, or change --devices")
    return Mesh(np.array(devices), ("d",))


def runner_shardings(runner: RunnerState, mesh: Mesh) -> RunnerState:
    """The population split over the devices (leading axis); learner, replay memory, RNG and counters copied on each."""
    split, copy = NamedSharding(mesh, PartitionSpec("d")), NamedSharding(mesh, PartitionSpec())
    return RunnerState(jax.tree.map(lambda _: split, runner.pop), jax.tree.map(lambda _: copy, runner.learner),
                       jax.tree.map(lambda _: copy, runner.replay), copy, copy)


def place(tree, shardings):
    """Host or single-device arrays -> global arrays laid out by `shardings` (every process passes the same values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=np.asarray(x): x[idx]), tree, shardings)


def fetch(tree):
    """Global (possibly sharded, possibly multi-host) arrays -> NumPy arrays on every process."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)


def save_checkpoint(path: Path, runner: RunnerState, extra: dict) -> None:
    """flax.serialization msgpack of the whole runner state: population, learner (params, targets, optimisers),
    replay memory, RNG and counters. Host arrays without any device layout, so a checkpoint resumes on any
    number of devices. Every process calls it (the gather is collective); process 0 writes."""
    runner = fetch(runner)
    if jax.process_index() != 0:
        return
    payload = {"runner": flax.serialization.to_state_dict(runner), "extra": json.dumps(extra)}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_checkpoint(path: Path, template: RunnerState) -> tuple[RunnerState, dict]:
    """Restores `save_checkpoint`'s file into the structure of `template`."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        runner = flax.serialization.from_state_dict(template, payload["runner"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass a run folder written by erl_trader.py") from None
    except Exception as e:
        raise DataError(f"{path}: checkpoint does not match this configuration ({type(e).__name__}). Fix: resume with the run's own config.json") from None
    return runner, json.loads(payload["extra"])


def save_policy(path: Path, params, args: Args) -> None:
    """A policy-only checkpoint (actor params + config) for --eval-only. Written by process 0 only."""
    if jax.process_index() != 0:
        return
    payload = {"params": flax.serialization.to_state_dict(params), "config": json.dumps(dataclasses.asdict(args)), "kind": "erl_actor"}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_policy(path: str, actor: Actor, obs_dummy: jax.Array):
    """Loads a policy checkpoint into `actor`'s parameter structure (one-line errors on mismatch)."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        assert payload.get("kind") == "erl_actor"
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass runs/NAME/best.msgpack") from None
    except Exception:
        raise DataError(f"{path}: not an erl_trader policy checkpoint. Fix: pass runs/NAME/best.msgpack") from None
    template = jax.jit(actor.init)(jax.random.PRNGKey(0), obs_dummy)
    try:
        params = flax.serialization.from_state_dict(template, payload["params"])
    except Exception:
        raise DataError(f"{path}: network does not fit this data/configuration. Fix: use the data and flags it was trained with") from None
    if jax.tree.map(jnp.shape, params) != jax.tree.map(jnp.shape, template):
        raise DataError(f"{path}: network shapes differ from this data/configuration. Fix: use the data and flags it was trained with")
    return params


def policy_config(path: str) -> dict:
    try:
        return json.loads(flax.serialization.msgpack_restore(Path(path).read_bytes())["config"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass runs/NAME/best.msgpack") from None
    except Exception:
        raise DataError(f"{path}: not an erl_trader policy checkpoint. Fix: pass runs/NAME/best.msgpack") from None


# ---- BACKTEST ----
def make_backtest(env_params: EnvParams, data: MarketData, n_days: int):
    """Jitted contiguous pass over a split: one account, trading every day but the last `settlement_days`.

    `policy(policy_args, key, obs, t) -> action in [0, 1]^(n x 2)`; `policy` is static, `policy_args` (actor
    params) traced, so new parameters do not recompile (t, the decision day, lets a test's oracle read the
    planted signal). Returns per-day arrays (equity, opened, exits)."""
    bt_params = env_params.replace(trading_days=n_days - env_params.settlement_days)

    def run(policy, policy_args, key):
        start = data.lo + env_params.window - 1

        def _bt_step(state, k):
            a = policy(policy_args, k, get_obs(state.t, bt_params, data), state.t)
            coef, target = scale_action(a, bt_params)
            nxt, reward, done, info = step(state, coef, target, bt_params, data)
            return nxt, dict(t=nxt.t, equity=nxt.equity, reward=reward, n_held=nxt.held.sum(), **{k2: info[k2] for k2 in
                             ("opened", "exits", "exit_col", "exit_price", "exit_entry", "exit_day")})

        _, out = jax.lax.scan(_bt_step, reset_at(start, bt_params), jax.random.split(key, n_days))
        return out

    return jax.jit(run, static_argnums=0)


def split_days(info: dict, split: str, args: Args) -> int:
    lo, hi = info["bounds"][split]
    return hi - lo - args.window


@functools.lru_cache(maxsize=None)
def actor_policy(actor: Actor):
    """The deterministic actor as a backtest policy; policy_args = its params."""
    return lambda params, key, obs, t: actor.apply(params, obs)


@functools.lru_cache(maxsize=None)
def random_policy(n_inv: int):
    """Uniform random coefficients and targets."""
    return lambda policy_args, key, obs, t: jax.random.uniform(key, (n_inv, 2))


def period_metrics(equity: np.ndarray, periods_per_year: float = 252.0) -> dict:
    """Metrics of a daily equity curve starting at 1.0 (per-day returns, annualised with 252 days)."""
    eq = np.r_[1.0, equity]
    rets = eq[1:] / eq[:-1] - 1
    years = max(len(rets) / periods_per_year, 1e-9)
    total = eq[-1] - 1
    ann = (1 + total) ** (1 / years) - 1 if total > -1 else -1.0
    down = rets[rets < 0]
    dd = 1 - eq / np.maximum.accumulate(eq)
    max_dd = float(dd.max())
    sd = rets.std()
    return dict(total_return=float(total), annualised_return=float(ann), annualised_volatility=float(sd * np.sqrt(periods_per_year)),
                sharpe=float(rets.mean() / sd * np.sqrt(periods_per_year)) if sd > 0 else 0.0,
                sortino=float(rets.mean() / np.sqrt((np.minimum(rets, 0) ** 2).mean()) * np.sqrt(periods_per_year)) if len(down) else 0.0,
                max_drawdown=max_dd, calmar=float(ann / max_dd) if max_dd > 0 else 0.0, days=int(len(rets)))


def trade_list(out: dict, info: dict, cost_bps: float) -> list[dict]:
    """Closed trades from a backtest's per-day exit arrays."""
    trades = []
    dates = info["dates"]
    day_str = lambda i: str(np.datetime64(int(dates[i]), "D"))  # noqa: E731
    for d in range(len(out["t"])):
        for s in np.flatnonzero(out["exits"][d]):
            entry, price = float(out["exit_entry"][d][s]), float(out["exit_price"][d][s])
            c = cost_bps / 10_000
            trades.append(dict(ticker=info["tickers"][int(out["exit_col"][d][s])], entry_date=day_str(int(out["exit_day"][d][s])),
                               exit_date=day_str(int(out["t"][d])), entry_price=entry, exit_price=price,
                               return_pct=((price * (1 - c)) / (entry / (1 - c)) - 1) * 100))
    return trades


def trade_metrics(trades: list[dict], n_held: np.ndarray) -> dict:
    r = np.array([t["return_pct"] for t in trades])
    wins, losses = r[r > 0], r[r <= 0]
    return dict(trades=len(trades), win_rate=float((r > 0).mean()) if len(r) else 0.0,
                profit_factor=float(wins.sum() / -losses.sum()) if losses.sum() < 0 else (float("inf") if len(wins) else 0.0),
                average_trade_pct=float(r.mean()) if len(r) else 0.0, exposure=float((n_held > 0).mean()))


def buy_and_hold(data: MarketData, info: dict, split: str, args: Args) -> np.ndarray:
    """Equal-weight buy-and-hold of the investable stocks valid on the first decision day, bought at the next
    open with costs; a delisted stock is held at its last close (its price is carried forward)."""
    lo, hi = info["bounds"][split]
    t0 = lo + args.window - 1
    inv = np.asarray(info["inv"])
    valid0 = np.asarray(data.valid[t0, inv]) & np.asarray(data.valid[t0 + 1, inv])
    cols = inv[valid0]
    c = args.cost_bps / 10_000
    entry = np.asarray(data.open[t0 + 1, cols], np.float64)
    close = np.asarray(data.close[t0 + 1: hi, :], np.float64)[:, cols]
    eq = (close / entry).mean(1) * (1 - c)
    eq[-1] *= 1 - c
    return eq


def backtest_report(actor: Actor, params, datasets: dict, info: dict, split: str, args: Args, env_params: EnvParams, extra_policies=None):
    """Champion vs random vs equal-weight buy-and-hold on one split: (report, champion's outputs, curves)."""
    data = datasets[split]
    n_days = split_days(info, split, args)
    bt = make_backtest(env_params, data, n_days)
    n_inv = len(info["inv"])
    policies = {"champion": (actor_policy(actor), params), "random": (random_policy(n_inv), None)}
    policies.update(extra_policies or {})
    report, curves, champion_out = {"split": split, "annualisation": "daily returns, x sqrt(252) and 252 trading days a year"}, {}, None
    lo, hi = info["bounds"][split]
    report["start"], report["end"] = str(np.datetime64(int(info["dates"][lo]), "D")), str(np.datetime64(int(info["dates"][hi - 1]), "D"))
    for name, (policy, policy_args) in policies.items():
        out = {k: np.asarray(v) for k, v in bt(policy, policy_args, jax.random.PRNGKey(args.seed)).items()}
        trades = trade_list(out, info, args.cost_bps)
        report[name] = dict(period_metrics(out["equity"]), **trade_metrics(trades, out["n_held"]))
        curves[name] = out["equity"]
        if name == "champion":
            champion_out = (out, trades)
    bh = buy_and_hold(data, info, split, args)
    report["buy_and_hold"] = dict(period_metrics(bh), trades=int(len(np.flatnonzero(np.asarray(data.valid[lo + args.window - 1, info["inv"]])))))
    curves["buy_and_hold"] = bh
    return report, champion_out, curves


def write_backtest_outputs(run_dir: Path, report: dict, champion_out, curves: dict, info: dict, split: str, args: Args) -> None:
    if jax.process_index() != 0:  # multi-host: process 0 writes
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    _, trades = champion_out
    lines = ["ticker,entry_date,exit_date,entry_price,exit_price,return_pct"]
    lines += [f"{t['ticker']},{t['entry_date']},{t['exit_date']},{t['entry_price']:.6g},{t['exit_price']:.6g},{t['return_pct']:.4f}" for t in trades]
    (run_dir / "trades.csv").write_text("\n".join(lines) + "\n")
    lo, _ = info["bounds"][split]
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, eq in curves.items():
        days = info["dates"][lo + args.window: lo + args.window + len(eq)].astype("datetime64[D]")
        ax.plot(days, eq, label=name, lw=1)
    ax.set_title(f"{split} split equity (start = 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "equity.png", dpi=100)
    plt.close(fig)


def champion_params(runner: RunnerState):
    """The population's first slot: after a GA step the best individual of the last evaluation (elites first), as host arrays."""
    return jax.tree.map(lambda x: x[0], fetch(runner.pop))


# ---- MAIN ----
def parse_args(argv) -> Args:
    """tyro parsing, with its error box folded into one line (exit status 2); --help prints as usual."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return tyro.cli(Args, args=argv)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return tyro.cli(Args, args=argv)
    except SystemExit:
        lines = [ln.strip(" │╭╮╰╯─-") for ln in buf.getvalue().splitlines()]
        lines = [ln for ln in lines if ln]
        detail = lines[1] if len(lines) > 1 else "bad command line"
        raise DataError(f"{detail}. Fix: see python erl_trader.py --help") from None


def check_args(args: Args) -> None:
    """Flag combinations that cannot work, caught before any compilation."""
    for name in ("pop_size", "generations", "episodes_per_agent", "worst_k", "tournament_size", "inject_every", "batch_size", "window",
                 "trading_days", "max_positions", "max_holding_days", "chunk_generations", "eval_every", "hidden", "policy_delay", "n_step"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)}). Fix: pass a positive value")
    if args.worst_k > args.episodes_per_agent:
        raise DataError(f"--worst-k {args.worst_k} exceeds --episodes-per-agent {args.episodes_per_agent}. Fix: lower --worst-k")
    if not 0 <= args.num_elites < args.pop_size:
        raise DataError(f"--num-elites {args.num_elites} must be in [0, --pop-size). Fix: lower it")
    if args.generations % args.chunk_generations:
        raise DataError(f"--generations {args.generations} is not a multiple of --chunk-generations {args.chunk_generations}. Fix: change one")
    if not args.target_min < args.target_max:
        raise DataError("--target-min must be below --target-max. Fix: e.g. --target-min 1 --target-max 10")
    if args.eval_split not in ("train", "val", "test"):
        raise DataError(f"--eval-split '{args.eval_split}' is not train, val or test. Fix: pick one of them")


def hparam_table(args: Args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())


LAYOUT_FLAGS = ("devices", "coordinator_address", "num_processes", "process_id")  # how to run, not what: a resume picks its own


def train_and_report(args: Args) -> dict:
    """The whole job: load data, evolve in chunks (logging, checkpoints, validation), backtest on the test split."""
    from tensorboardX import SummaryWriter

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise DataError(f"{run_dir}: no config.json. Fix: pass a run folder written by erl_trader.py")
        saved = json.loads((run_dir / "config.json").read_text())
        args = dataclasses.replace(args, **{k: v for k, v in saved.items() if k not in ("resume", "stop_after", "eval_only", "checkpoint") + LAYOUT_FLAGS})
    elif args.eval_only:
        if not args.checkpoint:
            raise DataError("--eval-only needs --checkpoint PATH. Fix: pass runs/NAME/best.msgpack")
        keep = ("data", "eval_only", "checkpoint", "eval_split", "out_dir", "run_name", "train_end", "val_end", "seed")
        args = dataclasses.replace(args, **{k: v for k, v in policy_config(args.checkpoint).items() if k not in keep and k in Args.__dataclass_fields__})
        run_dir = Path(args.checkpoint).parent if args.run_name is None else Path(args.out_dir) / args.run_name
    else:
        args = dataclasses.replace(args, run_name=args.run_name or f"erl_{Path(args.data).stem}_{args.seed}_{int(time.time())}")
        run_dir = Path(args.out_dir) / args.run_name

    mesh = None if args.eval_only else make_mesh(args)  # a layout that cannot work fails before anything is written
    datasets, info = load_data(args)
    env_params = env_params_from_args(args)
    inv = tuple(info["inv"])
    actor = Actor(args, inv)
    obs_dummy = get_obs(jnp.int32(args.window - 1), env_params, datasets["train"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        params = load_policy(args.checkpoint, actor, obs_dummy)
        report, champ, curves = backtest_report(actor, params, datasets, info, args.eval_split, args, env_params)
        write_backtest_outputs(run_dir, report, champ, curves, info, args.eval_split, args)
        print(json.dumps(summary_rows(report), indent=1))
        return report
    main_process = jax.process_index() == 0  # multi-host: only process 0 writes files
    if not args.resume and main_process:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))

    t0 = time.time()
    init, chunk, actor, critic = make_erl(args, env_params, datasets["train"], len(inv), inv, mesh)
    runner = init(jax.random.PRNGKey(args.seed))
    learner_at_start = runner.learner.actor  # the same on --resume (init is deterministic): the report shows what TD3 learned
    ckpt = run_dir / "checkpoint.msgpack"
    extra = {"chunk": 0, "best_val": -1e30, "best_from": "", "elapsed": 0.0}
    if args.resume:
        runner, extra = load_checkpoint(ckpt, runner)
    shardings, copy = runner_shardings(runner, mesh), NamedSharding(mesh, PartitionSpec())
    runner, train_data = place(runner, shardings), place(datasets["train"], copy)  # market data: a copy on every device
    if not args.resume:
        save_checkpoint(ckpt, runner, extra)  # the state before training: a NaN in the first chunk still leaves a good checkpoint
    compiled = jax.jit(chunk, in_shardings=(shardings, copy), out_shardings=(shardings, copy)).lower(runner, train_data).compile()
    compile_s = time.time() - t0
    num_chunks = args.generations // args.chunk_generations
    L = args.trading_days + args.settlement_days
    steps_per_gen = (args.pop_size + 2) * args.episodes_per_agent * L
    replay_bytes = sum(x.dtype.itemsize * int(np.prod(x.shape[1:])) for x in runner.replay[:6])
    print(f"run {run_dir}  generations {args.generations}  pop {args.pop_size}  env steps/generation {steps_per_gen}  "
          f"replay {replay_bytes} bytes/transition  devices {mesh.devices.size} ({args.pop_size // mesh.devices.size} actors each, "
          f"{jax.process_count()} process(es))  compile {compile_s:.1f}s", flush=True)
    val_bt = make_backtest(env_params, datasets["val"], split_days(info, "val", args))
    writer = SummaryWriter(str(run_dir), write_to_disk=main_process)
    if not args.resume:
        writer.add_text("hyperparameters", hparam_table(args))
    metrics_file = open(run_dir / "metrics.jsonl" if main_process else os.devnull, "a")
    interrupted = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    start_chunk, elapsed0, t_start = extra["chunk"], extra["elapsed"], time.time()
    status = "done"
    try:
        for c in range(start_chunk, num_chunks):
            tc = time.time()
            new_runner, metrics = compiled(runner, train_data)
            metrics = fetch(metrics)
            if not all(np.isfinite(metrics[k]).all() for k in ("critic_loss", "fitness_mean", "learner_fitness")):
                status = "nan"
                print(f"error: NaN/inf at chunk {c + 1}; stopping. The last good checkpoint is {ckpt}. Fix: lower --critic-lr/--actor-lr or check the data",
                      file=sys.stderr, flush=True)
                break
            runner = new_runner
            dt = time.time() - tc
            sps = steps_per_gen * args.chunk_generations / dt
            elapsed = elapsed0 + time.time() - t_start
            eta = (time.time() - t_start) / (c + 1 - start_chunk) * (num_chunks - c - 1)
            for g in range(args.chunk_generations):
                gen = c * args.chunk_generations + g + 1
                row = {k: (bool(v[g]) if v.dtype == bool else float(v[g])) for k, v in metrics.items()}
                row.update(generation=gen, env_steps=gen * steps_per_gen, sps=sps, elapsed=elapsed)
                if g == args.chunk_generations - 1 and (gen % args.eval_every == 0 or gen == args.generations):
                    # candidates: the population's champion and the TD3 actor (part of the system, injected or not yet)
                    for who, params in (("champion", champion_params(runner)), ("learner", fetch(runner.learner.actor))):
                        out = val_bt(actor_policy(actor), params, jax.random.PRNGKey(args.seed))
                        row[f"{who}_val_return"] = float(np.asarray(out["equity"])[-1] - 1.0)
                        writer.add_scalar(f"eval/{who}_val_return", row[f"{who}_val_return"], row["env_steps"])
                        if row[f"{who}_val_return"] > extra["best_val"]:
                            extra.update(best_val=row[f"{who}_val_return"], best_from=f"{who} of generation {gen}")
                            save_policy(run_dir / "best.msgpack", params, args)
                for tag in ("fitness_mean", "fitness_max", "fitness_min", "learner_fitness", "explore_return", "champion_fitness"):
                    writer.add_scalar(f"charts/{tag}", row[tag], row["env_steps"])
                writer.add_scalar("charts/injected_is_elite", float(row["injected_is_elite"]), row["env_steps"])
                for tag in ("critic_loss", "actor_loss"):
                    writer.add_scalar(f"losses/{tag}", row[tag], row["env_steps"])
                writer.add_scalar("perf/SPS", sps, row["env_steps"])
                metrics_file.write(json.dumps(row) + "\n")
                inj = ("elite" if row["injected_is_elite"] else "not elite") if row["injected"] else "-"
                val = f"  val {row['champion_val_return']:+.4f} (learner {row['learner_val_return']:+.4f})" if "champion_val_return" in row else ""
                print(f"gen {gen:4d}/{args.generations}  fitness mean {row['fitness_mean']:+.3f} max {row['fitness_max']:+.3f} min {row['fitness_min']:+.3f}"
                      f"  learner {row['learner_fitness']:+.3f}{val}  critic {row['critic_loss']:.4f} actor {row['actor_loss']:+.4f}  injected {inj}"
                      f"  env-steps/s {sps:,.0f}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", flush=True)
            metrics_file.flush()
            extra = dict(extra, chunk=c + 1, elapsed=elapsed)
            save_checkpoint(ckpt, runner, extra)
            if interrupted["flag"] or (args.stop_after is not None and c + 1 - start_chunk >= args.stop_after):
                status = "stopped"
                print(f"stopped after chunk {c + 1}; checkpoint saved. Continue with: python erl_trader.py --resume {run_dir}", flush=True)
                break
    finally:
        signal.signal(signal.SIGINT, old_handler)
        metrics_file.close()
        writer.close()
    if status != "done":
        return {"status": status, "run_dir": str(run_dir)}

    final = champion_params(runner)
    save_policy(run_dir / "final.msgpack", final, args)
    params = load_policy(str(run_dir / "best.msgpack"), actor, obs_dummy) if main_process else final
    if jax.process_count() > 1:  # process 0's best policy to every process: all play the test split (in step), process 0 writes
        params = multihost_utils.broadcast_one_to_all(params)
    learner_rows = {"td3_learner": (actor_policy(actor), fetch(runner.learner.actor)), "td3_learner_at_start": (actor_policy(actor), fetch(learner_at_start))}
    report, champ, curves = backtest_report(actor, params, datasets, info, "test", args, env_params, learner_rows)
    report["selected_by"] = f"best validation return of the population's champion and the TD3 actor (best.msgpack: the {extra['best_from']})"
    write_backtest_outputs(run_dir, report, champ, curves, info, "test", args)
    print(json.dumps(summary_rows(report), indent=1))
    return report


def summary_rows(report: dict) -> dict:
    return {name: {k: round(report[name][k], 4) for k in ("total_return", "sharpe", "max_drawdown", "trades")}
            for name in ("champion", "td3_learner", "td3_learner_at_start", "random", "buy_and_hold") if name in report}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        init_distributed(args)
        result = train_and_report(args)
    except DataError as e:
        print(f"erl_trader: error: {e}", file=sys.stderr)
        return 2
    return 1 if result.get("status") == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
