"""erl_trader.py: evolutionary RL (GA population + injected TD3 learner) on a daily stock universe, in one file.

    python erl_trader.py                         # S&P 500 sample: train to 2012, validate 2013-2016, test 2017-2022
    python erl_trader.py --pop-size 16 --extractor lstm
    python erl_trader.py --num-seeds 1 --seed 7    # one run; the default is 4 in one program (seeds 1..4), each selected alone
    python erl_trader.py --eval-only --checkpoint runs/NAME      # every seed's best.msgpack (or runs/NAME/seed0/best.msgpack)

One generation (jitted; generations run in a lax.scan, in chunks between which the host logs/checkpoints):
  1. every `inject_every` generations the TD3 learner's actor replaces the population's last individual (a GA
     child, not yet evaluated), so it is evaluated like the others (we record whether it becomes an elite);
  2. every actor of the population (one pytree, leading axis = pop) plays `episodes_per_agent` random
     training slices (vmap); fitness = mean of its `worst_k` worst episode returns;
  3. the TD3 learner plays the same slices greedily (its fitness) and with exploration noise;
     every transition goes into one replay memory (day index, action, reward, done, open positions);
  4. `rl_updates` TD3 steps (twin critics, target policy smoothing, delayed actor updates, soft targets);
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
import math
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional

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
from scipy import stats


# ---- ARGS ----
@dataclasses.dataclass(frozen=True)  # frozen: hashable, so modules holding it can key jit caches
class Args:
    """Evolutionary RL on a daily universe; every flag below is documented in --help."""

    data: str = "data/sp500_daily.npz"
    """daily .npz written by data_prep.py"""
    seed: int = 1
    """random seed; with --num-seeds N, seed k uses SEED+k (same seed, same result on one machine)"""
    run_name: Optional[str] = None
    """name of the folder under runs/ (default: erl_<data>_<seed>_<time>)"""
    train_end: str = "2013-01-01"
    """first day after the training split (YYYY-MM-DD) or a fraction of the days"""
    val_end: str = "2017-01-01"
    """first day after the validation split; the test split is the rest (one window embargoed between splits)"""
    walk_forward: int = 1
    """walk-forward folds: the days after --val-end's embargo are cut into K equal, consecutive test blocks; fold f
    shifts the split dates of fold 0 (--train-end/--val-end) by f blocks, trains, selects on its validation block and
    is tested on its own block (runs/NAME/fold<f>/); 1 = the single split"""
    walk_forward_train_days: Optional[int] = None
    """with --walk-forward: each fold trains on the last this many days before its training end (rolling windows;
    default: expanding, from the first day)"""
    num_seeds: int = 4
    """whole ERL runs trained at once with vmap (each its own population, TD3 learner, optimisers, replay memory and
    RNG): seed k (0..N-1) is the same run as --num-seeds 1 --seed SEED+k, with its own model selection, policy files
    runs/NAME/seed<k>/ and test backtest (the report's statistics need several)"""
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
    critic_warmup: int = 0
    """generations whose TD3 updates train the critics only, before the actor's first update (like TD3's learning
    starts): an actor trained on a cold critic can fall below --coef-threshold on every stock, where the critic's
    opening gate is flat and gives it no gradient back; the injected learner then spreads that "never open" policy"""
    expl_noise: float = 0.1
    """exploration noise of the learner's rollouts (action units in [0, 1])"""
    window: int = 20
    """days of features in an observation"""
    obs_norm: Literal["window", "train"] = "window"
    """how the actor's feature windows are scaled: 'window', each column z-scored over its own window (the design's
    instance normalisation; a feature's level is lost), or 'train', each stock's features standardised with the
    mean and std of its fold's training days and clipped to +-5 (the level is kept)"""
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
    lstm_layers: int = 1
    """stacked LSTM layers (lstm extractor), each bidirectional with --bidirectional"""
    attention_heads: int = 2
    """heads of the cross-attention from the learnable query over all columns (must divide --hidden)"""
    layer_norm: bool = False
    """a residual around the cross-attention (query + attention) and LayerNorm on it and on each stock's features"""
    stock_layers: tuple[int, ...] = ()
    """widths of the dense layers shared by all stocks between [stock features, context] and each stock's own output
    layer; empty: one layer of --hidden (the original system: 256 128 64)"""
    critic_stock_embedding: int = 0
    """width of a learned vector per investable stock in the critic's encoding of each stock (0: none, every stock is
    encoded by the same weights from its window alone, so the critic cannot learn that one stock's features predict
    and another's, identical in kind, do not)"""
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
    checkpoint_replay: bool = True
    """write the replay memory into checkpoint.msgpack after every chunk: --resume then continues bit for bit; with
    --no-checkpoint-replay checkpoints are small and fast to write (the memory is most of their size at scale), and a
    resumed run refills an empty memory (its TD3 updates differ from an uninterrupted run's)"""
    chunk_generations: int = 1
    """generations per jitted lax.scan chunk (the host logs and checkpoints between chunks)"""
    eval_every: int = 2
    """generations between validation runs of the champion and the TD3 learner's actor"""
    stop_after: Optional[int] = None
    """stop after this many chunks (of the walk-forward fold in progress; as if interrupted) and save a checkpoint;
    continue with --resume"""
    resume: Optional[str] = None
    """continue the run in this folder from its last checkpoint"""
    eval_only: bool = False
    """only backtest --checkpoint on --eval-split"""
    checkpoint: Optional[str] = None
    """--eval-only: a policy file (runs/NAME/seed<k>/best.msgpack or final.msgpack: that seed) or a run folder
    (runs/NAME: every seed's best.msgpack)"""
    eval_split: str = "test"
    """split backtested by --eval-only: train, val or test"""
    random_runs: int = 100
    """random policies played in one vmapped backtest of the report's split (keys split from --seed's): the
    distribution the report ranks the trained policy in (its percentile) and compares it with (P(improvement))"""
    trials: int = 1
    """configurations tried on this data so far, this one included, for the report's deflated Sharpe ratio (number of
    trials = seeds x folds x --trials)"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    devices: Optional[int] = None
    """devices per process to shard over (default: all local devices); the population (and the TD3 batch) is split
    across them"""
    coordinator_address: Optional[str] = None
    """multi-host: HOST:PORT of process 0 (calls jax.distributed.initialize; run the same command on every host)"""
    num_processes: Optional[int] = None
    """multi-host: number of processes (one per host)"""
    process_id: Optional[int] = None
    """multi-host: this process's index, 0..num_processes-1 (process 0 writes logs and checkpoints)"""

    def __post_init__(self):
        object.__setattr__(self, "stock_layers", tuple(self.stock_layers))  # a list from config.json, kept hashable


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
    valid: jax.Array  # [T, N] bool: a real price that day
    feature_valid: jax.Array  # [T, N] bool: valid, and every feature has its full look-back (tradable, shown as valid)
    features: jax.Array  # [T, N, F]
    inv: jax.Array  # [n] investable column indices
    lo: jax.Array  # first decision day of the split (its observations read the window before it)
    hi: jax.Array  # end of the split (exclusive): the last day an episode may play
    feature_mean: Optional[jax.Array] = None  # [N, F] over the fold's training days (--obs-norm train)
    feature_std: Optional[jax.Array] = None  # [N, F]


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
        raise DataError(f"{flag} '{text}' is neither a date YYYY-MM-DD nor a fraction in (0, 1). "
                        f"Fix: e.g. {flag} 2013-01-01") from None
    return int(np.searchsorted(dates, day))


def split_bounds(num_days: int, train_end: int, val_end: int, window: int) -> dict:
    """(first decision day, end) of each split; a split's days are [first, end) and its observations read the
    `window - 1` days before `first`. Embargo: `window` days between one split's last day and the next one's first
    decision; the next split's observations read only those days (its own warm-up), never the previous split's."""
    return {"train": (window - 1, train_end), "val": (train_end + window, val_end), "test": (val_end + window, num_days)}


def fold_bounds(num_days: int, train_end: int, val_end: int, window: int, folds: int = 1,
                train_days: Optional[int] = None) -> list[dict]:
    """`split_bounds` of each walk-forward fold. The days from fold 0's first test decision (`val_end` + the embargo)
    to the end are cut into `folds` equal blocks (the remainder, under `folds` days, at the end is left out); fold f
    shifts every split date of fold 0 by f blocks, so its test block is the f-th block and its training and
    validation blocks end where fold 0's would, f blocks later. Training starts at the first day (expanding windows),
    or `train_days` days before its end (rolling). One fold is `split_bounds` itself."""
    block = (num_days - (val_end + window)) // folds
    out = []
    for fold in range(folds):
        shift = fold * block
        bounds = split_bounds(val_end + window + block + shift, train_end + shift, val_end + shift, window)
        if train_days is not None:
            bounds["train"] = (bounds["train"][1] - train_days, bounds["train"][1])
        out.append(bounds)
    return out


def check_fold_lengths(folds: list, episode_days: int, path: Path) -> None:
    """Every split of every fold holds an episode (trading + settlement days) and its next day; a rolling training
    window fits in the data."""
    for fold, bounds in enumerate(folds):
        where = f"walk-forward fold {fold}'s" if len(folds) > 1 else "the"
        fix = "lower --walk-forward, " if len(folds) > 1 else ""
        if bounds["train"][0] < 0:
            raise DataError(f"{path}: {where} rolling training window (--walk-forward-train-days) starts "
                            f"{-bounds['train'][0]} days before the first day. Fix: lower --walk-forward-train-days or "
                            f"move --train-end later")
        for name, (first, end) in bounds.items():
            if end - first < episode_days + 1:
                raise DataError(f"{path}: {where} {name} split has {max(end - first, 0)} decision days, fewer than trading "
                                f"+ settlement days + 1 ({episode_days + 1}). Fix: {fix}move --train-end/--val-end or "
                                f"shorten --window/--trading-days")


def load_data(args: Args) -> tuple[dict, dict]:
    """Loads and checks a daily npz; returns ({'train','val','test'}: MarketData of walk-forward fold 0, the single
    split by default, info; info['folds'] holds every fold's bounds, `fold_data` makes the other folds' MarketData)."""
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
        raise DataError(f"{path}: kind is '{meta.get('kind')}', erl_trader needs a daily universe. Fix: use data_prep.py "
                        f"daily (or ppo_trader.py for intraday bars)")
    need = ("dates", "tickers", "investable", "open", "high", "low", "close", "valid", "feature_valid", "features")
    missing = [k for k in need if k not in raw]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}. Fix: rebuild it with the current data_prep.py")
    dates = raw["dates"]
    episode_days = args.trading_days + args.settlement_days
    train_end, val_end = split_point(args.train_end, dates, "--train-end"), split_point(args.val_end, dates, "--val-end")
    folds = fold_bounds(len(dates), train_end, val_end, args.window, args.walk_forward, args.walk_forward_train_days)
    check_fold_lengths(folds, episode_days, path)
    bounds = folds[0]
    inv = np.flatnonzero(raw["investable"]).astype(np.int32)
    feature_valid = raw["feature_valid"] & raw["valid"]
    feature_mean, feature_std = training_stats(raw["features"], feature_valid, bounds["train"])
    base = dict(feature_mean=feature_mean, feature_std=feature_std, open=jnp.asarray(raw["open"], jnp.float32),
                high=jnp.asarray(raw["high"], jnp.float32), low=jnp.asarray(raw["low"], jnp.float32),
                close=jnp.asarray(raw["close"], jnp.float32), valid=jnp.asarray(raw["valid"]),
                feature_valid=jnp.asarray(feature_valid),
                features=jnp.asarray(raw["features"], jnp.float32),
                inv=jnp.asarray(inv))
    out = {name: MarketData(**base, lo=jnp.int32(first), hi=jnp.int32(end)) for name, (first, end) in bounds.items()}
    info = dict(path=str(path), meta=meta, tickers=[str(t) for t in raw["tickers"]], dates=dates, bounds=bounds, folds=folds,
                feature_names=[str(f) for f in raw["feature_names"]], inv=inv.tolist(), close_only=is_close_only(raw))
    return out, info


def training_stats(features: np.ndarray, feature_valid: np.ndarray, train_bounds: tuple) -> tuple[jax.Array, jax.Array]:
    """Per stock and feature, the mean and standard deviation over the valid days of a fold's training split
    (`train_bounds`: its first decision day and end): `--obs-norm train`'s scaling, from training days only."""
    first, end = train_bounds
    x = np.asarray(features[first:end], np.float64)
    valid = np.asarray(feature_valid[first:end])[..., None]
    count = np.maximum(valid.sum(0), 1)
    mean = np.where(valid, x, 0.0).sum(0) / count
    std = np.sqrt(np.where(valid, (x - mean) ** 2, 0.0).sum(0) / count)
    return jnp.asarray(mean, jnp.float32), jnp.asarray(std + 1e-6, jnp.float32)


def fold_data(datasets: dict, info: dict, fold: int) -> tuple[dict, dict]:
    """(datasets, info) of one walk-forward fold: the same arrays with that fold's split bounds and training
    statistics (same shapes: the compiled programs of fold 0 play every fold)."""
    bounds = info["folds"][fold]
    train = datasets["train"]
    feature_mean, feature_std = training_stats(train.features, train.feature_valid, bounds["train"])
    fold_datasets = {name: data.replace(lo=jnp.int32(bounds[name][0]), hi=jnp.int32(bounds[name][1]),
                                        feature_mean=feature_mean, feature_std=feature_std)
                     for name, data in datasets.items()}
    return fold_datasets, dict(info, bounds=bounds)


def is_close_only(raw: dict) -> bool:
    """True when every valid day has open = high = low = close: the file has closes only."""
    valid = raw["valid"]
    return bool(all((raw[k][valid] == raw["close"][valid]).all() for k in ("open", "high", "low")))


def warn_if_close_only(info: dict) -> None:
    """A close-only universe buys at the next close and tests sale targets against closes: say so on load."""
    if info["close_only"]:
        print(f"warning: {info['path']} is close-only (open = high = low = close): entries fill at the next close and a sale "
              "target is reached only by a close, never by an intraday high", file=sys.stderr, flush=True)


# ---- ENV ----
@struct.dataclass
class EnvParams:
    """Env rules (see Args). `trading_days` is dynamic so the backtest can run one long episode."""

    window: int = struct.field(pytree_node=False, default=20)
    obs_norm: str = struct.field(pytree_node=False, default="window")
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
    return EnvParams(window=args.window, obs_norm=args.obs_norm, max_positions=args.max_positions,
                     trading_days=args.trading_days, settlement_days=args.settlement_days,
                     max_holding_days=args.max_holding_days, coef_max=args.coef_max, coef_threshold=args.coef_threshold,
                     target_min=args.target_min, target_max=args.target_max, cost_bps=args.cost_bps,
                     hurdle_pct=args.hurdle_pct,
                     inaction_penalty=args.inaction_penalty)


def reset_at(start: jax.Array, params: EnvParams) -> EnvState:
    """A flat account deciding at day `start`."""
    K = params.max_positions
    zf, zi = jnp.zeros(K), jnp.zeros(K, jnp.int32)
    return EnvState(held=jnp.zeros(K, bool), col=zi, entry=zf, day=zi, coef=zf, target=zf, shares=zf, cash=jnp.float32(1.0),
                    equity=jnp.float32(1.0), t=jnp.int32(start), k=jnp.int32(0))


def sample_start(key: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """A random first decision day in the split with room for the whole episode after it."""
    episode_days = params.trading_days + params.settlement_days
    return jax.random.randint(key, (), data.lo, data.hi - episode_days)


OBS_CLIP = 5.0  # --obs-norm train: standardised features beyond +-5 standard deviations are clipped


def get_obs(t: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """[W, N, F+1]: each column's feature window instance-normalised (or, `--obs-norm train`, standardised with
    the training split's statistics), plus a validity channel (1 where the column has a price and full-look-back
    features that day)."""
    W = params.window
    x = jax.lax.dynamic_slice_in_dim(data.features, t - W + 1, W, axis=0)
    if params.obs_norm == "train":
        z = jnp.clip((x - data.feature_mean) / data.feature_std, -OBS_CLIP, OBS_CLIP)
    else:
        x = x - x[-1]  # shift first (same maths): a flat window gives exactly 0 in float32, not rounding noise / 1e-6
        z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    v = jax.lax.dynamic_slice_in_dim(data.feature_valid, t - W + 1, W, axis=0).astype(jnp.float32)
    return jnp.concatenate([z, v[..., None]], axis=-1)


def scale_action(a: jax.Array, params: EnvParams) -> tuple[jax.Array, jax.Array]:
    """Network action in [0, 1]^(n x 2) -> (coefficients in [0, coef_max], targets in percent)."""
    return a[:, 0] * params.coef_max, params.target_min + a[:, 1] * (params.target_max - params.target_min)


SMALL_PER_STOCK = 5  # held, unrealised gain, coefficient at entry, days held, distance to the target
SLOT_WIDTH = 1 + SMALL_PER_STOCK  # a slot in the replay memory: its stock (investable index, -1 if free), then the five


def slot_state(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """The open positions as the replay memory stores them, [K * 6 + 1]: per slot the investable index of its
    stock (-1 if free) and the five numbers `small_state` gives that stock, then the episode progress. At most
    K stocks are held, so this is K-sized, not universe-sized; `small_state_of_slots` spreads it per stock."""
    close = data.close[state.t, state.col]
    per_slot = jnp.stack([jnp.ones_like(close), (close / jnp.where(state.held, state.entry, 1.0) - 1) * 10,
                          state.coef / params.coef_max, (state.t - state.day) / params.max_holding_days,
                          (state.target / close - 1) * 10], axis=-1)
    stock = jnp.argmax(data.inv[None, :] == state.col[:, None], axis=1)  # a held column is always investable
    slots = jnp.concatenate([jnp.where(state.held, stock, -1)[:, None], per_slot], axis=-1)
    slots = jnp.where(state.held[:, None], slots, jnp.zeros_like(slots).at[:, 0].set(-1.0))
    episode_days = params.trading_days + params.settlement_days
    return jnp.concatenate([slots.reshape(-1), (state.k / episode_days)[None]]).astype(jnp.float32)


def small_state_of_slots(slots: jax.Array, n_inv: int) -> jax.Array:
    """`slot_state`'s [K * 6 + 1] -> the critic's [n * 5 + 1]: each held stock's five numbers at its place, zeros
    for the stocks not held, then the episode progress."""
    per_slot = slots[:-1].reshape(-1, SLOT_WIDTH)
    stock = per_slot[:, 0].astype(jnp.int32)
    where = jnp.where(stock >= 0, stock, n_inv)  # a free slot writes nowhere
    per_stock = jnp.zeros((n_inv, SMALL_PER_STOCK)).at[where].set(per_slot[:, 1:], mode="drop")
    return jnp.concatenate([per_stock.reshape(-1), slots[-1:]])


def small_state(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """What the critic sees besides market data, [n * 5 + 1]: per investable stock whether it is held and, if so,
    its unrealised gain (percent / 10, at day t's close), the coefficient it was opened with (which scales
    its exit reward), the days held / max_holding_days and the distance to its sale target (percent / 10);
    then the episode progress. Without the open positions the critic cannot tell what a held stock will pay,
    so the value of opening it never reaches the decision that opened it."""
    return small_state_of_slots(slot_state(state, params, data), data.inv.shape[0])


def step(state: EnvState, coef: jax.Array, target: jax.Array, params: EnvParams, data: MarketData):
    """The rules of DESIGN 2b for one day: open at t+1's open, exits on day t+1, rewards at exits.

    Returns (state, reward, done, info); info has the column opened (-1 if none) and per-slot exits.
    """
    today, step_index = state.t, state.k
    next_day = today + 1  # the day the decision plays out: fills, exits, marking
    cost = params.cost_bps / 10_000.0
    inv = data.inv
    trading_day = step_index < params.trading_days
    last = step_index == params.trading_days + params.settlement_days - 1

    # OPEN: the best-coefficient investable stock with valid features today and not held, into the first free slot
    held_col = jnp.zeros(data.open.shape[1], bool).at[state.col].max(state.held)
    candidate = data.feature_valid[today, inv] & ~held_col[inv]
    best = jnp.argmax(jnp.where(candidate, coef, -jnp.inf))
    col = inv[best]
    free = ~state.held
    do_open = (trading_day & candidate.any() & (coef[best] > params.coef_threshold) & free.any()
               & data.valid[next_day, col])
    entry = data.open[next_day, col]
    alloc = jnp.minimum(state.cash, state.equity / params.max_positions)
    opening = (jnp.arange(params.max_positions) == jnp.argmax(free)) & do_open  # the slot that opens, if any
    held = state.held | opening
    slot_col = jnp.where(opening, col, state.col)
    slot_entry = jnp.where(opening, entry, state.entry)
    slot_day = jnp.where(opening, next_day, state.day)
    slot_coef = jnp.where(opening, coef[best], state.coef)
    slot_target = jnp.where(opening, entry * (1 + target[best] / 100.0), state.target)
    slot_shares = jnp.where(opening, alloc * (1 - cost) / entry, state.shares)
    cash = state.cash - jnp.where(do_open, alloc, 0.0)

    # EXITS on the next day: delisting, target, max holding; the last step closes everything
    day_open, day_high = data.open[next_day, slot_col], data.high[next_day, slot_col]
    day_close, day_valid = data.close[next_day, slot_col], data.valid[next_day, slot_col]
    held_before = held & (slot_day < next_day)  # a position opened on the next day is not checked that day
    delisted = held_before & ~day_valid
    target_hit = held_before & day_valid & (day_high >= slot_target)
    held_too_long = held_before & day_valid & ~target_hit & (next_day - slot_day >= params.max_holding_days)
    episode_end = held & last & ~(delisted | target_hit | held_too_long)
    exits = delisted | target_hit | held_too_long | episode_end
    price = jnp.where(target_hit, jnp.maximum(slot_target, day_open), day_close)
    gain_pct = (price / jnp.where(exits, slot_entry, 1.0) - 1) * 100
    trade_reward = slot_coef / params.coef_max * (gain_pct - params.hurdle_pct) - 2 * params.cost_bps / 100
    exit_reward = jnp.where(exits, trade_reward, 0.0)
    cash = cash + jnp.sum(jnp.where(exits, slot_shares * price * (1 - cost), 0.0))
    held = held & ~exits

    reward = exit_reward.sum() - jnp.where(trading_day & ~held.any(), params.inaction_penalty, 0.0)
    equity = cash + jnp.sum(jnp.where(held, slot_shares * day_close, 0.0))
    if_held = lambda x: jnp.where(held, x, jnp.zeros_like(x))  # noqa: E731
    new = EnvState(held=held, col=if_held(slot_col), entry=if_held(slot_entry), day=if_held(slot_day), coef=if_held(slot_coef),
                   target=if_held(slot_target), shares=if_held(slot_shares), cash=cash, equity=equity, t=next_day,
                   k=step_index + 1)
    info = dict(opened=jnp.where(do_open, col, -1), exits=exits, exit_col=slot_col, exit_price=price, exit_entry=slot_entry,
                exit_day=slot_day, exit_reward=exit_reward, n_exits=exits.sum())
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
    lstm_layers: int
    avg_last: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(temporal_conv(x, self.channels, self.kernel))
        if self.kind == "conv":
            x = nn.relu(temporal_conv(x, self.hidden, self.kernel))
            return nn.Dense(self.hidden)(jnp.concatenate([x.mean(0), x[-1]]))
        y = x[None]
        for _ in range(self.lstm_layers):
            forward = nn.RNN(nn.OptimizedLSTMCell(self.hidden))
            y = nn.Bidirectional(forward, nn.RNN(nn.OptimizedLSTMCell(self.hidden)))(y) if self.bidirectional else forward(y)
        return nn.Dense(self.hidden)(y[0, -self.avg_last:].mean(0))


def column_extractor(args: Args) -> nn.Module:
    """The extractor shared across columns: one set of weights, vmapped over the column axis of [W, N, C]."""
    base = nn.remat(ConvLSTMExtractor) if args.remat else ConvLSTMExtractor
    vmapped = nn.vmap(base, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=1, out_axes=0)
    return vmapped(args.hidden, args.conv_channels, args.kernel_size, args.extractor, args.bidirectional, args.lstm_layers,
                   args.avg_last)


STOCK_HEAD = "stock_head"  # the actor's per-stock output layer: its parameters have a leading stock axis


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
        args = self.args
        feats = column_extractor(args)(obs)
        query = self.param("query", nn.initializers.normal(0.1), (1, args.hidden))
        attention = nn.MultiHeadDotProductAttention(num_heads=args.attention_heads, qkv_features=args.hidden)
        context = attention(query, feats)[0]
        if args.layer_norm:
            feats, context = nn.LayerNorm()(feats), nn.LayerNorm()(query[0] + context)
        stock = feats[jnp.asarray(self.inv)]
        h = jnp.concatenate([stock, jnp.broadcast_to(context, stock.shape)], axis=-1)
        for width in args.stock_layers or (args.hidden,):
            h = nn.relu(nn.Dense(width)(h))  # shared by all stocks: every stock's gradient trains it
        per_stock = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})  # own weights per stock
        return nn.sigmoid(per_stock(2, name=STOCK_HEAD)(h))


def critic_opening_rule(small: jax.Array, args: Args) -> tuple[jax.Array, jax.Array]:
    """The env's opening rule as the critic reads it from its state (`small_state`): (a slot is free on a trading
    day, [n] the stock is not held). The env then opens the not-held stock with the highest coefficient if that
    coefficient exceeds the threshold; the critic's softmax and sigmoid are the differentiable version of this."""
    held, progress = small[:-1].reshape(-1, SMALL_PER_STOCK)[:, 0], small[-1]
    trading_day = progress < args.trading_days / (args.trading_days + args.settlement_days)
    return (held.sum() < args.max_positions) & trading_day, held == 0


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
    extractor, and the critic runs on every replay batch) and its open position, with weights shared by all stocks
    (plus, with --critic-stock-embedding, a learned vector of each stock's own).

    CHANGING THE ENV? This critic hard-codes two of its rules (`critic_opening_rule`): which stock an action opens,
    and that a trade's exit reward is linear in the coefficient it was opened with (coef / coef_max x (gain -
    hurdle) - costs: the gain-dependent part is coef x g_i; the per-trade cost, the same for any coefficient, is
    left to g_i and V). It ignores validity (it assumes every investable stock can be bought). A new opening rule
    or a reward that is not linear in the coefficient needs a new critic; tests/test_erl_env.py
    (test_critic_rules_match_the_env) fails when the env and these rules disagree."""

    args: Args
    inv: tuple

    @nn.compact
    def __call__(self, obs, small, action):
        args, n = self.args, len(self.inv)
        inv = jnp.asarray(self.inv)
        cols = obs.transpose(1, 0, 2).reshape(obs.shape[1], -1)  # [N, W * C]
        positions = small[:-1].reshape(n, SMALL_PER_STOCK)
        held = positions[:, 0]
        can_open, _ = critic_opening_rule(small, args)
        coef, target = action[:, 0], action[:, 1]
        qs = []
        for q in range(2):
            context = nn.relu(nn.Dense(args.hidden)(cols)).mean(0)
            enc = nn.relu(nn.Dense(args.hidden)(cols[inv]))
            if args.critic_stock_embedding:  # which stock this is: lets g_i differ between stocks with alike windows
                stock_embed = nn.Embed(n, args.critic_stock_embedding, embedding_init=nn.initializers.normal(1.0))
                enc = jnp.concatenate([enc, stock_embed(jnp.arange(n))], axis=-1)
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
    slots: jax.Array  # [cap, K * 6 + 1] open positions (slot_state) at t; the critic's per-stock view is rebuilt per batch
    action: jax.Array  # [cap, n, 2] network action in [0, 1]
    reward: jax.Array  # [cap] discounted sum of the n_step rewards from t
    done: jax.Array  # [cap] the episode ends within those n_step steps (nothing to bootstrap)
    next_slots: jax.Array  # [cap, K * 6 + 1] open positions at t + n_step
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


def seed_axes() -> RunnerState:
    """vmap axes of the seed-stacked runner state (--num-seeds): a leading seed axis on everything but the counters,
    which every seed advances in step (generation, TD3 updates, replay write position and fill). Unbatched, they keep
    the TD3 actor-update `lax.cond` a real branch under vmap (a batched predicate would run both branches)."""
    return RunnerState(pop=0, learner=Learner(0, 0, 0, 0, 0, 0, updates=None), replay=Replay(0, 0, 0, 0, 0, 0, None, None),
                       rng=0, gen=None)


def by_seed_axis(fn: Callable, *trees) -> RunnerState:
    """fn(axis, part, ...) for every part of the runner state(s) `seed_axes` names (axis 0: it has a seed axis, None: a
    shared counter)."""
    return jax.tree.map(fn, seed_axes(), *trees, is_leaf=lambda axis: axis is None)


def stack_seeds(runners: list) -> RunnerState:
    """Per-seed runner states -> one state with a leading seed axis (the shared counters are taken from the first)."""
    return by_seed_axis(lambda axis, *parts: parts[0] if axis is None else jax.tree.map(lambda *x: jnp.stack(x), *parts),
                        *runners)


def worst_k_mean(returns: jax.Array, k: int) -> jax.Array:
    """Conservative fitness: the mean of the k worst episode returns (last axis)."""
    return jnp.sort(returns, axis=-1)[..., :k].mean(-1)


def tournament(key: jax.Array, fitness: jax.Array, n: int, size: int) -> jax.Array:
    """n winners of tournaments of `size` individuals drawn with replacement (the fittest of each draw wins)."""
    idx = jax.random.randint(key, (n, size), 0, fitness.shape[0])
    return idx[jnp.arange(n), jnp.argmax(fitness[idx], axis=1)]


def output_unit_shapes(params: dict) -> dict:
    """{module path: shape of its output units}: a unit is one output of a layer, its kernel column with its bias.

    flax kernels are [inputs..., outputs...] and a bias has the outputs' shape; the per-stock head's kernel
    [n, in, out] (vmapped) puts its stock axis in front, its bias is [n, out]. A module without a bias (an
    LSTM's input kernels, the attention query) has one unit per entry of its last axis."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        module, name = tuple(str(k.key) for k in path[:-1]), str(path[-1].key)
        if name == "bias" or module not in shapes:
            shapes[module] = leaf.shape if name == "bias" else leaf.shape[-1:]
    return shapes


def unit_mask(pick: jax.Array, leaf: jax.Array, module: tuple) -> jax.Array:
    """`pick` (one entry per output unit) broadcast over the axes of one of the module's tensors."""
    if leaf.shape == pick.shape:  # the bias
        return pick
    if STOCK_HEAD in module:  # kernel [n, in, out], units [n, out]
        return pick[:, None, :]
    return pick.reshape((1,) * (leaf.ndim - pick.ndim) + pick.shape)


def crossover(key: jax.Array, a: dict, b: dict) -> dict:
    """Uniform crossover of output units: each unit of every layer (its kernel column and its bias, together)
    comes from either parent, so a child's neuron is one parent's neuron, whole."""
    shapes = output_unit_shapes(a)
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    # one draw for the units of every layer (a draw per layer inlines a threefry per layer: slow to compile)
    draw = jax.random.bernoulli(key, 0.5, (sum(sizes),))
    offsets = np.cumsum([0] + sizes)
    pick = {module: draw[offsets[i]: offsets[i + 1]].reshape(shape) for i, (module, shape) in enumerate(shapes.items())}

    def cross(path, x, y):
        module = tuple(str(k.key) for k in path[:-1])
        return jnp.where(unit_mask(pick[module], x, module), x, y)

    return jax.tree_util.tree_map_with_path(cross, a, b)


def mutate(key: jax.Array, params: dict, args: Args) -> dict:
    """ERL mutation (Khadka & Tumer 2018): on a fraction of each tensor's weights add Gaussian noise scaled by
    the weight's magnitude; rarely a super-mutation (x10) or a reset to N(0, 0.1); then clip."""
    # all weights as one vector, so the randomness is two draws rather than five per tensor (each draw inlines a
    # threefry: per-tensor draws made the GA most of the generation's compile time)
    w, unravel = ravel_pytree(params)
    k_u, k_n = jax.random.split(key)
    rates = jnp.array([args.mutation_frac, args.super_mutation_prob, args.reset_prob])[:, None]
    perturbed, super_mutated, reset = jax.random.uniform(k_u, (3,) + w.shape) < rates
    noise, fresh = jax.random.normal(k_n, (2,) + w.shape)
    strength = args.mutation_strength * jnp.abs(w) * jnp.where(super_mutated, 10.0, 1.0)
    new = jnp.where(reset, fresh * 0.1, w + noise * strength)
    return unravel(jnp.clip(jnp.where(perturbed, new, w), -args.weight_clip, args.weight_clip))


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
    crossed = jax.random.bernoulli(k_px, args.crossover_prob, (n,))
    mutated = jax.random.bernoulli(k_pm, args.mutation_prob, (n,))
    children = jax.vmap(child)(jax.random.split(k_x, n), jax.random.split(k_m, n), crossed, mutated, take(pa), take(pb))
    return jax.tree.map(lambda e, c: jnp.concatenate([e, c]), take(elites), children), elites


class ERL(NamedTuple):
    """What `make_erl` builds: the jittable pieces of one run (tests call the inner ones directly)."""

    init: Callable  # rng -> RunnerState
    chunk: Callable  # (RunnerState, data) -> (RunnerState, metrics per generation)
    actor: nn.Module
    critic: nn.Module
    generation: Callable  # (RunnerState, data) -> (RunnerState, metrics)
    play: Callable  # (params, start, key, noise, data) -> (episode return, n-step transitions)
    add_transitions: Callable  # (Replay, transitions) -> Replay
    td3_update: Callable  # (Learner, batch, key, data) -> (Learner, (critic loss, actor loss))


def make_erl(args: Args, env_params: EnvParams, data_shapes: MarketData, n_inv: int, inv: tuple, mesh: Optional[Mesh] = None):
    """Returns the run's jittable pieces (`ERL`).

    Market data is an argument of the jitted functions, never a closed-over constant (it would be baked
    into the compiled program: slow to compile and to run). With a `mesh` (axis "d"), the population and
    each TD3 batch are split over its devices; XLA gathers what selection needs (every fitness) and sums
    the TD3 gradients across devices (the same gradient as on one device)."""

    def shard(x):
        return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec("d")))

    actor, critic = Actor(args, inv), Critic(args, inv)
    L = args.trading_days + args.settlement_days
    E, P = args.episodes_per_agent, args.pop_size
    inject_slot = P - 1  # the learner's actor replaces the last individual: a GA child, never an elite (elites come first)
    obs_dummy = get_obs(jnp.int32(args.window - 1), env_params, data_shapes)
    small_dim, slots_dim = n_inv * SMALL_PER_STOCK + 1, args.max_positions * SLOT_WIDTH + 1
    actor_tx = optax.adam(args.actor_lr)
    critic_tx = optax.adam(args.critic_lr)

    def init(rng) -> RunnerState:
        rng, k_pop, k_a, k_c = jax.random.split(rng, 4)
        # one init per individual: vmapped flax inits (orthogonal LSTM kernels) can deadlock XLA:CPU
        init_actor = jax.jit(actor.init)
        pop = jax.tree.map(lambda *x: jnp.stack(x), *[init_actor(k, obs_dummy) for k in jax.random.split(k_pop, P)])
        a_params = init_actor(k_a, obs_dummy)
        c_params = jax.jit(critic.init)(k_c, obs_dummy, jnp.zeros(small_dim), jnp.zeros((n_inv, 2)))
        learner = Learner(a_params, c_params, a_params, c_params, actor_tx.init(a_params), critic_tx.init(c_params),
                          jnp.int32(0))
        cap = args.buffer_size
        replay = Replay(t=jnp.zeros(cap, jnp.int32), slots=jnp.zeros((cap, slots_dim)), action=jnp.zeros((cap, n_inv, 2)),
                        reward=jnp.zeros(cap), done=jnp.zeros(cap, bool), next_slots=jnp.zeros((cap, slots_dim)),
                        ptr=jnp.int32(0), size=jnp.int32(0))
        return RunnerState(pop, learner, replay, rng, jnp.int32(0))

    def play(params, start, key, noise, data):
        """One episode from `start`; returns (return, transitions [L, ...])."""

        def _env_step(state, k):
            obs = get_obs(state.t, env_params, data)
            a = actor.apply(params, obs)
            a = jnp.clip(a + noise * jax.random.normal(k, a.shape), 0.0, 1.0)
            coef, target = scale_action(a, env_params)
            slots = slot_state(state, env_params, data)
            nxt, reward, done, _ = step(state, coef, target, env_params, data)
            return nxt, (state.t, slots, a, reward, done, slot_state(nxt, env_params, data))

        _, tr = jax.lax.scan(_env_step, reset_at(start, env_params), jax.random.split(key, L))
        return tr[3].sum(), n_step_transitions(tr)

    def n_step_transitions(tr):
        """(t, slots, a, r, done, next_slots) per step -> the same with r the discounted sum of the next n rewards,
        next_slots the open positions n days later (the bootstrap day is always t + n) and done whether the episode
        ends within the n steps (then nothing is bootstrapped)."""
        t, slots, a, r, d, next_slots = tr
        n = args.n_step
        k = jnp.arange(L)
        r_pad = jnp.concatenate([r, jnp.zeros(n - 1)])
        r_n = sum(args.gamma**j * r_pad[j: j + L] for j in range(n))
        return t, slots, a, r_n, k + n - 1 >= L - 1, next_slots[jnp.minimum(k + n - 1, L - 1)]

    def add_transitions(replay: Replay, tr) -> Replay:
        """Writes a batch of transitions (any leading axes) into the circular memory."""
        t, slots, action, reward, done, next_slots = tr
        n = t.size
        idx = (replay.ptr + jnp.arange(n)) % args.buffer_size
        write = lambda memory, x: memory.at[idx].set(x.reshape((n,) + memory.shape[1:]))  # noqa: E731
        return Replay(write(replay.t, t), write(replay.slots, slots), write(replay.action, action),
                      write(replay.reward, reward),
                      write(replay.done, done), write(replay.next_slots, next_slots), (replay.ptr + n) % args.buffer_size,
                      jnp.minimum(replay.size + n, args.buffer_size))

    def td3_update(learner: Learner, batch, key, data):
        """One TD3 step: twin-critic regression to the clipped double-Q target with target policy smoothing;
        every `policy_delay` steps (after the first `critic_warmup` generations) an actor step on Q1 and soft target
        updates (Fujimoto et al. 2018)."""
        t, slots, a, r, d, next_slots = batch
        small, nsmall = (jax.vmap(small_state_of_slots, in_axes=(0, None))(x, n_inv) for x in (slots, next_slots))
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
            actor_target, critic_target = soft(learner.actor_target, actor_params), soft(learner.critic_target, critic_params)
            return actor_params, actor_opt, actor_target, critic_target, a_loss

        def _skip(_):
            return learner.actor, learner.actor_opt, learner.actor_target, learner.critic_target, jnp.float32(jnp.nan)

        warmed_up = learner.updates >= args.critic_warmup * args.rl_updates
        actor_turn = (learner.updates % args.policy_delay == 0) & warmed_up
        actor_params, actor_opt, actor_target, critic_target, a_loss = jax.lax.cond(actor_turn, _actor_step, _skip, None)
        return Learner(actor_params, critic_params, actor_target, critic_target, actor_opt, critic_opt,
                       learner.updates + 1), (c_loss, a_loss)

    def generation(runner: RunnerState, data: MarketData):
        pop, learner, replay, rng, gen = runner
        rng, k_start, k_play, k_lstart, k_lplay, k_rl, k_ga = jax.random.split(rng, 7)

        # INJECT the learner's actor into the last slot (a child of the last GA step, not yet evaluated), so that
        # it is evaluated with the others: its fitness in selection is that of its own weights (as in ERL)
        do_inject = (gen + 1) % args.inject_every == 0
        pop = jax.tree.map(lambda p, a: jnp.where(do_inject, p.at[inject_slot].set(a), p), pop, learner.actor)

        # EVALUATE THE POPULATION (and the learner, greedily) on the same random training slices
        starts = jax.vmap(sample_start, in_axes=(0, None, None))(jax.random.split(k_start, E), env_params, data)
        play_keys = jax.random.split(k_play, E)
        play_all = jax.vmap(play, in_axes=(None, 0, 0, None, None))
        play_population = jax.vmap(play_all, in_axes=(0, None, None, None, None))
        pop_returns, pop_tr = play_population(pop, starts, play_keys, 0.0, data)  # [P, E]
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
            batch = (replay.t[idx], replay.slots[idx], replay.action[idx], replay.reward[idx],
                     replay.done[idx].astype(jnp.float32),
                     replay.next_slots[idx])
            batch = shard(batch)  # each device computes the losses of its share of the batch
            return td3_update(learner, batch, k_upd, data)

        learner, (c_loss, a_loss) = jax.lax.scan(_rl_step, learner, jax.random.split(k_rl, args.rl_updates))

        # EVOLVE
        new_pop, elites = ga_step(k_ga, pop, fitness, args)
        new_pop = shard(new_pop)  # the next generation stays split over the devices (each plays its slice)
        metrics = dict(fitness_mean=fitness.mean(), fitness_max=fitness.max(), fitness_min=fitness.min(),
                       learner_fitness=learner_fitness,
                       explore_return=explore_returns.mean(), critic_loss=c_loss.mean(), actor_loss=jnp.nanmean(a_loss),
                       injected=do_inject,
                       injected_is_elite=do_inject & jnp.any(elites == inject_slot), champion_fitness=fitness.max(),
                       replay_size=replay.size)
        return RunnerState(new_pop, learner, replay, rng, gen + 1), metrics

    def chunk(runner: RunnerState, data: MarketData):
        """`chunk_generations` generations in one lax.scan (compiled once)."""
        return jax.lax.scan(lambda r, _: generation(r, data), runner, None, args.chunk_generations)

    return ERL(init, chunk, actor, critic, generation, play, add_transitions, td3_update)


def replay_bytes_per_transition(replay: Replay, leading_axes: int = 1) -> int:
    """Bytes one transition takes in the replay memory (and in a checkpoint that holds it); `leading_axes`: 2 for a
    seed-stacked memory [seeds, capacity, ...]."""
    return sum(x.dtype.itemsize * int(np.prod(x.shape[leading_axes:])) for x in replay[:6])


# ---- OUTER LOOP ----
def init_distributed(args: Args) -> None:
    """Multi-host: every process runs the same command with its own --process-id; jax.distributed.initialize
    connects them, after which jax.devices() lists the devices of all hosts."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if all(f is None for f in flags):
        return
    if any(f is None for f in flags):
        raise DataError("multi-host needs --coordinator-address, --num-processes and --process-id together. Fix: pass all "
                        "three (see README)")
    if not (args.num_processes >= 1 and 0 <= args.process_id < args.num_processes):
        raise DataError(f"--process-id {args.process_id} must be in [0, --num-processes {args.num_processes}). Fix: number "
                        f"the processes 0..P-1")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)


def make_mesh(args: Args) -> Mesh:
    """A ("seed", "d") mesh over --devices devices of every process: seeds split over gcd(num_seeds, devices) groups
    of devices, each seed's population (and TD3 batch) over the devices of its group."""
    local = jax.local_devices()
    n = len(local) if args.devices is None else args.devices
    if not 1 <= n <= len(local):
        raise DataError(f"--devices {n}: this process has {len(local)} {local[0].platform} device(s). Fix: pass --devices "
                        f"between 1 and {len(local)}")
    devices = [d for p in range(jax.process_count()) for d in [x for x in jax.devices() if x.process_index == p][:n]]
    n_seed = math.gcd(args.num_seeds, len(devices))
    n_pop = len(devices) // n_seed
    layout = f"{n_pop} devices per seed ({len(devices)} devices, --num-seeds {args.num_seeds})"
    if args.pop_size % n_pop:
        raise DataError(f"--pop-size {args.pop_size} does not divide over {layout}. Fix: pass a multiple of {n_pop} to "
                        f"--pop-size, or change --devices")
    if args.batch_size % n_pop:
        raise DataError(f"--batch-size {args.batch_size} does not divide over {layout}. Fix: pass a multiple of {n_pop} to "
                        f"--batch-size, or change --devices")
    return Mesh(np.array(devices).reshape(n_seed, n_pop), ("seed", "d"))


def runner_shardings(runner: RunnerState, mesh: Mesh) -> RunnerState:
    """Where the seed-stacked runner state lives: the population split by seed and over its seed's devices; learner,
    replay memory and RNG split by seed and copied over its devices; the shared counters copied everywhere."""
    by_pop, by_seed, copy = (NamedSharding(mesh, PartitionSpec(*axes)) for axes in (("seed", "d"), ("seed",), ()))
    shardings = by_seed_axis(lambda axis, part: jax.tree.map(lambda _: copy if axis is None else by_seed, part), runner)
    return shardings._replace(pop=jax.tree.map(lambda _: by_pop, runner.pop))


def place(tree, shardings):
    """Host or single-device arrays -> global arrays laid out by `shardings` (every process passes the same values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=np.asarray(x): x[idx]),
                        tree, shardings)


def fetch(tree):
    """Global (possibly sharded, possibly multi-host) arrays -> NumPy arrays on every process."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)


def save_checkpoint(path: Path, runner: RunnerState, extra: dict, args: Args) -> None:
    """flax.serialization msgpack of the whole runner state: population, learner (params, targets, optimisers),
    replay memory (unless --no-checkpoint-replay), RNG and counters. Host arrays without any device layout, so a
    checkpoint resumes on any number of devices. Every process calls it (the gather is collective); process 0 writes."""
    if not args.checkpoint_replay:
        runner = runner._replace(replay=None)  # nothing to gather or write: the memory is the bulk of the state
    runner = fetch(runner)
    if jax.process_index() != 0:
        return
    state = flax.serialization.to_state_dict(runner)
    if not args.checkpoint_replay:
        state.pop("replay")
    payload = {"runner": state, "extra": json.dumps(extra)}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_checkpoint(path: Path, template: RunnerState) -> tuple[RunnerState, dict]:
    """Restores `save_checkpoint`'s file into the structure of `template` (a checkpoint without a replay memory
    resumes with the template's, empty)."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        state = dict(payload["runner"])
        state.setdefault("replay", flax.serialization.to_state_dict(template.replay))
        runner = flax.serialization.from_state_dict(template, state)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass a run folder written by erl_trader.py") from None
    except Exception as e:
        raise DataError(f"{path}: checkpoint does not match this configuration ({type(e).__name__}). Fix: resume with the "
                        f"run's own config.json") from None
    return runner, json.loads(payload["extra"])


def save_policy(path: Path, params, args: Args, seed_index: int = 0, fold: int = 0) -> None:
    """A policy-only checkpoint (actor params, config and the indices of the seed and walk-forward fold it belongs
    to) for --eval-only. Written by process 0 only."""
    if jax.process_index() != 0:
        return
    payload = {"params": flax.serialization.to_state_dict(params), "config": json.dumps(dataclasses.asdict(args)),
               "kind": "erl_actor", "seed_index": seed_index, "fold": fold}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def read_policy_file(path) -> dict:
    """A policy checkpoint's payload (one-line errors for a missing file or another kind of file)."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        assert payload.get("kind") == "erl_actor"
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass runs/NAME or runs/NAME/seed0/best.msgpack") from None
    except Exception:
        raise DataError(f"{path}: not an erl_trader policy checkpoint. Fix: pass runs/NAME or runs/NAME/seed0/best.msgpack"
                        ) from None
    return payload


def load_policy(path: str, actor: Actor, obs_dummy: jax.Array):
    """Loads a policy checkpoint into `actor`'s parameter structure (one-line errors on mismatch)."""
    payload = read_policy_file(path)
    template = jax.jit(actor.init)(jax.random.PRNGKey(0), obs_dummy)
    try:
        params = flax.serialization.from_state_dict(template, payload["params"])
    except Exception:
        raise DataError(f"{path}: network does not fit this data/configuration. Fix: use the data and flags it was trained "
                        f"with") from None
    if jax.tree.map(jnp.shape, params) != jax.tree.map(jnp.shape, template):
        raise DataError(f"{path}: network shapes differ from this data/configuration. Fix: use the data and flags it was "
                        f"trained with")
    return params


def fold_dir(run_dir: Path, fold: int, num_folds: int) -> Path:
    """The folder of one walk-forward fold's training (checkpoint, logs, policy files): runs/NAME/fold<f>/, or the run
    folder itself for a single split."""
    return run_dir if num_folds == 1 else run_dir / f"fold{fold}"


def policy_file(run_dir: Path, seed_index: int, which: str) -> Path:
    """A seed's policy file in a run (or fold) folder: seed<k>/best.msgpack or final.msgpack."""
    return run_dir / f"seed{seed_index}" / f"{which}.msgpack"


def eval_policy_files(checkpoint: Path) -> list[tuple[int, int, Path]]:
    """(fold, seed index, policy file) of what --eval-only plays: every fold's and seed's best.msgpack of a run folder
    (its config.json says how many), or the one policy file given."""
    if not checkpoint.is_dir():
        payload = read_policy_file(checkpoint)
        return [(int(payload.get("fold", 0)), int(payload.get("seed_index", 0)), checkpoint)]
    if not (checkpoint / "config.json").is_file():
        raise DataError(f"--checkpoint {checkpoint}: a folder without config.json. Fix: pass a run folder written by "
                        "erl_trader.py, or a policy file runs/NAME/seed0/best.msgpack")
    config = json.loads((checkpoint / "config.json").read_text())
    num_seeds, num_folds = config.get("num_seeds", 1), config.get("walk_forward", 1)
    files = [(fold, k, policy_file(fold_dir(checkpoint, fold, num_folds), k, "best")) for fold in range(num_folds)
             for k in range(num_seeds)]
    missing = [path for *_, path in files if not path.is_file()]
    if missing:
        raise DataError(f"--checkpoint {checkpoint}: {missing[0]} does not exist (the run has {num_folds} fold(s) x "
                        f"{num_seeds} seed(s)). Fix: pass a run folder whose training finished, or one policy file")
    return files


# ---- STATISTICS ----
# Small pure NumPy/SciPy functions behind the report's `summary` and `verdict`; the same block, with the same numbers on
# the same input, in both trainers. Runs are arrays shaped [folds, runs]: one row per walk-forward fold (one row for a
# single train/validation/test split), that fold's seeds (or random policies) along the row.
# Sources: Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice" (IQM, stratified bootstrap, probability
# of improvement; their rliable library); Bailey and Lopez de Prado 2012, "The Sharpe Ratio Efficient Frontier"
# (probabilistic Sharpe ratio) and 2014, "The Deflated Sharpe Ratio".
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 9999  # scipy.stats.bootstrap's default
BOOTSTRAP_SEED = 0  # fixed: the same runs always give the same intervals
EDGE_MIN_RUNS = 5  # a unanimous result among 5 runs has probability 0.5 ** 5 = 3% under the null, below 5%
EDGE_MIN_IMPROVEMENT_LOW = 0.5  # the CI of P(improvement) must exclude a coin flip
EDGE_MIN_DEFLATED_SHARPE = 0.95  # Bailey and Lopez de Prado's 95% confidence that the true Sharpe beats the benchmark


def finite_or_none(value) -> Optional[float]:
    """A float for JSON, or None where the value is undefined (NaN) or unbounded (inf): strict JSON has neither."""
    return float(value) if value is not None and np.isfinite(value) else None


def interquartile_mean(values, axis=None):
    """The mean of the middle half of the runs, rliable's IQM: scipy.stats.trim_mean(values, 0.25), which cuts
    int(0.25 n) runs at each end (for fewer than 4 runs nothing is cut: the mean)."""
    return stats.trim_mean(values, 0.25, axis=axis)


def sample_std(values, axis=None):
    """Standard deviation of the runs with Bessel's correction (ddof 1); NaN for a single run."""
    num_runs = np.size(values) if axis is None else np.shape(values)[axis]
    return np.std(values, axis=axis, ddof=1) if num_runs > 1 else np.nan


RUN_STATISTICS = {"mean": np.mean, "median": np.median, "iqm": interquartile_mean, "std": sample_std}


def stratified_bootstrap_ci(strata: list, statistic) -> Optional[list]:
    """[low, high] of the 95% percentile bootstrap CI of `statistic(*strata, axis=-1)`, each stratum (a fold's runs)
    resampled with replacement on its own (scipy.stats.bootstrap with one sample per stratum, unpaired: rliable's
    stratified bootstrap). Percentile, as rliable's default: BCa is NaN on constant data, the percentile interval of
    constant data is the constant. None when a stratum has a single run (nothing to resample) or the interval is not
    finite."""
    if any(len(stratum) < 2 for stratum in strata):
        return None
    result = stats.bootstrap([np.asarray(s, np.float64) for s in strata], statistic, n_resamples=BOOTSTRAP_RESAMPLES,
                             confidence_level=CONFIDENCE_LEVEL, method="percentile", vectorized=True, axis=-1,
                             rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = finite_or_none(result.confidence_interval.low), finite_or_none(result.confidence_interval.high)
    return None if low is None or high is None else [low, high]


def estimate_with_ci(runs, statistic) -> dict:
    """{value, ci} of `statistic` over all runs of all folds (runs [folds, runs]), the CI resampling runs within folds."""
    folds = [np.asarray(fold, np.float64) for fold in runs]

    def pooled(*strata, axis=-1):
        return statistic(np.concatenate(strata, axis=axis), axis=axis)

    return dict(value=finite_or_none(pooled(*folds)), ci=stratified_bootstrap_ci(folds, pooled))


def task_improvement(x, y):
    """P(X > Y) + P(X = Y) / 2 for one task, over the runs x and y (last axis; batched over leading axes): the
    Mann-Whitney U statistic of x over y, from the ranks of the pooled runs (ties get their mean rank), over len(x) len(y)."""
    num_x, num_y = np.shape(x)[-1], np.shape(y)[-1]
    ranks = stats.rankdata(np.concatenate([x, y], axis=-1), axis=-1)
    u_statistic = ranks[..., :num_x].sum(axis=-1) - num_x * (num_x + 1) / 2
    return u_statistic / (num_x * num_y)


def mean_task_improvement(*task_runs, axis=-1):
    """P(improvement) averaged over tasks; task_runs = (x of task 0, y of task 0, x of task 1, y of task 1, ...), runs
    along the last axis (scipy.stats.bootstrap always passes axis=-1)."""
    return np.mean([task_improvement(x, y) for x, y in zip(task_runs[::2], task_runs[1::2])], axis=0)


def probability_of_improvement(runs_x, runs_y) -> dict:
    """{value, ci} of P(X > Y) (Agarwal et al. 2021): per task (a fold; a fold and market), the probability that a run of
    X beats a run of Y, ties counting 1/2, averaged over tasks; runs_x [tasks, runs of X], runs_y [tasks, runs of Y]. The
    CI resamples the runs of X and of Y within each task independently (rliable's StratifiedIndependentBootstrap)."""
    task_runs = [np.asarray(runs, np.float64) for pair in zip(runs_x, runs_y) for runs in pair]
    return dict(value=finite_or_none(mean_task_improvement(*task_runs)),
                ci=stratified_bootstrap_ci(task_runs, mean_task_improvement))


def percentile_among(runs, reference_runs) -> list:
    """Each run's percentile (0-100) among the reference runs of its fold (runs [folds, runs], reference [folds, R]),
    ties counting half (scipy.stats.percentileofscore, kind "mean"): 100 x P(improvement) of that run over the reference."""
    return [float(stats.percentileofscore(reference, run, kind="mean")) for fold, reference in zip(runs, reference_runs)
            for run in fold]


def period_sharpe(returns) -> Optional[float]:
    """Sharpe ratio per period (not annualised): mean / standard deviation (ddof 0, as the report's Sharpe) of a
    period-return series; None for fewer than 2 periods or constant returns."""
    returns = np.asarray(returns, np.float64)
    if len(returns) < 2 or np.all(returns == returns[0]):
        return None
    return float(returns.mean() / returns.std())


def probabilistic_sharpe_ratio(returns, benchmark_sharpe: float = 0.0) -> Optional[float]:
    """PSR (Bailey and Lopez de Prado 2012): the probability that the true Sharpe ratio of the series beats
    `benchmark_sharpe`, both per period: Phi((SR - SR*) sqrt(n - 1) / sqrt(1 - skew SR + (kurt - 1) / 4 SR^2)), with the
    sample skewness and the (non-excess) kurtosis of the n period returns. None where the Sharpe ratio is undefined
    (see `period_sharpe`) or the variance term is 0 (a two-valued series with skew x SR = 2 makes it 0)."""
    sharpe = period_sharpe(returns)
    if sharpe is None or benchmark_sharpe is None:
        return None
    returns = np.asarray(returns, np.float64)
    skewness, kurtosis = stats.skew(returns), stats.kurtosis(returns, fisher=False)
    variance_term = 1 - skewness * sharpe + (kurtosis - 1) / 4 * sharpe ** 2
    if not variance_term > 1e-9:  # 0 up to rounding: an estimate with no stated uncertainty would read as certainty
        return None
    return finite_or_none(stats.norm.cdf((sharpe - benchmark_sharpe) * np.sqrt(len(returns) - 1) / np.sqrt(variance_term)))


def expected_max_sharpe(trial_sharpes, num_trials: int) -> Optional[float]:
    """SR0 of the deflated Sharpe ratio (Bailey and Lopez de Prado 2014): the expected largest per-period Sharpe ratio
    of `num_trials` trials without skill, sqrt(V) ((1 - gamma) Phi^-1(1 - 1/N) + gamma Phi^-1(1 - 1/(N e))), V the
    variance (ddof 1) of the trials' per-period Sharpe ratios, gamma Euler's constant. One trial selects nothing: 0 (the
    formula's Phi^-1(0) is -inf). None for several trials with fewer than 2 Sharpe ratios known (V is unknown)."""
    if num_trials <= 1:
        return 0.0
    known = [s for s in trial_sharpes if s is not None]
    if len(known) < 2:
        return None
    quantiles = stats.norm.ppf([1 - 1 / num_trials, 1 - 1 / (num_trials * np.e)])
    return float(np.sqrt(np.var(known, ddof=1)) * ((1 - np.euler_gamma) * quantiles[0] + np.euler_gamma * quantiles[1]))


def deflated_sharpe_ratio(returns, trial_sharpes, num_trials: int) -> Optional[float]:
    """DSR (Bailey and Lopez de Prado 2014): the PSR of the series against SR0 = `expected_max_sharpe`, the Sharpe
    ratio the best of `num_trials` unskilled trials would show; None where either is undefined."""
    return probabilistic_sharpe_ratio(returns, expected_max_sharpe(trial_sharpes, num_trials))


def median_or_none(values) -> Optional[float]:
    """The median of the values that are not None; None if none is."""
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def sharpe_summary(period_returns: list, trial_sharpes: list, num_trials: int) -> dict:
    """PSR against 0 and DSR of each run's (stitched out-of-sample) period-return series, and their medians over runs."""
    psr = [probabilistic_sharpe_ratio(r) for r in period_returns]
    dsr = [deflated_sharpe_ratio(r, trial_sharpes, num_trials) for r in period_returns]
    return dict(probabilistic_sharpe=median_or_none(psr), deflated_sharpe=median_or_none(dsr),
                expected_max_sharpe=finite_or_none(expected_max_sharpe(trial_sharpes, num_trials)), num_trials=int(num_trials),
                per_run=[dict(probabilistic_sharpe=p, deflated_sharpe=d) for p, d in zip(psr, dsr)])


def run_summary(metric_runs: dict) -> dict:
    """{metric: {mean, median, iqm, std: {value, ci}}} of one policy; metric_runs {metric: runs [folds, runs]}."""
    return {metric: {name: estimate_with_ci(runs, statistic) for name, statistic in RUN_STATISTICS.items()}
            for metric, runs in metric_runs.items()}


def number_text(value: Optional[float]) -> str:
    """A statistic for the verdict sentence: 2 decimals, or n/a where undefined."""
    return "n/a" if value is None else f"{value:.2f}"


def edge_over(improvement: dict, deflated_sharpe: Optional[float], num_runs: int) -> bool:
    """The verdict's rule: an edge over a baseline only with at least EDGE_MIN_RUNS runs, the lower CI bound of
    P(improvement) over it above 0.5 and a deflated Sharpe ratio above 0.95; anything undefined is no evidence."""
    return (num_runs >= EDGE_MIN_RUNS and improvement["ci"] is not None and improvement["ci"][0] > EDGE_MIN_IMPROVEMENT_LOW
            and deflated_sharpe is not None and deflated_sharpe > EDGE_MIN_DEFLATED_SHARPE)


def verdict(improvements: dict, deflated_sharpe: Optional[float], num_runs: int, num_trials: int) -> str:
    """One quotable sentence on the trained policy: per baseline ({label: {value, ci}} of P(improvement) over it) "edge
    over LABEL" or "no evidence of an edge over LABEL" by `edge_over`, with the numbers that decided it."""
    clauses = []
    for label, improvement in improvements.items():
        ci = improvement["ci"]
        interval = f" [{number_text(ci[0])}, {number_text(ci[1])}]" if ci else " [no CI]"
        claim = "edge" if edge_over(improvement, deflated_sharpe, num_runs) else "no evidence of an edge"
        clauses.append(f"{claim} over {label}: P(improvement) {number_text(improvement['value'])}{interval}")
    few = f", fewer than the {EDGE_MIN_RUNS} an edge needs" if num_runs < EDGE_MIN_RUNS else ""
    return (f"{'; '.join(clauses)}; deflated Sharpe {number_text(deflated_sharpe)} ({num_trials} trials; "
            f"{num_runs} runs{few})")


# ---- BACKTEST ----
def make_backtest(env_params: EnvParams, n_days: int):
    """Jitted contiguous pass over `n_days` days of a split from its first decision day: one account, trading every
    day but the last `settlement_days`.

    `run(policy, policy_args, key, data)`, `policy(policy_args, key, obs, t) -> action in [0, 1]^(n x 2)`; `policy` is
    static, `policy_args` (actor params) and `data` (the split: its `lo` is the first day) traced, so new parameters
    and every walk-forward fold's block of the same length play one compiled program (t, the decision day, lets a
    test's oracle read the planted signal). Returns per-day arrays (equity, opened, exits)."""
    bt_params = env_params.replace(trading_days=n_days - env_params.settlement_days)

    def run(policy, policy_args, key, data):
        start = data.lo

        def _bt_step(state, k):
            a = policy(policy_args, k, get_obs(state.t, bt_params, data), state.t)
            coef, target = scale_action(a, bt_params)
            nxt, reward, done, info = step(state, coef, target, bt_params, data)
            return nxt, dict(t=nxt.t, equity=nxt.equity, reward=reward, n_held=nxt.held.sum(), **{k2: info[k2] for k2 in
                             ("opened", "exits", "exit_col", "exit_price", "exit_entry", "exit_day")})

        _, out = jax.lax.scan(_bt_step, reset_at(start, bt_params), jax.random.split(key, n_days))
        return out

    return jax.jit(run, static_argnums=0)


def split_days(info: dict, split: str) -> int:
    """Steps of a backtest of the split: every decision day but the last (whose next day is outside it)."""
    first, end = info["bounds"][split]
    return end - first - 1


@functools.lru_cache(maxsize=None)
def actor_policy(actor: Actor):
    """The deterministic actor as a backtest policy; policy_args = its params."""
    return lambda params, key, obs, t: actor.apply(params, obs)


@functools.lru_cache(maxsize=None)
def random_policy(n_inv: int):
    """Uniform random coefficients and targets."""
    return lambda policy_args, key, obs, t: jax.random.uniform(key, (n_inv, 2))


def daily_returns(equity: np.ndarray) -> np.ndarray:
    """Per-day returns of a daily equity curve starting at 1.0 (the report's periods)."""
    eq = np.r_[1.0, np.asarray(equity, np.float64)]
    return eq[1:] / eq[:-1] - 1


def period_metrics(equity: np.ndarray, periods_per_year: float = 252.0) -> dict:
    """Metrics of a daily equity curve starting at 1.0 (per-day returns, annualised with 252 days)."""
    eq = np.r_[1.0, equity]
    rets = daily_returns(equity)
    years = max(len(rets) / periods_per_year, 1e-9)
    total = eq[-1] - 1
    ann = (1 + total) ** (1 / years) - 1 if total > -1 else -1.0
    down = rets[rets < 0]
    dd = 1 - eq / np.maximum.accumulate(eq)
    max_dd = float(dd.max())
    sd = rets.std()
    downside = np.sqrt((np.minimum(rets, 0) ** 2).mean())
    return dict(total_return=float(total), annualised_return=float(ann),
                annualised_volatility=float(sd * np.sqrt(periods_per_year)),
                sharpe=float(rets.mean() / sd * np.sqrt(periods_per_year)) if sd > 0 else 0.0,
                sortino=float(rets.mean() / downside * np.sqrt(periods_per_year)) if len(down) else 0.0,
                max_drawdown=max_dd, calmar=float(ann / max_dd) if max_dd > 0 else 0.0, days=int(len(rets)))


def trade_list(out: dict, info: dict, cost_bps: float) -> list[dict]:
    """Closed trades from a backtest's per-day exit arrays."""
    trades = []
    for d in range(len(out["t"])):
        for s in np.flatnonzero(out["exits"][d]):
            entry, price = float(out["exit_entry"][d][s]), float(out["exit_price"][d][s])
            c = cost_bps / 10_000
            trades.append(dict(ticker=info["tickers"][int(out["exit_col"][d][s])],
                               entry_date=day_text(info, int(out["exit_day"][d][s])),
                               exit_date=day_text(info, int(out["t"][d])), entry_price=entry, exit_price=price,
                               return_pct=((price * (1 - c)) / (entry / (1 - c)) - 1) * 100))
    return trades


def trade_metrics(trades: list[dict], n_held: np.ndarray) -> dict:
    """Trade statistics; the profit factor is null (JSON has no infinity) when trades won and none lost."""
    r = np.array([t["return_pct"] for t in trades])
    wins, losses = r[r > 0], r[r <= 0]
    profit_factor = float(wins.sum() / -losses.sum()) if losses.sum() < 0 else (None if len(wins) else 0.0)
    return dict(trades=len(trades), win_rate=float((r > 0).mean()) if len(r) else 0.0, profit_factor=profit_factor,
                average_trade_pct=float(r.mean()) if len(r) else 0.0, exposure=float((n_held > 0).mean()))


def buy_and_hold(data: MarketData, info: dict, split: str, args: Args) -> np.ndarray:
    """Equal-weight buy-and-hold of the investable stocks valid on the first decision day, bought at the next
    open with costs; a delisted stock is held at its last close (its price is carried forward)."""
    t0, hi = info["bounds"][split]
    inv = np.asarray(info["inv"])
    valid0 = np.asarray(data.valid[t0, inv]) & np.asarray(data.valid[t0 + 1, inv])
    cols = inv[valid0]
    c = args.cost_bps / 10_000
    entry = np.asarray(data.open[t0 + 1, cols], np.float64)
    close = np.asarray(data.close[t0 + 1: hi, :], np.float64)[:, cols]
    eq = (close / entry).mean(1) * (1 - c)
    eq[-1] *= 1 - c
    return eq


def backtest_seed(backtest, actor: Actor, params, data: MarketData, info: dict, split: str, args: Args, prng_seed: int,
                  extra_policies=None) -> tuple[dict, list, dict]:
    """One seed's champion vs random (the random key of `prng_seed`) vs equal-weight buy-and-hold, and any
    `extra_policies`, on one split (`backtest`: its `make_backtest`, compiled once for all seeds): ({policy: metrics},
    the champion's trades, {policy: equity curve})."""
    n_inv = len(info["inv"])
    policies = {"champion": (actor_policy(actor), params), "random": (random_policy(n_inv), None)}
    policies.update(extra_policies or {})
    rows, curves, champion_trades = {}, {}, []
    for name, (policy, policy_args) in policies.items():
        out = {k: np.asarray(v) for k, v in backtest(policy, policy_args, jax.random.PRNGKey(prng_seed), data).items()}
        trades = trade_list(out, info, args.cost_bps)
        rows[name] = dict(period_metrics(out["equity"]), **trade_metrics(trades, out["n_held"]))
        curves[name] = out["equity"]
        if name == "champion":
            champion_trades = trades
    lo, _ = info["bounds"][split]
    bh = buy_and_hold(data, info, split, args)
    rows["buy_and_hold"] = dict(period_metrics(bh), trades=int(len(np.flatnonzero(np.asarray(data.valid[lo, info["inv"]])))))
    curves["buy_and_hold"] = bh
    return rows, champion_trades, curves


def day_text(info: dict, index: int) -> str:
    """A day of the data as YYYY-MM-DD."""
    return str(np.datetime64(int(info["dates"][index]), "D"))


def split_period(info: dict, split: str, fold_indices: list) -> dict:
    """The split's name, first decision day and last day over the walk-forward folds `fold_indices` (the first one's
    first day, the last one's last day), and each of their train, validation and test periods."""
    folds = [{"fold": fold, **{name: {"start": day_text(info, first), "end": day_text(info, end - 1)}
                               for name, (first, end) in info["folds"][fold].items()}} for fold in fold_indices]
    return {"split": split, "start": folds[0][split]["start"], "end": folds[-1][split]["end"], "folds": folds}


def over_seeds(rows: list) -> dict:
    """{policy: {metric: {median, min, max}}} over the report's rows (every fold x seed), for every numeric metric (a
    metric that is null for some runs, like a profit factor without a losing trade, over the others; null if null
    for all)."""
    out = {}
    for name, metrics in rows[0].items():
        if not isinstance(metrics, dict):
            continue
        out[name] = {}
        for metric in metrics:
            numbers = [row[name][metric] for row in rows if row[name][metric] is not None]
            out[name][metric] = dict(median=float(np.median(numbers)), min=float(min(numbers)),
                                     max=float(max(numbers))) if numbers else None
    return out


@functools.lru_cache(maxsize=None)
def random_runs_player(backtest, n_inv: int):
    """The random policy played once per key, vmapped over the keys, in one compiled program per backtest length."""
    policy = random_policy(n_inv)
    return jax.jit(jax.vmap(lambda key, data: backtest(policy, None, key, data)["equity"], in_axes=(0, None)))


def random_runs_report(backtest, data: MarketData, info: dict, num_runs: int, seed: int) -> list[tuple[dict, np.ndarray]]:
    """[(metrics, daily returns) of each run] of `num_runs` random policies played in one vmapped `backtest` of the
    split (their keys split from PRNGKey(seed)); only the equity curves leave the device."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num_runs)
    equities = np.asarray(random_runs_player(backtest, len(info["inv"]))(keys, data))
    return [(period_metrics(equity), daily_returns(equity)) for equity in equities]


class FoldRuns(NamedTuple):
    """What one walk-forward fold's test (or evaluated) block gave: the report rows and equity curves of its seeds,
    its random runs and the dates of its played days."""

    rows: list  # one report row per seed
    curves: list  # {policy: equity curve} per seed
    random_runs: list  # (metrics, daily returns) per random run
    days: np.ndarray  # [days] datetime64: the close of each played day


# the report's summary: the trained policies, and the baselines they are compared with
TRAINED_POLICIES = ("champion", "td3_learner")
BASELINES = {"random": "random", "buy_and_hold": "buy-and-hold"}  # report name: name in the verdict
CI_METRICS = ("total_return", "annualised_return", "sharpe")
SUMMARY_ABOUT = (  # the report's summary_about: what its summary holds, and why a field can be null
    "over folds x runs (one fold: the single train/validation/test split). random: the --random-runs random policies of "
    "each fold; champion (each seed's best.msgpack), td3_learner, buy_and_hold: one run per seed and fold. {value, ci}: "
    f"the statistic over all runs, ci its 95% percentile bootstrap interval (scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} "
    "resamples, runs resampled within folds). null where undefined: a ci from a single run per fold, a std of one run, "
    "a Sharpe ratio of constant returns, a deflated Sharpe without the variance of the trials' Sharpe ratios. "
    "probability_of_improvement: P(this policy's total return > the other's), ties 1/2, over all pairs of runs of a "
    "fold, averaged over folds. probabilistic_sharpe (against 0) and deflated_sharpe: of each run's daily returns "
    "stitched over the folds (seed k's fold tests in order; random run r's likewise), the median over runs (per_run: "
    "each run's); num_trials = folds x seeds x --trials for a trained policy, 1 for a baseline (nothing was selected). "
    "percentile_among_random: each run's total return among the random runs of its fold, ties half. Verdict rules: "
    "README.md")


def stitched_returns(folds: list, name: str) -> list:
    """Each run's daily returns of policy `name` over the folds in order: per seed for a trained policy or
    buy-and-hold, per random run (the r-th of every fold) for random."""
    if name == "random":
        return [np.concatenate(runs) for runs in zip(*[[rets for _, rets in fold.random_runs] for fold in folds])]
    return [np.concatenate(runs) for runs in zip(*[[daily_returns(curves[name]) for curves in fold.curves]
                                                   for fold in folds])]


def report_summary(folds: list, trials: int) -> tuple[dict, str]:
    """(summary, verdict) of a report: per policy the STATISTICS of its runs (see SUMMARY_ABOUT), [folds, runs] from
    each fold's FoldRuns; the verdict on the champion against the baselines."""
    per_seed = [name for name in (*TRAINED_POLICIES, "buy_and_hold") if name in folds[0].rows[0]]  # eval-only: no TD3
    metric_runs = {name: {metric: np.array([[row[name][metric] for row in fold.rows] for fold in folds])
                          for metric in CI_METRICS} for name in per_seed}
    metric_runs["random"] = {metric: np.array([[run_metrics[metric] for run_metrics, _ in fold.random_runs]
                                               for fold in folds]) for metric in CI_METRICS}
    totals = {name: policy_runs["total_return"] for name, policy_runs in metric_runs.items()}
    num_folds = len(folds)
    num_trials = num_folds * len(folds[0].rows) * trials
    summary = {}
    for name in metric_runs:
        trained = name in TRAINED_POLICIES
        returns = stitched_returns(folds, name)
        trial_sharpes = [period_sharpe(run_returns) for run_returns in returns] if trained else []
        summary[name] = dict(folds=num_folds, runs=int(totals[name].size), **run_summary(metric_runs[name]),
                             **sharpe_summary(returns, trial_sharpes, num_trials if trained else 1),
                             probability_of_improvement={other: probability_of_improvement(totals[name], totals[other])
                                                         for other in BASELINES if other != name})
        if name != "random":
            percentiles = percentile_among(totals[name], totals["random"])
            summary[name]["percentile_among_random"] = dict(median=median_or_none(percentiles), per_run=percentiles)
    improvements = {label: summary["champion"]["probability_of_improvement"][other] for other, label in BASELINES.items()}
    return summary, verdict(improvements, summary["champion"]["deflated_sharpe"], summary["champion"]["runs"], num_trials)


def evaluate(args: Args, actor: Actor, fold_seeds: list, datasets: dict, info: dict, env_params: EnvParams, run_dir: Path,
             split: str, extra: dict) -> dict:
    """Backtests each seed's policy on a split of each walk-forward fold, seed k with the random key of --seed SEED+k;
    `fold_seeds` = [(fold, [(seed index, champion params, extra policies, extra row fields)])]. Plays --random-runs
    random policies in one vmapped backtest per fold and summarises every policy over folds x runs (`summary`,
    `verdict`). Writes the report files with `extra` in the report. Every fold's block has the same length: one
    compiled backtest plays them all."""
    backtest = make_backtest(env_params, split_days(info, split))
    rows, folds, fold_trades = [], [], []
    for fold, seeds in fold_seeds:
        fold_datasets, fold_info = fold_data(datasets, info, fold)
        data, (first, _) = fold_datasets[split], fold_info["bounds"][split]
        fold_rows, curves = [], []
        for seed_index, params, extra_policies, row_fields in seeds:
            metrics, trades, seed_curves = backtest_seed(backtest, actor, params, data, fold_info, split, args,
                                                         args.seed + seed_index, extra_policies)
            fold_rows.append(dict(fold=fold, seed=seed_index, prng_seed=args.seed + seed_index, **row_fields, **metrics))
            curves.append(seed_curves)
            fold_trades.append(trades)
        random_runs = random_runs_report(backtest, data, fold_info, args.random_runs, args.seed + fold)
        days = info["dates"][first + 1: first + 1 + split_days(info, split)].astype("datetime64[D]")
        folds.append(FoldRuns(fold_rows, curves, random_runs, days))
        rows += fold_rows
    summary, sentence = report_summary(folds, args.trials)
    period = split_period(info, split, [fold for fold, _ in fold_seeds])
    report = dict(period, annualisation="daily returns, x sqrt(252) and 252 trading days a year", **extra,
                  seeds=rows, over_seeds=over_seeds(rows), random_runs=args.random_runs, trials=args.trials,
                  summary_about=SUMMARY_ABOUT, summary=summary, verdict=sentence)
    write_backtest_outputs(run_dir, report, fold_trades, folds)
    return report


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity), written to a temporary file and renamed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)


PLOT_POLICIES = {"champion": "tab:blue", "td3_learner": "tab:green", "random": "tab:gray", "buy_and_hold": "tab:orange"}


def stitched_equity(folds: list, name: str) -> np.ndarray:
    """[runs, days] equity curves of a policy over the folds in order (every fold's block starts at the last one's
    value): one per seed, or per random run."""
    return np.cumprod(1 + np.stack(stitched_returns(folds, name)), axis=1)


def plot_equity(path: Path, folds: list, split: str) -> None:
    """equity.png: per policy the median stitched equity curve over the runs (seeds; random: the random runs) with its
    10-90% band, buy-and-hold as the median line, walk-forward fold boundaries as dotted lines."""
    import matplotlib.pyplot as plt

    days = np.concatenate([fold.days for fold in folds])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, color in PLOT_POLICIES.items():
        if name not in folds[0].curves[0] and name != "random":
            continue
        equity = stitched_equity(folds, name)
        low, median, high = np.percentile(equity, [10, 50, 90], axis=0)
        runs = f"{len(equity)} random runs" if name == "random" else f"{len(equity)} seeds"
        ax.plot(days, median, color=color, lw=1.4, label=f"{name} (median of {runs})")
        if name != "buy_and_hold" and len(equity) > 1:
            ax.fill_between(days, low, high, color=color, alpha=0.18, lw=0)
    for fold in folds[1:]:
        ax.axvline(fold.days[0], color="k", ls=":", lw=0.8)
    ax.axhline(1.0, color="k", lw=0.5)
    folds_text = f", {len(folds)} walk-forward folds (dotted: boundaries)" if len(folds) > 1 else ""
    ax.set_title(f"{split} split equity (start = 1): median and 10-90% band over runs{folds_text}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(path: Path, summary: dict, verdict_text: str) -> None:
    """summary.png: the median total return and Sharpe ratio of each policy with their 95% bootstrap CIs, and the
    verdict."""
    import matplotlib.pyplot as plt

    names = [name for name in PLOT_POLICIES if name in summary]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, metric in zip(axes, ("total_return", "sharpe")):
        for row, name in enumerate(names):
            estimate = summary[name][metric]["median"]
            if estimate["value"] is None:
                continue
            low, high = estimate["ci"] or (estimate["value"], estimate["value"])
            ax.errorbar(estimate["value"], row, xerr=[[estimate["value"] - low], [high - estimate["value"]]], fmt="o",
                        color=PLOT_POLICIES[name], capsize=4)
        ax.axvline(0.0, color="k", lw=0.5)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(f"median {metric.replace('_', ' ')} of the runs, 95% bootstrap CI", fontsize=10)
    fig.suptitle("\n".join(textwrap.wrap(verdict_text, 130)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_backtest_outputs(run_dir: Path, report: dict, fold_trades: list, folds: list) -> None:
    """report.json, trades.csv (every fold's and seed's champion trades), equity.png and summary.png, process 0 only."""
    if jax.process_index() != 0:  # multi-host: process 0 writes
        return
    import matplotlib

    matplotlib.use("Agg")

    write_json(run_dir / "report.json", report)
    lines = ["fold,seed,ticker,entry_date,exit_date,entry_price,exit_price,return_pct"]
    for row, trades in zip(report["seeds"], fold_trades):
        lines += [f"{row['fold']},{row['seed']},{t['ticker']},{t['entry_date']},{t['exit_date']},{t['entry_price']:.6g},"
                  f"{t['exit_price']:.6g},{t['return_pct']:.4f}" for t in trades]
    (run_dir / "trades.csv").write_text("\n".join(lines) + "\n")
    plot_equity(run_dir / "equity.png", folds, report["split"])
    plot_summary(run_dir / "summary.png", report["summary"], report["verdict"])


def seed_policies(runner: RunnerState) -> tuple[list, list]:
    """(champion, TD3 actor) of every seed as host arrays; the champion is the population's first slot: after a GA
    step, the best individual of the last evaluation (elites first)."""
    pop, learner_actor = fetch((runner.pop, runner.learner.actor))
    num_seeds = jax.tree.leaves(pop)[0].shape[0]
    champions = [jax.tree.map(lambda x, k=k: x[k][0], pop) for k in range(num_seeds)]
    return champions, [jax.tree.map(lambda x, k=k: x[k], learner_actor) for k in range(num_seeds)]


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


def transitions_per_generation(args: Args) -> int:
    """Env steps (and replay transitions) of one generation: the population, the learner's greedy and noisy episodes."""
    return (args.pop_size + 2) * args.episodes_per_agent * (args.trading_days + args.settlement_days)


def check_args(args: Args) -> None:
    """Flag combinations that cannot work, caught before any compilation."""
    for name in ("pop_size", "generations", "episodes_per_agent", "worst_k", "tournament_size", "inject_every",
                 "batch_size", "window",
                 "trading_days", "max_positions", "max_holding_days", "chunk_generations", "eval_every", "hidden",
                 "policy_delay", "n_step", "lstm_layers", "attention_heads", "num_seeds", "random_runs", "trials",
                 "walk_forward"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)}). Fix: pass a positive value")
    if args.extractor == "conv" and (args.bidirectional or args.lstm_layers != 1):
        flag = "--bidirectional" if args.bidirectional else "--lstm-layers"
        raise DataError(f"{flag} would be ignored by --extractor conv (it has no LSTM). "
                        f"Fix: pass --extractor lstm or drop {flag}")
    if args.hidden % args.attention_heads:
        raise DataError(f"--attention-heads {args.attention_heads} does not divide --hidden {args.hidden}. "
                        "Fix: pass a divisor of --hidden")
    if any(width < 1 for width in args.stock_layers):
        widths = " ".join(map(str, args.stock_layers))
        raise DataError(f"--stock-layers {widths}: every width must be >= 1. Fix: pass positive widths")
    if args.worst_k > args.episodes_per_agent:
        raise DataError(f"--worst-k {args.worst_k} exceeds --episodes-per-agent {args.episodes_per_agent}. Fix: lower "
                        f"--worst-k")
    for name in ("rl_updates", "settlement_days", "critic_warmup", "critic_stock_embedding"):
        if getattr(args, name) < 0:
            raise DataError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)}). Fix: pass 0 or more")
    if not 1 <= args.num_elites < args.pop_size:
        raise DataError(f"--num-elites {args.num_elites} must be in [1, --pop-size): the champion is the best elite. Fix: "
                        f"pass 1 or more, "
                        "below --pop-size")
    if args.generations % args.chunk_generations:
        raise DataError(f"--generations {args.generations} is not a multiple of --chunk-generations "
                        f"{args.chunk_generations}. Fix: change one")
    if args.eval_every % args.chunk_generations:
        raise DataError(f"--eval-every {args.eval_every} is not a multiple of --chunk-generations {args.chunk_generations} "
                        f"(validation runs "
                        "between chunks). Fix: pass a multiple of it")
    per_generation = transitions_per_generation(args)
    if args.buffer_size < per_generation:
        raise DataError(f"--buffer-size {args.buffer_size} is below one generation's {per_generation} transitions "
                        "((pop-size + 2) x episodes-per-agent x (trading + settlement days)). Fix: pass at least that")
    if not args.target_min < args.target_max:
        raise DataError("--target-min must be below --target-max. Fix: e.g. --target-min 1 --target-max 10")
    if args.walk_forward_train_days is not None and (args.walk_forward == 1 or args.walk_forward_train_days < 1):
        raise DataError(f"--walk-forward-train-days {args.walk_forward_train_days} needs --walk-forward 2 or more and a "
                        "value >= 1. Fix: pass --walk-forward K, or drop --walk-forward-train-days")
    if args.eval_split not in ("train", "val", "test"):
        raise DataError(f"--eval-split '{args.eval_split}' is not train, val or test. Fix: pick one of them")


def hparam_table(args: Args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())


LAYOUT_FLAGS = ("devices", "coordinator_address", "num_processes",
                "process_id")  # how to run, not what: a resume picks its own
RESUME_FLAGS = ("resume", "stop_after") + LAYOUT_FLAGS
EVAL_FLAGS = ("eval_only", "checkpoint", "eval_split", "out_dir", "run_name", "data", "train_end", "val_end", "seed",
              "random_runs", "trials")  # what and where --eval-only plays, and how it is summarised
EVAL_DATA_FLAGS = ("data", "train_end", "val_end", "seed", "random_runs", "trials")  # the checkpoint's unless given


def flags_given(argv) -> set:
    """The Args fields named on the command line (`--flag value`, `--flag=value`, `--no-flag`)."""
    names = set()
    for word in argv:
        if word.startswith("--"):
            name = word[2:].split("=")[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") and name[3:] in Args.__dataclass_fields__ else name)
    return names


def check_mode_flags(args: Args, given: set) -> None:
    """A flag the chosen mode would ignore is an error, not a silent no-op."""
    if args.resume:
        mode, allowed, why = "--resume", RESUME_FLAGS, "the run's config.json sets it"
    elif args.eval_only:
        mode, allowed, why = "--eval-only", EVAL_FLAGS, "the checkpoint's config sets it"
    else:
        allowed = set(Args.__dataclass_fields__) - {"checkpoint", "eval_split"}
        mode, why = "training", "only --eval-only reads it"
    ignored = sorted(set(given) - set(allowed))
    if ignored:
        flag = "--" + ignored[0].replace("_", "-")
        raise DataError(f"{flag} would be ignored in {mode} mode ({why}). Fix: drop {flag}")


def resolve_run(args: Args) -> tuple[Args, Path]:
    """(the run's flags, its folder): a new run's, or a stopped run's own config.json for --resume."""
    if not args.resume:
        run_name = args.run_name or f"erl_{Path(args.data).stem}_{args.seed}_{int(time.time())}"
        args = dataclasses.replace(args, run_name=run_name)
        return args, Path(args.out_dir) / args.run_name
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        raise DataError(f"{run_dir}: no config.json. Fix: pass a run folder written by erl_trader.py")
    saved = json.loads((run_dir / "config.json").read_text())
    return dataclasses.replace(args, **{k: v for k, v in saved.items() if k not in RESUME_FLAGS}), run_dir


def check_out_of_sample(eval_args: Args, trained: Args, info: dict, fold_indices: list) -> None:
    """On the data it was trained on, a policy's "test" must not read a day of its (walk-forward fold's) training or
    validation period."""
    if eval_args.eval_split != "test" or Path(eval_args.data).resolve() != Path(trained.data).resolve():
        return
    dates = info["dates"]
    trained_folds = fold_bounds(len(dates), split_point(trained.train_end, dates, "--train-end"),
                                split_point(trained.val_end, dates, "--val-end"), trained.window, trained.walk_forward,
                                trained.walk_forward_train_days)
    for fold in fold_indices:
        selection_end = trained_folds[fold]["val"][1]  # the checkpoint's first test-embargo day
        first_decision = info["folds"][fold]["test"][0]
        first_read = first_decision - eval_args.window + 1
        if first_read < selection_end:
            day = lambda i: day_text(info, min(i, len(dates) - 1))  # noqa: E731
            raise DataError(f"--eval-split test from {day(first_decision)} reads days from {day(first_read)}, inside the "
                            f"checkpoint's training/validation period (before {day(selection_end)}) on the same data. "
                            f"Fix: drop --train-end/--val-end (the checkpoint's splits) or pass a --val-end of "
                            f"{day(selection_end)} or later")


def eval_only(args: Args, given: set) -> dict:
    """Backtests a policy file, or every seed's best.msgpack of a run folder, on one split, by default on its own data
    and split dates; the outputs go to their own folder, `eval_<split>_<data>/` beside the file (or in the run folder),
    never over the training run's."""
    if not args.checkpoint:
        raise DataError("--eval-only needs --checkpoint PATH. Fix: pass runs/NAME or runs/NAME/seed0/best.msgpack")
    checkpoint = Path(args.checkpoint)
    files = eval_policy_files(checkpoint)
    saved = json.loads(read_policy_file(files[0][2])["config"])
    trained = dataclasses.replace(args, **{k: v for k, v in saved.items() if k in Args.__dataclass_fields__})
    kept = {k: getattr(args, k) for k in EVAL_FLAGS if k in given or k not in EVAL_DATA_FLAGS}
    eval_args = dataclasses.replace(trained, **kept)
    datasets, info = load_data(eval_args)
    fold_indices = sorted({fold for fold, *_ in files})
    check_out_of_sample(eval_args, trained, info, fold_indices)
    env_params = env_params_from_args(eval_args)
    actor = Actor(eval_args, tuple(info["inv"]))
    obs_dummy = get_obs(jnp.int32(eval_args.window - 1), env_params, datasets["train"])
    fold_seeds = [(fold, [(k, load_policy(str(path), actor, obs_dummy), None, {"checkpoint": str(path)})
                          for file_fold, k, path in files if file_fold == fold]) for fold in fold_indices]
    parent = (checkpoint if checkpoint.is_dir() else checkpoint.parent) if args.run_name is None else \
        Path(args.out_dir) / args.run_name
    out_dir = parent / f"eval_{eval_args.eval_split}_{Path(eval_args.data).stem}"
    if out_dir.exists():
        raise DataError(f"{out_dir} exists (an earlier evaluation). Fix: move it away, or pass --run-name NAME for a new "
                        f"folder")
    warn_if_close_only(info)
    period = split_period(info, eval_args.eval_split, fold_indices)
    dates_from = "from --train-end/--val-end" if given & {"train_end", "val_end"} else "the checkpoint's"
    folds_text = f"{len(fold_indices)} fold(s) x " if eval_args.walk_forward > 1 else ""
    print(f"eval-only: {checkpoint} ({folds_text}{len(fold_seeds[0][1])} seed(s)) on {eval_args.data}, "
          f"{eval_args.eval_split} split ({dates_from} split dates): first decision {period['start']}, last day "
          f"{period['end']}; outputs in {out_dir}", flush=True)
    out_dir.mkdir(parents=True)
    report = evaluate(eval_args, actor, fold_seeds, datasets, info, env_params, out_dir, eval_args.eval_split,
                      extra={"checkpoint": str(checkpoint), "data": eval_args.data})
    print(summary_table(report))
    return report


class Trainer(NamedTuple):
    """What the training loop needs besides the runner state (built once per walk-forward fold)."""

    args: Args
    run_dir: Path  # the fold's folder: its checkpoint, logs and policy files
    compiled: Callable  # the jitted, vmapped (over seeds) chunk: (runner, train data) -> (runner, metrics [seeds, gens])
    train_data: MarketData
    validate: Callable  # params -> validation return
    writer: object  # tensorboardX SummaryWriter
    metrics_file: object
    resume_dir: Path  # what --resume continues: the run folder
    fold: int  # the walk-forward fold (0 for the single split)


def start_fold(args: Args, run_dir: Path, init: Callable, mesh: Mesh) -> tuple[RunnerState, object, dict]:
    """The seed-stacked runner state of one fold, placed on the mesh: new, or restored from the fold's checkpoint on
    --resume (a fold that had not started yet starts new); returns (runner, the learners' actors at the start,
    checkpoint bookkeeping)."""
    runner = stack_seeds([init(jax.random.PRNGKey(args.seed + k)) for k in range(args.num_seeds)])
    learner_at_start = runner.learner.actor  # the same on --resume (init is deterministic): the report shows what TD3 learned
    extra = {"chunk": 0, "best_val": [-1e30] * args.num_seeds, "best_from": [""] * args.num_seeds, "elapsed": 0.0}
    checkpoint = run_dir / "checkpoint.msgpack"
    resumed = bool(args.resume) and checkpoint.is_file()
    if resumed:
        runner, extra = load_checkpoint(checkpoint, runner)
    runner = place(runner, runner_shardings(runner, mesh))
    if not resumed:
        save_checkpoint(checkpoint, runner, extra, args)  # a NaN in the first chunk still leaves a good checkpoint
    return runner, learner_at_start, extra


def compile_chunk(chunk: Callable, runner: RunnerState, train_data: MarketData, mesh: Mesh) -> Callable:
    """A chunk vmapped over seeds, compiled once for the run: every walk-forward fold plays it (the split bounds are
    data)."""
    shardings, copy = runner_shardings(runner, mesh), NamedSharding(mesh, PartitionSpec())
    # vmap over seeds; spmd_axis_name puts the seed axis on the mesh's "seed" devices inside the chunk too
    seeds_chunk = jax.vmap(chunk, in_axes=(seed_axes(), None), out_axes=(seed_axes(), 0), spmd_axis_name="seed")
    jitted = jax.jit(seeds_chunk, in_shardings=(shardings, copy),
                     out_shardings=(shardings, NamedSharding(mesh, PartitionSpec("seed"))))
    return jitted.lower(runner, train_data).compile()


def validate_and_keep_best(trainer: Trainer, runner: RunnerState, row: dict, extra: dict) -> None:
    """Every seed's champion and TD3 actor play the validation split; each seed's best so far is its
    seed<k>/best.msgpack. The row gets the means over seeds, each seed's row its own returns."""
    champions, learners = seed_policies(runner)
    for seed_index, seed_row in enumerate(row["seeds"]):
        for who, params in (("champion", champions[seed_index]), ("learner", learners[seed_index])):
            seed_row[f"{who}_val_return"] = trainer.validate(params)
            if seed_row[f"{who}_val_return"] > extra["best_val"][seed_index]:
                extra["best_val"][seed_index] = seed_row[f"{who}_val_return"]
                extra["best_from"][seed_index] = f"{who} of generation {row['generation']}"
                save_policy(policy_file(trainer.run_dir, seed_index, "best"), params, trainer.args, seed_index, trainer.fold)
    for who in ("champion", "learner"):
        row[f"{who}_val_return"] = float(np.mean([seed_row[f"{who}_val_return"] for seed_row in row["seeds"]]))


CHART_TAGS = ("fitness_mean", "fitness_max", "fitness_min", "learner_fitness", "explore_return", "champion_fitness")
SEED_TAGS = ("fitness_mean", "fitness_max", "learner_fitness", "critic_loss", "champion_val_return",
             "learner_val_return")  # TensorBoard seeds/<tag>/seed<k>


def generation_row(metrics: dict, generation: int) -> dict:
    """One generation of the chunk metrics ([seeds, chunk_generations] arrays, `generation` an index into the
    second axis) -> the mean over seeds of every value (a flag: the share of seeds where it holds; whether the
    learner was injected is the same for all seeds) and each seed's own values under `seeds`."""
    seeds = [{k: (bool(v[s, generation]) if v.dtype == bool else float(v[s, generation])) for k, v in metrics.items()}
             for s in range(len(metrics["fitness_mean"]))]
    row = {k: float(np.mean([seed_row[k] for seed_row in seeds])) for k in metrics}
    row["injected"] = seeds[0]["injected"]
    for values in (row, *seeds):  # no actor step yet (--critic-warmup, --rl-updates 0): null, not NaN (strict JSON)
        values["actor_loss"] = finite_or_none(values["actor_loss"])
    return dict(row, seeds=seeds)


def mean_and_spread(row: dict, key: str, fmt: str) -> str:
    """A generation's value: the mean over seeds, and with several seeds their range [min..max]."""
    values = [seed_row[key] for seed_row in row["seeds"]]
    text = format(row[key], fmt)
    return text + (f" [{min(values):{fmt}}..{max(values):{fmt}}]" if len(values) > 1 else "")


def log_generation(trainer: Trainer, row: dict, eta: float) -> None:
    """One generation's row: TensorBoard scalars (means over seeds under CleanRL-style tags, each seed's under
    seeds/<tag>/seed<k>), a metrics.jsonl line, a progress line."""
    writer, step_count = trainer.writer, row["env_steps"]
    for tag in CHART_TAGS:
        writer.add_scalar(f"charts/{tag}", row[tag], step_count)
    writer.add_scalar("charts/injected_is_elite", float(row["injected_is_elite"]), step_count)
    for tag in ("critic_loss", "actor_loss"):
        if row[tag] is not None:
            writer.add_scalar(f"losses/{tag}", row[tag], step_count)
    for who in ("champion", "learner"):
        if f"{who}_val_return" in row:
            writer.add_scalar(f"eval/{who}_val_return", row[f"{who}_val_return"], step_count)
    for seed_index, seed_row in enumerate(row["seeds"]):
        for tag in SEED_TAGS:
            if tag in seed_row:
                writer.add_scalar(f"seeds/{tag}/seed{seed_index}", seed_row[tag], step_count)
    writer.add_scalar("perf/SPS", row["sps"], step_count)
    trainer.metrics_file.write(json.dumps(row) + "\n")
    elites, num_seeds = sum(seed_row["injected_is_elite"] for seed_row in row["seeds"]), len(row["seeds"])
    if not row["injected"]:
        injected = "-"
    elif num_seeds == 1:
        injected = "elite" if elites else "not elite"
    else:
        injected = f"elite in {elites}/{num_seeds} seeds"
    val = ""
    if "champion_val_return" in row:
        val = (f"  val {mean_and_spread(row, 'champion_val_return', '+.4f')} (learner "
               f"{mean_and_spread(row, 'learner_val_return', '+.4f')})")
    actor = "-" if row["actor_loss"] is None else format(row["actor_loss"], "+.4f")  # "-": no actor step yet
    print(f"gen {row['generation']:4d}/{trainer.args.generations}  fitness mean {row['fitness_mean']:+.3f} max "
          f"{mean_and_spread(row, 'fitness_max', '+.3f')} min {row['fitness_min']:+.3f}  learner "
          f"{mean_and_spread(row, 'learner_fitness', '+.3f')}{val}  critic {row['critic_loss']:.4f} actor "
          f"{actor}  injected {injected}  env-steps/s {row['sps']:,.0f}  elapsed {row['elapsed']:.0f}s  "
          f"ETA {eta:.0f}s", flush=True)


def diverged_seeds(metrics: dict, watched: tuple) -> list[int]:
    """Indices of the seeds with a NaN/inf in a watched metric of the chunk ([seeds, chunk_generations] arrays)."""
    finite = np.stack([np.isfinite(metrics[k]).all(1) for k in watched]).all(0)
    return [int(k) for k in np.flatnonzero(~finite)]


def run_chunks(trainer: Trainer, runner: RunnerState, extra: dict) -> tuple[RunnerState, str]:
    """The training loop: chunk after chunk, logging each generation, validating, checkpointing; stops early on
    a NaN in any seed (keeping the last good checkpoint), --stop-after or Ctrl-C. Returns (runner, status)."""
    args, ckpt = trainer.args, trainer.run_dir / "checkpoint.msgpack"
    num_chunks = args.generations // args.chunk_generations
    steps_per_gen = transitions_per_generation(args) * args.num_seeds
    watched = ("fitness_mean", "learner_fitness") + (("critic_loss",) if args.rl_updates else ())  # no TD3 step, no loss
    interrupted = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    start_chunk, elapsed_before, t_start = extra["chunk"], extra["elapsed"], time.time()
    try:
        for chunk_index in range(start_chunk, num_chunks):
            t_chunk = time.time()
            new_runner, metrics = trainer.compiled(runner, trainer.train_data)
            metrics = fetch(metrics)  # [seeds, chunk_generations]
            diverged = diverged_seeds(metrics, watched)
            if diverged:
                which = ", ".join(f"seed {k} (--seed {args.seed + k})" for k in diverged)
                print(f"error: NaN/inf in {which} at chunk {chunk_index + 1}; stopping. The last good checkpoint is {ckpt}. "
                      "Fix: lower --critic-lr/--actor-lr or check the data", file=sys.stderr, flush=True)
                return runner, "nan"
            runner = new_runner
            sps = steps_per_gen * args.chunk_generations / (time.time() - t_chunk)
            for g in range(args.chunk_generations):
                gen = chunk_index * args.chunk_generations + g + 1
                row = dict(generation_row(metrics, g), generation=gen, env_steps=gen * steps_per_gen, sps=sps)
                if g == args.chunk_generations - 1 and (gen % args.eval_every == 0 or gen == args.generations):
                    started = time.time()
                    validate_and_keep_best(trainer, runner, row, extra)
                    extra["val_seconds"] = extra.get("val_seconds", 0.0) + time.time() - started
                row["elapsed"] = elapsed_before + time.time() - t_start
                eta = (time.time() - t_start) / (chunk_index + 1 - start_chunk) * (num_chunks - chunk_index - 1)
                log_generation(trainer, row, eta)
            trainer.metrics_file.flush()
            extra.update(chunk=chunk_index + 1, elapsed=elapsed_before + time.time() - t_start)
            save_checkpoint(ckpt, runner, extra, args)
            if interrupted["flag"] or (args.stop_after is not None and chunk_index + 1 - start_chunk >= args.stop_after):
                print(f"stopped after chunk {chunk_index + 1}; checkpoint saved. Continue with: python erl_trader.py --resume "
                      f"{trainer.resume_dir}", flush=True)
                return runner, "stopped"
    finally:
        signal.signal(signal.SIGINT, old_handler)
    return runner, "done"


def fold_policies(args: Args, run_dir: Path, runner: RunnerState, learner_at_start, extra: dict, actor: Actor,
                  obs_dummy: jax.Array, fold: int) -> list:
    """At the end of a fold's training: every seed's final.msgpack; returns what the test backtests play, per seed
    (seed index, its best.msgpack by its validation return, its TD3 actor at the end and at the start, row fields)."""
    finals, learners = seed_policies(runner)
    for seed_index, params in enumerate(finals):
        save_policy(policy_file(run_dir, seed_index, "final"), params, args, seed_index, fold)
    best = finals
    if jax.process_index() == 0:
        best = [load_policy(str(policy_file(run_dir, k, "best")), actor, obs_dummy) for k in range(args.num_seeds)]
    if jax.process_count() > 1:  # process 0's best policies to every process: all play the test split, process 0 writes
        best = multihost_utils.broadcast_one_to_all(best)
    at_start = fetch(learner_at_start)
    seeds = []
    for k in range(args.num_seeds):
        learner_rows = {"td3_learner": (actor_policy(actor), learners[k]),
                        "td3_learner_at_start": (actor_policy(actor), jax.tree.map(lambda x, k=k: x[k], at_start))}
        seeds.append((k, best[k], learner_rows, {"checkpoint": str(policy_file(run_dir, k, "best")),
                                                 "best_from": extra["best_from"][k]}))
    return seeds


def final_report(args: Args, run_dir: Path, fold_seeds: list, datasets: dict, info: dict, env_params: EnvParams) -> dict:
    """Every fold's seeds (`fold_policies`) on their fold's test block: report.json and the other report files."""
    actor = Actor(args, tuple(info["inv"]))
    selected_by = ("best validation return of each seed's population champion and TD3 actor (seed<k>/best.msgpack; "
                   "best_from says which)")
    report = evaluate(args, actor, fold_seeds, datasets, info, env_params, run_dir, "test", extra={"selected_by": selected_by})
    print(summary_table(report))
    return report


def fold_text(info: dict, fold: int) -> str:
    """A walk-forward fold's periods, for the progress output."""
    return f"fold {fold}/{len(info['folds'])}: " + ", ".join(
        f"{name} {day_text(info, first)}..{day_text(info, end - 1)}" for name, (first, end) in info["folds"][fold].items())


def train_fold(args: Args, run_dir: Path, fold: int, fold_dir_path: Path, compiled: Callable, train_data: MarketData,
               validate: Callable, runner: RunnerState, extra: dict) -> tuple[RunnerState, str]:
    """One fold's training loop with its own TensorBoard events and metrics.jsonl in its folder."""
    from tensorboardX import SummaryWriter

    main_process = jax.process_index() == 0  # multi-host: only process 0 writes files
    writer = SummaryWriter(str(fold_dir_path), write_to_disk=main_process)
    if extra["chunk"] == 0:
        writer.add_text("hyperparameters", hparam_table(args))
    with open(fold_dir_path / "metrics.jsonl" if main_process else os.devnull, "a") as metrics_file:
        trainer = Trainer(args, fold_dir_path, compiled, train_data, validate, writer, metrics_file, run_dir, fold)
        try:
            return run_chunks(trainer, runner, extra)
        finally:
            writer.close()


def train_and_report(args: Args) -> dict:
    """The whole training job: load data; per walk-forward fold (one by default), evolve every seed in chunks
    (logging, checkpoints, validation on the fold's validation block) with the one compiled chunk; backtest each
    fold's and seed's best policy on the fold's test block."""
    args, run_dir = resolve_run(args)
    mesh = make_mesh(args)  # a layout that cannot work fails before anything is written
    datasets, info = load_data(args)
    env_params = env_params_from_args(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and jax.process_index() == 0:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    warn_if_close_only(info)
    inv = tuple(info["inv"])
    actor = Actor(args, inv)
    obs_dummy = get_obs(jnp.int32(args.window - 1), env_params, datasets["train"])
    init, chunk, *_ = make_erl(args, env_params, datasets["train"], len(inv), inv, mesh)
    val_backtest = make_backtest(env_params, split_days(info, "val"))  # every fold's validation block: one program
    num_folds, compiled, fold_seeds = len(info["folds"]), None, []
    for fold in range(num_folds):
        fold_datasets, _ = fold_data(datasets, info, fold)
        fold_dir_path = fold_dir(run_dir, fold, num_folds)
        fold_dir_path.mkdir(parents=True, exist_ok=True)
        started = time.time()
        runner, learner_at_start, extra = start_fold(args, fold_dir_path, init, mesh)
        train_data = place(fold_datasets["train"], NamedSharding(mesh, PartitionSpec()))  # a copy on every device
        if compiled is None:
            compiled = compile_chunk(chunk, runner, train_data, mesh)
            print_run_line(args, run_dir, runner, mesh, time.time() - started)
        if num_folds > 1:
            print(fold_text(info, fold), flush=True)

        def validate(params, val_data=fold_datasets["val"]) -> float:
            equity = val_backtest(actor_policy(actor), params, jax.random.PRNGKey(args.seed), val_data)["equity"]
            return float(np.asarray(equity)[-1] - 1.0)

        runner, status = train_fold(args, run_dir, fold, fold_dir_path, compiled, train_data, validate, runner, extra)
        if status != "done":
            return {"status": status, "run_dir": str(run_dir)}
        print(f"validation backtests: {extra.get('val_seconds', 0.0):.1f}s of {extra['elapsed']:.1f}s of training",
              flush=True)
        fold_seeds.append((fold, fold_policies(args, fold_dir_path, runner, learner_at_start, extra, actor, obs_dummy,
                                               fold)))
    return final_report(args, run_dir, fold_seeds, datasets, info, env_params)


def print_run_line(args: Args, run_dir: Path, runner: RunnerState, mesh: Mesh, compile_seconds: float) -> None:
    """The run's sizes, device layout and compile time."""
    pop_devices, replay_bytes = mesh.shape["d"], replay_bytes_per_transition(runner.replay, leading_axes=2)
    folds = f"  walk-forward folds {args.walk_forward}" if args.walk_forward > 1 else ""
    print(f"run {run_dir}  generations {args.generations}  seeds {args.num_seeds}{folds}  pop {args.pop_size}  env "
          f"steps/generation {transitions_per_generation(args)} per seed  replay {replay_bytes} bytes/transition  "
          f"devices {mesh.devices.size} ({mesh.shape['seed']} seed x {pop_devices} pop, {args.pop_size // pop_devices} actors "
          f"each, {jax.process_count()} process(es))  compile {compile_seconds:.1f}s", flush=True)


SUMMARY_METRICS = ("total_return", "sharpe", "max_drawdown", "trades")
SUMMARY_POLICIES = ("champion", "td3_learner", "td3_learner_at_start", "random", "buy_and_hold")


def table_line(label: str, values) -> str:
    """One line of the summary table: a label, then each value (or column name) right-aligned in 14 characters."""
    return f"{label:<50}" + "".join(f"{value:>14.4g}" if not isinstance(value, str) else f"{value:>14}" for value in values)


def summary_table(report: dict) -> str:
    """A short view of a report: a line per (walk-forward fold and) seed and policy (total return, Sharpe, max
    drawdown, trades), a line per policy with the median over the runs, and the verdict."""
    names = [name for name in SUMMARY_POLICIES if name in report["over_seeds"]]
    lines = [table_line(f"{report['split']} split", SUMMARY_METRICS)]
    several_folds = len(report["folds"]) > 1
    for row in report["seeds"]:
        run = f"fold {row['fold']} seed {row['seed']}" if several_folds else f"seed {row['seed']}"
        lines += [table_line(f"  {run} {name}", [row[name][metric] for metric in SUMMARY_METRICS]) for name in names]
    over = "folds x seeds" if several_folds else "seeds"
    lines += [table_line(f"  median over {over} {name}", [report["over_seeds"][name][metric]["median"]
                                                         for metric in SUMMARY_METRICS]) for name in names]
    return "\n".join(lines + [f"verdict, {report['split']} split: {report['verdict']}"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        given = flags_given(argv)
        check_mode_flags(args, given)
        check_args(args)
        if args.eval_only:
            eval_only(args, given)
            return 0
        init_distributed(args)
        result = train_and_report(args)
    except DataError as e:
        print(f"erl_trader: error: {e}", file=sys.stderr)
        return 2
    return 1 if result.get("status") == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
