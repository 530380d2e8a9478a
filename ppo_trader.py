"""ppo_trader.py: masked PPO on an intraday futures/forex environment, in one file, jitted end to end.

    python ppo_trader.py                                   # SPY 1-minute RTH sample, a few minutes on a 2-core CPU
    python ppo_trader.py --num-envs 4096 --num-steps 64    # GPU-sized
    python ppo_trader.py --eval-only --checkpoint runs/NAME                  # every seed's best.msgpack
    python ppo_trader.py --eval-only --checkpoint runs/NAME/seed0/best.msgpack     # one seed's
    python ppo_trader.py --run-name p1                                       # phase 1, then phase 2 from it:
    python ppo_trader.py --phase 2 --init-from runs/p1/seed0/best.msgpack
    python ppo_trader.py --action-space continuous --max-contracts 3  # target positions instead of BUY/SELL
    python ppo_trader.py --walk-forward 4 --num-seeds 4              # 4 walk-forward folds (runs/NAME/fold<f>/) x 4 seeds

The file reads top to bottom as the data flows: args, data arrays, env (gymnax style: pure `reset` and
`step` on `EnvState`/`EnvParams`), networks, PPO (`make_train(args) -> train`, PureJaxRL shape), outer loop
(chunks of updates, logging, checkpoints), backtest, main. Design: ../shared/DESIGN.md sections 2a, 3, 4.
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
from typing import NamedTuple, Optional

import distrax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats


# ---- ARGS ----
@dataclasses.dataclass
class Args:
    """Masked PPO on intraday bars; every flag below is documented in --help."""

    data: str = "data/spy_1min.npz"
    """intraday .npz written by data_prep.py (one or several markets)"""
    seed: int = 1
    """random seed; with --num-seeds N, seed k uses SEED+k (same seed, same result on one machine)"""
    run_name: Optional[str] = None
    """name of the folder under runs/ (default: ppo_<data>_<seed>_<time>)"""
    total_timesteps: int = 2_000_000
    """env steps to train for, per seed (rounded up to whole chunks of updates)"""
    num_envs: int = 64
    """parallel environments (vmapped)"""
    num_steps: int = 128
    """steps per environment per rollout"""
    num_seeds: int = 1
    """seeds trained at once with vmap: seed k (0..N-1) is the same run as --num-seeds 1 --seed SEED+k,
    with its own model selection, policy files runs/NAME/seed<k>/ and test backtest"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """epochs over each rollout"""
    clip_coef: float = 0.2
    """PPO surrogate clipping"""
    clip_vloss: bool = True
    """clip the value loss as in PPO2"""
    ent_coef: float = 0.01
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: int = 128
    """units per hidden layer (two layers, tanh) of actor and critic"""
    train_end: str = "0.7"
    """end of the training split: a date (YYYY-MM-DD, exclusive) or a fraction of all markets' bars on one common
    timeline (one cut for every market)"""
    val_end: str = "0.85"
    """end of the validation split (the test split is the rest); one window of bars is embargoed between splits"""
    walk_forward: int = 1
    """walk-forward folds: the bars after --val-end's embargo are cut into K equal, consecutive test blocks (one time
    for every market); fold f moves --train-end/--val-end by f blocks, trains, selects on its validation block and is
    tested on its own block (runs/NAME/fold<f>/); 1 = the single split"""
    walk_forward_train_bars: Optional[int] = None
    """with --walk-forward: each fold trains on each market's last this many bars before its training end (rolling
    windows; default: expanding, from the first bar)"""
    market_weights: Optional[tuple[float, ...]] = None
    """probability of drawing each market at an episode's reset, one number per market of --data (normalised to sum 1;
    default: in proportion to each market's training bars)"""
    window: int = 16
    """bars of market features in an observation"""
    contracts: int = 1
    """contracts (lots) per trade"""
    sl_atr_mult: float = 1.5
    """stop-loss distance in ATR(14) of the decision bar"""
    tp_atr_mult: float = 3.0
    """take-profit distance in ATR(14) of the decision bar"""
    slippage_ticks: float = 1.0
    """ticks of slippage against the trader on market fills (entries, stops, flatten, liquidation)"""
    commission: Optional[float] = None
    """commission per contract per side (default: the market's, from the data file)"""
    initial_balance: float = 50_000.0
    """account balance at the start of an episode"""
    dd_limit: float = 2_000.0
    """trailing drawdown: equity at or below peak - dd_limit liquidates and ends the episode"""
    dd_lock_offset: float = 0.0
    """the threshold stops trailing once it reaches initial_balance + dd_lock_offset"""
    breach_penalty: float = 0.0
    """extra negative reward when the drawdown limit is breached"""
    episode_bars: int = 256
    """bars per episode (truncation); episodes start at a random RTH bar of the training split"""
    no_entry_bars: int = 2
    """no new entries this many bars (or fewer) before the session end"""
    flatten_at_close: bool = True
    """close any position at the session end's close"""
    action_space: str = "discrete"
    """discrete: the actions of --phase; continuous (phase 1 only): a target position in [-1, 1] x --max-contracts
    (squashed Gaussian), rounded to whole contracts"""
    max_contracts: int = 1
    """--action-space continuous: the largest position, in contracts (the policy's +-1)"""
    phase: int = 1
    """1: learn entries (HOLD, BUY, SELL); 2: also manage the open position (MOVE_SL_TO_BE, ENABLE_TRAIL, DISABLE_TRAIL)"""
    trail_atr_mult: float = 1.0
    """phase 2: a trailing stop sits this many ATR (of the decision bar) behind the best price since entry"""
    init_from: Optional[str] = None
    """phase 2: start from a phase 1 policy's weights (policy head grown) and obs normaliser: a policy file
    (runs/NAME/seed<k>/best.msgpack or final.msgpack) for every seed, or a phase 1 run folder runs/NAME with
    --num-seeds seeds, seed k from its seed<k>/best.msgpack"""
    new_action_mass: float = 0.01
    """with --init-from: each new action starts with about this probability relative to HOLD"""
    curriculum: bool = False
    """ease the rules at the start of training: dd limit and commission move linearly from the start values below to
    the real ones"""
    curriculum_dd_start: Optional[float] = None
    """--curriculum: trailing drawdown limit at the start of training (default: 2 x --dd-limit)"""
    curriculum_commission_start: float = 0.0
    """--curriculum: commission at the start of training, as a fraction of the real one (0: free)"""
    curriculum_end: float = 0.8
    """--curriculum: fraction of training after which the real values hold"""
    chunk_updates: int = 10
    """updates per jitted chunk; the host logs and checkpoints between chunks"""
    eval_every: int = 5
    """chunks between validation backtests (model selection uses the validation split only)"""
    stop_after: Optional[int] = None
    """stop after this many chunks (as if interrupted) and save a checkpoint; continue with --resume"""
    resume: Optional[str] = None
    """continue the run in this folder (runs/NAME) from its last checkpoint"""
    eval_only: bool = False
    """only backtest --checkpoint on --eval-split (no training)"""
    checkpoint: Optional[str] = None
    """--eval-only: a policy file (runs/NAME/seed<k>/best.msgpack or final.msgpack: that seed) or a run folder
    (runs/NAME: every seed's best.msgpack)"""
    eval_split: str = "test"
    """split backtested by --eval-only: train, val or test"""
    random_runs: int = 100
    """random legal policies played in one vmapped backtest of the report's split (keys split from --seed's): the
    distribution the report ranks the trained policy in (its percentile) and compares it with (P(improvement))"""
    trials: int = 1
    """configurations tried on this data so far, this one included, for the report's deflated Sharpe ratio (number of
    trials = seeds x folds x --trials)"""
    out_dir: str = "runs"
    """parent folder of run folders"""
    devices: Optional[int] = None
    """devices per process to shard over (default: all local devices); seeds and envs are split across them"""
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
    """Device arrays of M markets x T bars for one split (features already normalised)."""

    open: jax.Array
    high: jax.Array
    low: jax.Array
    close: jax.Array
    atr: jax.Array
    rth: jax.Array
    session_end: jax.Array
    bars_to_close: jax.Array  # bars until the session end (0 on it), int32
    hours_to_close: jax.Array  # hours until the session end's bar, clipped to [0, 24]
    features: jax.Array  # [M, T, F]
    starts: jax.Array  # [M, S] episode start bars (every RTH bar inside the split), padded
    n_starts: jax.Array  # [M]
    lo: jax.Array  # [M] first bar of the split
    hi: jax.Array  # [M] end of the split (exclusive)
    point_value: jax.Array  # [M]
    tick_size: jax.Array  # [M]
    commission: jax.Array  # [M]
    market_weights: jax.Array  # [M] probabilities of drawing each market at reset


def split_time(text: str, all_ts: np.ndarray, flag: str) -> int:
    """The UTC nanosecond time where a split ends: a date, or a fraction of the union of every market's bars
    (one date for all markets, so no market's training data overlaps another's validation or test period)."""
    try:
        x = float(text)
        if 0 < x < 1:
            return int(all_ts[int(len(all_ts) * x)])
    except ValueError:
        pass
    try:
        return int(np.datetime64(text, "ns").astype(np.int64))
    except ValueError:
        raise DataError(f"{flag} '{text}' is neither a fraction in (0, 1) nor a date YYYY-MM-DD. "
                        f"Fix: e.g. {flag} 2017-09-01") from None


def scheduled_closes(ts: np.ndarray, rth: np.ndarray, rth_window: str, tz: str, rollover: str) -> np.ndarray:
    """UTC nanoseconds of every session's scheduled close, sorted: the RTH end (`rth_window` 'HH:MM-HH:MM' in the
    exchange zone `tz`, DST handled) of each day with an RTH bar, or for a 24 h market ('none') the `rollover`
    that ends each session. The exchange calendar, known in advance: a gap in the bars does not move a close."""
    import pandas as pd

    local = pd.DatetimeIndex(ts[rth]).tz_localize("UTC").tz_convert(tz)
    end = (rollover if rth_window == "none" else rth_window.split("-")[1]).split(":")
    end_offset = pd.Timedelta(hours=int(end[0]), minutes=int(end[1]))
    # a 24 h session belongs to the day of the rollover that ends it
    session_day = local + (pd.Timedelta(days=1) - end_offset) if rth_window == "none" else local
    session_day = session_day.normalize().tz_localize(None)
    closes = (pd.DatetimeIndex(np.unique(session_day.to_numpy())) + end_offset).tz_localize(tz).tz_convert("UTC")
    return np.sort(closes.as_unit("ns").asi8)


def calendar_arrays(ts: np.ndarray, closes: np.ndarray, bar_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bar, from the scheduled closes: bars_to_close (whole bars after this one until the next close, 0 on the
    bar that closes at it; int32, T if none) and hours_to_close (from the bar's close, clipped to [0, 24]; 24 if none)."""
    bar_close = ts + bar_ns
    i = np.searchsorted(closes, bar_close)
    has = i < len(closes)
    remaining = np.where(has, closes[np.minimum(i, len(closes) - 1)] - bar_close, 0)
    bars = np.where(has, -(-remaining // bar_ns), len(ts)).astype(np.int32)
    hours = np.where(has, np.clip(remaining / 3.6e12, 0.0, 24.0), 24.0)
    return bars, hours.astype(np.float32)


def market_weights(args: Args, names: list, bounds: list, path: Path) -> np.ndarray:
    """[M] probabilities of drawing each market at reset: --market-weights normalised, or by training bars."""
    if args.market_weights is None:
        lens = np.array([b["train"][1] - b["train"][0] for b in bounds], np.float64)
        return (lens / lens.sum()).astype(np.float32)
    w = np.asarray(args.market_weights, np.float64)
    if len(w) != len(names):
        raise DataError(f"--market-weights has {len(w)} numbers, {path} holds {len(names)} markets ({' '.join(names)}). Fix: "
                        "pass one weight per market, in that order")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise DataError(f"--market-weights {' '.join(map(str, args.market_weights))}: weights must be finite, >= 0 and not "
                        f"all 0. Fix: e.g. --market-weights {' '.join(['1'] * len(names))}")
    return (w / w.sum()).astype(np.float32)


def fold_bounds(all_ts: np.ndarray, market_ts: list, train_end: int, val_end: int, window: int, folds: int = 1,
                train_bars: Optional[int] = None) -> list[list[dict]]:
    """Per walk-forward fold, per market, the bar bounds {'train', 'val', 'test'}: (first, end) of each split.

    `all_ts` is the sorted union of every market's bar times, `market_ts` each market's own, `train_end`/`val_end` the
    UTC nanosecond times where fold 0's training and validation splits end. The union's bars from fold 0's validation
    end + `window` to the last are cut into `folds` equal blocks (the remainder, under `folds` bars, at the end is left
    out); fold f moves both split times of fold 0 by f blocks, so every market is cut at the same times. Per market,
    validation starts `window` bars after the training end and the test `window` bars after the validation end (the
    embargo); fold f's test ends where fold f + 1's begins, so the test blocks are consecutive and tile the history
    after fold 0's validation embargo. Training starts at the first bar (expanding windows), or `train_bars` bars
    before its end (rolling). One fold is the single split, its test running to each market's last bar."""
    first_train, first_val = int(np.searchsorted(all_ts, train_end)), int(np.searchsorted(all_ts, val_end))
    block = (len(all_ts) - first_val - window) // folds

    def bar(ts: np.ndarray, position: int) -> int:
        """The market's first bar at or after the union's bar `position` (its length past the union's end)."""
        return len(ts) if position >= len(all_ts) else int(np.searchsorted(ts, all_ts[position]))

    out = []
    for fold in range(folds):
        shift, markets = fold * block, []
        for ts in market_ts:
            n = len(ts)
            train_last, val_last = bar(ts, first_train + shift), bar(ts, first_val + shift)
            test_end = n if folds == 1 else min(bar(ts, first_val + shift + block) + window, n)
            markets.append({"train": (0 if train_bars is None else train_last - train_bars, train_last),
                            "val": (train_last + window, val_last), "test": (min(val_last + window, n), test_end)})
        out.append(markets)
    return out


def check_fold_lengths(folds: list, names: list, window: int, episode_bars: int, path: Path) -> None:
    """Every split of every fold and market holds a window and a quarter episode; a rolling training window starts
    inside the data."""
    need = window + episode_bars // 4 + 1
    for fold, bounds in enumerate(folds):
        where = f"walk-forward fold {fold}'s " if len(folds) > 1 else ""
        fix = "lower --walk-forward, " if len(folds) > 1 else ""
        for name, b in zip(names, bounds):
            if b["train"][0] < 0:
                raise DataError(f"{path}: {where}rolling training window (--walk-forward-train-bars) of market {name} starts "
                                f"{-b['train'][0]} bars before its first bar. Fix: lower --walk-forward-train-bars or move "
                                "--train-end later")
            for split, (lo, hi) in b.items():
                rolling = "raise --walk-forward-train-bars, " if split == "train" and lo > 0 else ""
                if hi - lo < need:
                    raise DataError(f"{path}: {where}market {name} has {max(hi - lo, 0)} bars in the {split} split, fewer "
                                    f"than window + a quarter episode ({need}). Fix: {rolling}{fix}move "
                                    "--train-end/--val-end, or lower --window/--episode-bars")


def episode_starts(rth: np.ndarray, bounds: list, split: str, window: int) -> list[np.ndarray]:
    """Per market, every RTH bar of the split that can start an episode (a window inside the split and a next bar),
    so training plays every time of the session; the split's first decision bar if none."""
    starts = []
    for m, b in enumerate(bounds):
        lo, hi = b[split]
        s = np.flatnonzero(rth[m, :hi])
        starts.append(s[(s >= lo + window - 1) & (s + 1 < hi)])
        if len(starts[-1]) == 0:
            starts[-1] = np.array([lo + window - 1])
    return starts


class FoldSource(NamedTuple):
    """What `fold_data` builds every fold's MarketData from: the bar arrays on the device (shared by every split and
    fold), the raw features and each fold's episode starts (host)."""

    shared: dict  # MarketData fields common to every split and fold (device arrays)
    raw_features: np.ndarray  # [M, T, F] float64, not normalised
    starts: list  # per fold {split: ([M, S] padded episode starts, [M] counts)}, S common to a split's folds
    weights: list  # per fold [M] market weights


def load_data(args: Args, feature_stats: Optional[tuple] = None) -> tuple[dict, dict]:
    """Loads and checks an intraday npz; returns ({'train','val','test'}: MarketData, info) of walk-forward fold 0 (the
    single split by default); info['folds'] holds every fold's bounds, `fold_data` makes the other folds' MarketData.

    Splits are by date or fraction (one time for every market), with `window` bars embargoed after each split end.
    Feature normalisation (mean/std per feature) uses the fold's training split of every market only, or
    `feature_stats` (the training run's, stored in a policy checkpoint) when given.
    """
    path = Path(args.data)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Fix: build one with data_prep.py (see README) or pass --data")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}). Fix: rebuild it with data_prep.py") from None
    meta = json.loads(str(raw.get("meta", "{}")))
    if meta.get("kind") != "intraday":
        raise DataError(f"{path}: kind is '{meta.get('kind')}', ppo_trader needs intraday bars. Fix: use data_prep.py "
                        "intraday (or erl_trader.py for daily data)")
    need = ("timestamps", "open", "high", "low", "close", "atr", "rth", "session_end", "features", "market", "length")
    missing = [k for k in need if k not in raw]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}. Fix: rebuild it with the current data_prep.py")
    W = args.window
    M, T = raw["close"].shape
    bars, hours = np.zeros((M, T), np.int32), np.zeros((M, T), np.float32)
    market_ts = [raw["timestamps"][m][: int(raw["length"][m])] for m in range(M)]
    all_ts = np.unique(np.concatenate(market_ts))
    cut1, cut2 = split_time(args.train_end, all_ts, "--train-end"), split_time(args.val_end, all_ts, "--val-end")
    specs = meta.get("markets", {})
    names = [str(x) for x in raw["market"]]
    for m, ts in enumerate(market_ts):
        n = len(ts)
        spec = specs.get(names[m], {})
        bar_ns = int(spec.get("bar_seconds", np.median(np.diff(ts)) / 1e9)) * 1_000_000_000
        closes = scheduled_closes(ts, raw["rth"][m][:n], spec.get("rth", "none"), meta.get("tz", "America/New_York"),
                                  meta.get("rollover", "17:00"))
        bars[m, :n], hours[m, :n] = calendar_arrays(ts, closes, bar_ns)
        bars[m, n:], hours[m, n:] = T, 24.0
    folds = fold_bounds(all_ts, market_ts, cut1, cut2, W, args.walk_forward, args.walk_forward_train_bars)
    check_fold_lengths(folds, names, W, args.episode_bars, path)
    for n in names:
        sp = specs.get(n)
        if sp is None or not (sp["point_value"] > 0 and sp["tick_size"] > 0 and sp["commission"] >= 0):
            raise DataError(f"{path}: market {n} has no valid spec in meta (point value > 0, tick size > 0, commission >= "
                            "0). Fix: rebuild it with data_prep.py and --point-value/--tick-size/--commission")
    pv = np.array([specs[n]["point_value"] for n in names], np.float32)
    tick = np.array([specs[n]["tick_size"] for n in names], np.float32)
    comm = np.array([args.commission if args.commission is not None else specs[n]["commission"] for n in names], np.float32)
    weights = [market_weights(args, names, bounds, path) for bounds in folds]
    # the bar arrays go to the device once and are shared by the three splits and every fold (which differ in starts,
    # bounds, features and market weights)
    shared = dict(open=jnp.asarray(raw["open"], jnp.float32), high=jnp.asarray(raw["high"], jnp.float32),
                  low=jnp.asarray(raw["low"], jnp.float32),
                  close=jnp.asarray(raw["close"], jnp.float32), atr=jnp.asarray(raw["atr"], jnp.float32),
                  rth=jnp.asarray(raw["rth"]),
                  session_end=jnp.asarray(raw["session_end"]), bars_to_close=jnp.asarray(bars),
                  hours_to_close=jnp.asarray(hours),
                  point_value=jnp.asarray(pv), tick_size=jnp.asarray(tick), commission=jnp.asarray(comm))
    # episode starts padded to one shape per split over the folds: every fold's MarketData fits one compiled program
    starts = [{split: episode_starts(raw["rth"], bounds, split, W) for split in ("train", "val", "test")} for bounds in folds]
    padded = []
    for fold_starts in starts:
        padded.append({})
        for split, split_starts in fold_starts.items():
            S = max(len(s) for other in starts for s in other[split])
            padded[-1][split] = (np.stack([np.pad(s, (0, S - len(s)), mode="edge") for s in split_starts]).astype(np.int32),
                                 np.array([len(s) for s in split_starts], np.int32))
    source = FoldSource(shared, raw["features"].astype(np.float64), padded, weights)
    info = dict(path=str(path), meta=meta, markets=names, folds=folds, feature_names=[str(x) for x in raw["feature_names"]],
                timestamps=raw["timestamps"], source=source)
    return fold_data(info, 0, feature_stats)


def fold_data(info: dict, fold: int, feature_stats: Optional[tuple] = None) -> tuple[dict, dict]:
    """({'train','val','test'}: MarketData, info) of one walk-forward fold: its bounds, episode starts, market weights
    and features normalised by its training split's statistics (or `feature_stats`). Every fold's arrays have the same
    shapes: the programs compiled for fold 0 play every fold."""
    source, bounds = info["source"], info["folds"][fold]
    f = source.raw_features
    if feature_stats is None:
        train_mask = np.zeros(f.shape[:2], bool)
        for m, b in enumerate(bounds):
            train_mask[m, b["train"][0]: b["train"][1]] = True
        mu, sd = f[train_mask].mean(0), f[train_mask].std(0)
    else:
        mu, sd = np.asarray(feature_stats[0]), np.asarray(feature_stats[1])
    if mu.shape != (f.shape[-1],):
        raise DataError(f"{info['path']}: {f.shape[-1]} features, the policy was trained on {mu.shape[0]}. Fix: evaluate on "
                        "data built the same way")
    features = jnp.asarray(((f - mu) / np.where(sd > 1e-12, sd, 1.0)).clip(-10, 10).astype(np.float32))
    out = {}
    for name in ("train", "val", "test"):
        starts, n_starts = source.starts[fold][name]
        out[name] = MarketData(
            **source.shared, features=features, starts=jnp.asarray(starts), n_starts=jnp.asarray(n_starts),
            lo=jnp.asarray([b[name][0] for b in bounds], jnp.int32), hi=jnp.asarray([b[name][1] for b in bounds], jnp.int32),
            market_weights=jnp.asarray(source.weights[fold]),
        )
    return out, dict(info, bounds=bounds, fold=fold, feature_mean=mu.tolist(), feature_std=sd.tolist())


# ---- ENV ----
HOLD, BUY, SELL = 0, 1, 2
MOVE_SL_TO_BE, ENABLE_TRAIL, DISABLE_TRAIL = 3, 4, 5  # phase 2
NUM_ACTIONS = 3  # phase 1
NUM_POSITION_FEATURES = 7  # phase 1; phase 2 appends the break-even and trailing flags
PHASE_ACTIONS = {1: 3, 2: 6}
PHASE_POSITION_FEATURES = {1: 7, 2: 9}


def obs_size(window: int, num_features: int, phase: int) -> int:
    """Length of an observation: window x market features + position features of the phase."""
    return window * num_features + PHASE_POSITION_FEATURES[phase]


@struct.dataclass
class EnvParams:
    """Static env rules (see Args for each field's meaning)."""

    window: int = struct.field(pytree_node=False, default=16)
    episode_bars: int = struct.field(pytree_node=False, default=256)
    no_entry_bars: int = struct.field(pytree_node=False, default=2)
    flatten_at_close: bool = struct.field(pytree_node=False, default=True)
    phase: int = struct.field(pytree_node=False, default=1)
    action_space: str = struct.field(pytree_node=False, default="discrete")
    max_contracts: int = struct.field(pytree_node=False, default=1)
    contracts: float = 1.0
    sl_atr_mult: float = 1.5
    tp_atr_mult: float = 3.0
    slippage_ticks: float = 1.0
    initial_balance: float = 50_000.0
    dd_limit: float = 2_000.0
    dd_lock_offset: float = 0.0
    breach_penalty: float = 0.0
    trail_atr_mult: float = 1.0


@struct.dataclass
class EnvState:
    """One account on one market. Money is kept relative to the initial balance (float32 precision)."""

    market: jax.Array  # int32
    t: jax.Array  # decision bar, int32
    steps: jax.Array  # steps in this episode, int32
    dir: jax.Array  # -1 short, 0 flat, +1 long (int32)
    entry: jax.Array  # entry price (0 flat)
    sl: jax.Array
    tp: jax.Array
    bars_in_pos: jax.Array  # int32
    size: jax.Array  # continuous action space: contracts held (0 flat), int32
    trail: jax.Array  # phase 2: trailing stop on (bool)
    best: jax.Array  # phase 2: best price since entry (highest high long, lowest low short; 0 flat)
    pnl: jax.Array  # realised P&L incl. commissions (balance - initial_balance)
    peak: jax.Array  # peak equity - initial_balance
    equity: jax.Array  # equity marked at close[t] - initial_balance
    episode_return: jax.Array  # sum of rewards so far (for logging)


def env_params_from_args(args: Args) -> EnvParams:
    """EnvParams from the CLI flags."""
    return EnvParams(window=args.window, episode_bars=args.episode_bars, no_entry_bars=args.no_entry_bars,
                     flatten_at_close=args.flatten_at_close,
                     contracts=float(args.contracts), sl_atr_mult=args.sl_atr_mult, tp_atr_mult=args.tp_atr_mult,
                     slippage_ticks=args.slippage_ticks,
                     initial_balance=args.initial_balance, dd_limit=args.dd_limit, dd_lock_offset=args.dd_lock_offset,
                     breach_penalty=args.breach_penalty,
                     phase=args.phase, trail_atr_mult=args.trail_atr_mult, action_space=args.action_space,
                     max_contracts=args.max_contracts)


def dd_threshold(peak: jax.Array, params: EnvParams) -> jax.Array:
    """Trailing threshold (relative to the initial balance): peak - dd_limit, locked at + dd_lock_offset."""
    return jnp.minimum(peak - params.dd_limit, params.dd_lock_offset)


def reset_at(market: jax.Array, start: jax.Array) -> EnvState:
    """A flat account at decision bar `start` of `market`."""
    z, zi = jnp.float32(0.0), jnp.int32(0)
    return EnvState(market=jnp.int32(market), t=jnp.int32(start), steps=zi, dir=zi, entry=z, sl=z, tp=z, bars_in_pos=zi,
                    size=zi, trail=jnp.bool_(False), best=z,
                    pnl=z, peak=z, equity=z, episode_return=z)


def reset(key: jax.Array, params: EnvParams, data: MarketData) -> tuple[jax.Array, EnvState]:
    """Draws a market (by `market_weights`) and a start bar (any RTH bar inside the split); returns (obs, state)."""
    # both draws from one pair of uniforms (one threefry block): step calls reset for every env at every step,
    # and random.split + choice + randint cost ~6 blocks, more than the env rules themselves
    u = jax.random.uniform(key, (2,))
    cum = jnp.cumsum(data.market_weights)
    m = jnp.minimum(jnp.sum(cum <= u[0] * cum[-1]), data.market_weights.shape[0] - 1)  # zero-weight markets are never drawn
    i = jnp.minimum((u[1] * data.n_starts[m]).astype(jnp.int32), data.n_starts[m] - 1)
    state = reset_at(m, data.starts[m, i])
    return get_obs(state, params, data), state


def can_add(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """New exposure is allowed: inside RTH and more than no_entry_bars before the session end."""
    m, t = state.market, state.t
    return data.rth[m, t] & (data.bars_to_close[m, t] > params.no_entry_bars)


def legal_mask(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """[3] bool: HOLD always; BUY/SELL when flat, inside RTH and more than no_entry_bars before the close.
    Phase 2, [6]: MOVE_SL_TO_BE in a position with open profit at the close and the stop still short of
    the entry; ENABLE_TRAIL in a position with trailing off; DISABLE_TRAIL with trailing on."""
    m, t = state.market, state.t
    entry_ok = (state.dir == 0) & can_add(state, params, data)
    if params.phase == 1:
        return jnp.array([True, entry_ok, entry_ok])
    d = state.dir.astype(jnp.float32)
    in_pos = state.dir != 0
    be_ok = in_pos & ((data.close[m, t] - state.entry) * d > 0) & ((state.entry - state.sl) * d > 0)
    return jnp.array([True, entry_ok, entry_ok, be_ok, in_pos & ~state.trail, in_pos & state.trail])


def get_obs(state: EnvState, params: EnvParams, data: MarketData) -> jax.Array:
    """Window of normalised features (bars t-W+1..t, oldest first) + 7 position features
    (phase 2: + break-even flag, the stop at or beyond the entry, and trailing flag)."""
    m, t, W = state.market, state.t, params.window
    # one slice of the [M, T, F] array (features[m] first would gather a whole market per env under vmap)
    window = jax.lax.dynamic_slice(data.features, (m, t - W + 1, 0), (1, W, data.features.shape[-1])).reshape(-1)
    close, atr = data.close[m, t], data.atr[m, t]
    d = state.dir.astype(jnp.float32)
    in_pos = state.dir != 0
    # continuous action space: the signed position as a fraction of max_contracts
    held = d * state.size / params.max_contracts if params.action_space == "continuous" else d
    pos = jnp.stack([
        held,
        jnp.where(in_pos, (close - state.entry) * d / atr, 0.0),
        jnp.where(in_pos, (close - state.sl) * d / atr, 0.0),
        jnp.where(in_pos, (state.tp - close) * d / atr, 0.0),
        state.bars_in_pos / params.episode_bars,
        (state.equity - dd_threshold(state.peak, params)) / params.dd_limit,
        data.hours_to_close[m, t] / 24.0,
    ])
    if params.phase == 2:
        pos = jnp.concatenate([pos, jnp.stack([in_pos & ((state.sl - state.entry) * d >= 0),
                                               in_pos & state.trail]).astype(jnp.float32)])
    return jnp.concatenate([window, pos.astype(jnp.float32)])


class BarCosts(NamedTuple):
    """Per-contract money of market `m`: point value, slippage in price units, commission per side, the tick."""

    point_value: jax.Array
    slip: jax.Array
    commission: jax.Array
    tick: jax.Array


def bar_costs(market: jax.Array, params: EnvParams, data: MarketData) -> BarCosts:
    return BarCosts(data.point_value[market], params.slippage_ticks * data.tick_size[market], data.commission[market],
                    data.tick_size[market])


def round_to_tick(price: jax.Array, tick: jax.Array) -> jax.Array:
    return jnp.round(price / tick) * tick


class Position(NamedTuple):
    """An open position (or none: direction 0) while bar u plays out; `lots` contracts, `entry` their average price."""

    direction: jax.Array  # int32: -1, 0, +1
    lots: jax.Array  # float32 contracts held (0 flat)
    entry: jax.Array
    sl: jax.Array
    tp: jax.Array
    bars_in_pos: jax.Array
    pnl: jax.Array  # realised P&L (balance - initial balance), commissions included


class Closed(NamedTuple):
    """Contracts closed in one step: price (NaN if none), their average entry, direction and lots, the P&L
    booked at the exit (exit commission included) and the round trip's P&L (both commissions)."""

    price: jax.Array
    entry: jax.Array
    direction: jax.Array
    lots: jax.Array
    booked: jax.Array
    round_trip: jax.Array


def close_lots(pos: Position, lots: jax.Array, price: jax.Array, when: jax.Array, costs: BarCosts) -> Closed:
    """Closing `lots` of `pos` at `price` where `when` (nothing elsewhere)."""
    lots = jnp.where(when, lots, 0.0)
    booked = ((price - pos.entry) * pos.direction * costs.point_value - costs.commission) * lots
    return Closed(price=jnp.where(when, price, jnp.nan), entry=jnp.where(when, pos.entry, jnp.nan),
                  direction=jnp.where(when, pos.direction, 0),
                  lots=lots, booked=booked, round_trip=booked - costs.commission * lots)


def play_bar(state: EnvState, pos: Position, params: EnvParams, data: MarketData):
    """The rules both action spaces share, once the orders of bar u = t + 1's open are filled: a stop or target
    inside bar u (a gap through a level fills at the open; both inside the bar: the stop first), the flatten at
    the session end's close, the mark to market at u's close, the trailing drawdown (a breach liquidates at the
    close and terminates) and the reward (change in equity / dd_limit, minus the breach penalty).

    Returns (position after bar u, Closed inside bar u, equity, peak, reward, terminated)."""
    m, u = state.market, state.t + 1
    o, h, l, c = data.open[m, u], data.high[m, u], data.low[m, u], data.close[m, u]
    costs = bar_costs(m, params, data)
    d = pos.direction.astype(jnp.float32)
    long, short = pos.direction == 1, pos.direction == -1
    stop_gap = (long & (o <= pos.sl)) | (short & (o >= pos.sl))
    tp_gap = (long & (o >= pos.tp)) | (short & (o <= pos.tp))
    stop_hit = (long & (l <= pos.sl)) | (short & (h >= pos.sl))
    tp_hit = (long & (h >= pos.tp)) | (short & (l <= pos.tp))
    level_px = jnp.select([stop_gap, tp_gap, stop_hit, tp_hit], [o - d * costs.slip, o, pos.sl - d * costs.slip, pos.tp],
                          c - d * costs.slip)
    at_level = stop_gap | tp_gap | stop_hit | tp_hit
    flatten = (pos.direction != 0) & ~at_level & params.flatten_at_close & data.session_end[m, u]
    exited = close_lots(pos, pos.lots, level_px, at_level | flatten, costs)
    still_open = (pos.direction != 0) & ~(at_level | flatten)

    # MARK TO MARKET at u's close, trailing drawdown and breach
    pnl = pos.pnl + exited.booked
    equity = pnl + jnp.where(still_open, (c - pos.entry) * d * costs.point_value * pos.lots, 0.0)
    peak = jnp.maximum(state.peak, equity)
    terminated = equity <= dd_threshold(peak, params)
    liquidated = close_lots(pos, pos.lots, c - d * costs.slip, terminated & still_open, costs)
    pnl = pnl + liquidated.booked
    equity = jnp.where(terminated, pnl, equity)
    reward = (equity - state.equity) / params.dd_limit - jnp.where(terminated, params.breach_penalty, 0.0)
    closed = jax.tree.map(lambda a, b: jnp.where(liquidated.lots > 0, b, a), exited, liquidated)  # one of them at most
    open_after = still_open & ~terminated
    after = Position(direction=jnp.where(open_after, pos.direction, 0), lots=jnp.where(open_after, pos.lots, 0.0),
                     entry=jnp.where(open_after, pos.entry, 0.0), sl=jnp.where(open_after, pos.sl, 0.0),
                     tp=jnp.where(open_after, pos.tp, 0.0),
                     bars_in_pos=jnp.where(open_after, pos.bars_in_pos + 1, 0), pnl=pnl)
    return after, closed, equity, peak, reward, terminated


def no_close(pos: Position) -> Closed:
    """Nothing closed (the discrete action space never closes at the open)."""
    nan, zero = jnp.full_like(pos.pnl, jnp.nan), jnp.zeros_like(pos.pnl)
    return Closed(price=nan, entry=nan, direction=jnp.zeros_like(pos.direction), lots=zero, booked=zero, round_trip=zero)


def step_core(state: EnvState, action: jax.Array, params: EnvParams, data: MarketData):
    """The rules of DESIGN 2a for one decision: orders at t+1's open, then `play_bar` (stops/targets, flatten, drawdown).

    Returns (state at t+1, reward, terminated, info) without any reset. info: the mask and the action taken,
    `entry_price` (a fill that opened or added contracts, NaN when none), `exit_price` (the step's last exit, NaN
    when none) and `closed`: a `Closed` with a leading axis of 2, the contracts closed at u's open by the action
    (continuous actions only) and those closed inside bar u.
    """
    if params.action_space == "continuous":
        pos, at_open, entry_px, action_taken = change_position(state, action, params, data)
    else:
        pos, entry_px, action_taken, trail = enter_or_manage(state, action, params, data)
        at_open = no_close(pos)
    after, in_bar, equity, peak, reward, terminated = play_bar(state, pos, params, data)
    m, u = state.market, state.t + 1
    if params.action_space == "continuous" or params.phase == 1:
        best, trail = jnp.float32(0.0), jnp.bool_(False)
    else:  # phase 2: the best price since entry, the entry bar included, for the trailing stop
        best = jnp.where(state.dir == 0, data.open[m, u], state.best)
        best = jnp.where(after.direction == 1, jnp.maximum(best, data.high[m, u]),
                         jnp.where(after.direction == -1, jnp.minimum(best, data.low[m, u]), 0.0))
        trail = trail & (after.direction != 0)
    size = after.lots.astype(jnp.int32) if params.action_space == "continuous" else state.size
    new_state = EnvState(market=m, t=u, steps=state.steps + 1, dir=after.direction, entry=after.entry, sl=after.sl,
                         tp=after.tp,
                         bars_in_pos=after.bars_in_pos, size=size, trail=trail, best=best, pnl=after.pnl, peak=peak,
                         equity=equity,
                         episode_return=state.episode_return + reward)
    closed = jax.tree.map(lambda a, b: jnp.stack([a, b]), at_open, in_bar)
    info = dict(mask=legal_mask(state, params, data), action=action_taken, entry_price=entry_px,
                exit_price=jnp.where(jnp.isnan(in_bar.price), at_open.price, in_bar.price), closed=closed)
    return new_state, reward, terminated, info


def enter_or_manage(state: EnvState, action: jax.Array, params: EnvParams, data: MarketData):
    """Discrete actions at u's open: an illegal action is HOLD; phase 2 manages the open position (break-even,
    trailing on/off, then the trailing stop ratchets to the best price since entry -/+ trail_atr_mult x ATR of the
    decision bar, never loosening); BUY/SELL open `contracts` at the open with slippage against the trader, the stop
    and target from the decision bar's ATR. Returns (Position, entry fill price or NaN, action taken, trailing flag)."""
    m, t = state.market, state.t
    costs = bar_costs(m, params, data)
    atr, o = data.atr[m, t], data.open[m, t + 1]
    a = jnp.where(legal_mask(state, params, data)[action], action, HOLD)
    sl, trail = state.sl, state.trail
    if params.phase == 2:
        held = state.dir.astype(jnp.float32)
        sl = jnp.where(a == MOVE_SL_TO_BE, state.entry, sl)
        trail = jnp.where(a == ENABLE_TRAIL, True, jnp.where(a == DISABLE_TRAIL, False, trail))
        level = round_to_tick(state.best - held * params.trail_atr_mult * atr, costs.tick)
        sl = jnp.where(trail, jnp.where(state.dir == 1, jnp.maximum(sl, level), jnp.minimum(sl, level)), sl)
    enter = (state.dir == 0) & ((a == BUY) | (a == SELL))
    d = jnp.where(enter, jnp.where(a == BUY, 1, -1), state.dir)
    entry_px = o + d.astype(jnp.float32) * costs.slip
    pos = Position(
        direction=d, lots=jnp.where(d != 0, jnp.asarray(params.contracts, jnp.float32), 0.0),
        entry=jnp.where(enter, entry_px, state.entry),
        sl=jnp.where(enter, round_to_tick(entry_px - d * params.sl_atr_mult * atr, costs.tick), sl),
        tp=jnp.where(enter, round_to_tick(entry_px + d * params.tp_atr_mult * atr, costs.tick), state.tp),
        bars_in_pos=jnp.where(enter, 0, state.bars_in_pos), pnl=state.pnl - jnp.where(enter,
                                                                                      costs.commission * params.contracts,
                                                                                      0.0))
    return pos, jnp.where(enter, entry_px, jnp.nan), a, trail


def target_contracts(state: EnvState, action: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """Continuous action space: the signed whole-contract target round(clip(action, -1, 1) x max_contracts).
    Where discrete entries are masked (outside RTH, no_entry_bars or fewer before the session end) the target
    is clamped between 0 and the current position: it may reduce or close, never add or reverse."""
    held = state.dir * state.size
    target = jnp.round(jnp.clip(action, -1.0, 1.0) * params.max_contracts).astype(jnp.int32)
    return jnp.where(can_add(state, params, data), target, jnp.clip(target, jnp.minimum(held, 0), jnp.maximum(held, 0)))


def change_position(state: EnvState, action: jax.Array, params: EnvParams, data: MarketData):
    """Continuous actions (`action` in [-1, 1], see `target_contracts`) at u's open. A smaller target on the same
    side closes the difference (the entry and levels stay); a larger one adds contracts (the entry becomes the
    average entry price and the stop and target are set again around it with the decision bar's ATR); a target
    of 0 or on the other side closes everything first, then opens the new side. Fills at the open with slippage
    against the trader, commission per contract per side. Returns (Position, Closed at the open, entry fill price
    or NaN, target)."""
    m, t = state.market, state.t
    costs = bar_costs(m, params, data)
    atr, o = data.atr[m, t], data.open[m, t + 1]
    target = target_contracts(state, action, params, data)
    held = Position(direction=state.dir, lots=state.size.astype(jnp.float32), entry=state.entry, sl=state.sl, tp=state.tp,
                    bars_in_pos=state.bars_in_pos, pnl=state.pnl)
    same_side = target * state.dir > 0
    n_close = jnp.where(same_side, jnp.maximum(state.size - jnp.abs(target), 0), state.size)
    at_open = close_lots(held, n_close.astype(jnp.float32), o - state.dir * costs.slip, n_close > 0, costs)
    kept = state.size - n_close
    n_add = jnp.maximum(jnp.abs(target) - kept, 0)
    d = jnp.where(kept > 0, state.dir, jnp.sign(target)).astype(jnp.int32)
    add = n_add > 0
    entry_px = o + d * costs.slip
    entry = jnp.where(add, (kept * state.entry + n_add * entry_px) / jnp.maximum(kept + n_add, 1),
                      jnp.where(kept > 0, state.entry, 0.0))
    lots = kept + n_add
    pos = Position(direction=jnp.where(lots > 0, d, 0), lots=lots.astype(jnp.float32), entry=entry,
                   sl=jnp.where(add, round_to_tick(entry - d * params.sl_atr_mult * atr, costs.tick), state.sl),
                   tp=jnp.where(add, round_to_tick(entry + d * params.tp_atr_mult * atr, costs.tick), state.tp),
                   bars_in_pos=jnp.where(kept > 0, state.bars_in_pos, 0),
                   pnl=state.pnl + at_open.booked - costs.commission * n_add)
    return pos, at_open, jnp.where(add, entry_px, jnp.nan), target


def step(key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams, data: MarketData):
    """gymnax-style step with auto-reset: (obs, state, reward, terminated, truncated, info).

    When the episode ends the returned obs/state are the next episode's; the old episode's last
    observation is `info["final_obs"]` (for bootstrapping at truncation).
    """
    next_state, reward, terminated, info = step_core(state, action, params, data)
    m = state.market
    truncated = ~terminated & ((next_state.steps >= params.episode_bars) | (next_state.t + 1 >= data.hi[m]))
    final_obs = get_obs(next_state, params, data)
    _, reset_state = reset(key, params, data)
    done = terminated | truncated
    state_out = jax.tree.map(lambda a, b: jnp.where(done, a, b), reset_state, next_state)
    # the obs of the state we return (not a select between two windows): when a caller ignores info["final_obs"],
    # XLA drops that window and one observation is built per step instead of two
    obs = get_obs(state_out, params, data)
    info = dict(info, final_obs=final_obs, episode_return=next_state.episode_return, episode_length=next_state.steps, market=m)
    return obs, state_out, reward, terminated, truncated, info


# ---- NETWORKS ----
class ActorCritic(nn.Module):
    """Separate tanh MLPs for the policy logits and the value (PureJaxRL / CleanRL PPO).

    `continuous`: the policy head is [mean, log std] of the pre-tanh Gaussian (the log std a free parameter,
    as in CleanRL's continuous PPO) instead of `num_actions` logits."""

    num_actions: int
    hidden: int = 128
    continuous: bool = False

    @nn.compact
    def __call__(self, x):
        ortho = nn.initializers.orthogonal
        a = x
        for i in range(2):
            a = nn.tanh(nn.Dense(self.hidden, kernel_init=ortho(np.sqrt(2)), bias_init=nn.initializers.zeros,
                                 name=f"actor_hidden_{i}")(a))
        logits = nn.Dense(self.num_actions, kernel_init=ortho(0.01), bias_init=nn.initializers.zeros, name="policy_head")(a)
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.zeros, (1,))
            logits = jnp.concatenate([logits, jnp.broadcast_to(log_std, logits.shape)], axis=-1)
        v = x
        for i in range(2):
            v = nn.tanh(nn.Dense(self.hidden, kernel_init=ortho(np.sqrt(2)), bias_init=nn.initializers.zeros,
                                 name=f"critic_hidden_{i}")(v))
        value = nn.Dense(1, kernel_init=ortho(1.0), bias_init=nn.initializers.zeros, name="value_head")(v)
        return logits, jnp.squeeze(value, -1)


def masked_policy(logits: jax.Array, mask: jax.Array) -> distrax.Categorical:
    """Illegal actions get the dtype's lowest finite logit (never -inf, so log-probs and entropy stay finite)."""
    return distrax.Categorical(logits=jnp.where(mask, logits, jnp.finfo(logits.dtype).min))


def squashed_gaussian(out: jax.Array) -> distrax.Transformed:
    """Continuous actions: tanh of a Gaussian with (mean, log std) = out[..., 0], out[..., 1]; actions in (-1, 1)."""
    return distrax.Transformed(distrax.Normal(out[..., 0], jnp.exp(out[..., 1])), distrax.Tanh())


def squashed_log_prob(pi: distrax.Transformed, x: jax.Array) -> jax.Array:
    """Log density of the action tanh(x) from the pre-squash sample x: the Gaussian's log density minus
    distrax's log |d tanh(x)/dx| (the same value as pi.log_prob(tanh(x)), without atanh of actions near +-1)."""
    return pi.distribution.log_prob(x) - pi.bijector.forward_log_det_jacobian(x)


def make_network(args: Args) -> ActorCritic:
    """The actor-critic of this configuration: the phase's logits, or (mean, log std) for continuous actions."""
    if args.action_space == "continuous":
        return ActorCritic(1, args.hidden, continuous=True)
    return ActorCritic(PHASE_ACTIONS[args.phase], args.hidden)


# ---- PPO ----
class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array  # continuous: the pre-squash Gaussian sample (the env got tanh of it)
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_value: jax.Array  # V(final obs), used only where truncated
    mask: jax.Array
    choice: jax.Array  # the action could change anything (discrete: more than one legal action; continuous: see `has_choice`)


@struct.dataclass
class ObsNorm:
    """Running mean/variance of observations (Welford/Chan), kept in the train state and checkpointed."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, dim: int) -> "ObsNorm":
        return cls(mean=jnp.zeros(dim), var=jnp.ones(dim), count=jnp.float32(1e-4))

    def update(self, x: jax.Array) -> "ObsNorm":
        """Merges a batch [n, dim] into the running statistics."""
        b_mean, b_var, n = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        tot = self.count + n
        mean = self.mean + delta * n / tot
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / tot
        return ObsNorm(mean=mean, var=m2 / tot, count=tot)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + 1e-8), -10.0, 10.0)


class RunnerState(NamedTuple):
    train_state: TrainState
    env_state: EnvState
    last_obs: jax.Array  # raw (unnormalised) observations
    obs_norm: ObsNorm
    rng: jax.Array
    update: jax.Array


def compute_gae(traj: Transition, last_value: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """GAE over a [T, N] rollout, bootstrapping through truncation (with V(final obs)) but not termination."""

    def _gae_step(carry, tr):
        gae, next_value = carry
        done = tr.terminated | tr.truncated
        boot = jnp.where(done, jnp.where(tr.truncated, tr.final_value, 0.0), next_value)
        delta = tr.reward + gamma * boot - tr.value
        gae = delta + gamma * lam * (1.0 - done) * gae
        return (gae, tr.value), gae

    _, adv = jax.lax.scan(_gae_step, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
    return adv, adv + traj.value


def grow_params(fresh, phase1, new_action_mass: float):
    """Phase 2 network params from a phase 1 network's (`fresh`: a phase 2 init, same hidden size).

    Layers are found by name. Every phase 1 weight is copied. The first layers of actor and critic get zero weights for the new
    observation entries (the break-even and trailing flags), so the phase 1 features drive the network
    exactly as before. The policy head grows from 3 to 6 logits: the first 3 copied; each new one is
    HOLD's logit + log(new_action_mass) + the fresh init's small (orthogonal, scale 0.01) logit, so a new
    action starts with about `new_action_mass` times HOLD's probability in every state.
    """

    old, new = phase1["params"], fresh["params"]
    grown = dict(old)
    for layer in ("actor_hidden_0", "critic_hidden_0"):  # rows for the new observation entries
        rows = old[layer]["kernel"].shape[0]
        grown[layer] = dict(old[layer], kernel=new[layer]["kernel"].at[:rows].set(old[layer]["kernel"]).at[rows:].set(0.0))
    kernel, bias = old["policy_head"]["kernel"], old["policy_head"]["bias"]
    n_old, n_new = kernel.shape[1], new["policy_head"]["kernel"].shape[1]
    grown["policy_head"] = dict(
        kernel=jnp.concatenate([kernel, kernel[:, HOLD:HOLD + 1] + new["policy_head"]["kernel"][:, n_old:]], axis=1),
        bias=jnp.concatenate([bias, jnp.full(n_new - n_old, bias[HOLD] + math.log(new_action_mass))]))
    return {"params": grown}


def grow_norm(norm: ObsNorm, obs_dim: int) -> ObsNorm:
    """The phase 1 observation normaliser for the longer phase 2 observation: the phase 1 entries keep their
    statistics; the new flags start at mean 0, variance 1 (they enter the network as 0/1) and share the count."""
    k = obs_dim - norm.mean.shape[0]
    return ObsNorm(mean=jnp.concatenate([norm.mean, jnp.zeros(k)]), var=jnp.concatenate([norm.var, jnp.ones(k)]),
                   count=norm.count)


def curriculum_in_force(args: Args, env_params: EnvParams, data: MarketData, progress: jax.Array):
    """The env rules in force at training `progress` (update / num_updates, in [0, 1]) under --curriculum.

    dd_limit moves linearly from --curriculum-dd-start (default 2 x --dd-limit) to --dd-limit and the
    commission from --curriculum-commission-start x the real one to the real one; both reach the real
    values at progress --curriculum-end and keep them. Works on traced values inside the jitted loop.
    Returns (env_params, data, {"dd_limit", "commission_scale"}) in force.
    """
    frac = jnp.clip(progress / args.curriculum_end, 0.0, 1.0)
    dd_start = 2.0 * args.dd_limit if args.curriculum_dd_start is None else args.curriculum_dd_start
    dd_limit = dd_start + (env_params.dd_limit - dd_start) * frac
    commission_scale = args.curriculum_commission_start + (1.0 - args.curriculum_commission_start) * frac
    return (env_params.replace(dd_limit=dd_limit), data.replace(commission=data.commission * commission_scale),
            dict(dd_limit=dd_limit, commission_scale=commission_scale))


def has_choice(state: EnvState, mask: jax.Array, params: EnvParams, data: MarketData) -> jax.Array:
    """The action could change anything: discrete, more than one legal action; continuous, a position is open or
    new exposure is allowed (flat outside RTH the target is clamped to 0 whatever the policy draws)."""
    if params.action_space == "continuous":
        return (state.dir != 0) | can_add(state, params, data)
    return mask.sum() > 1


def policy_action(network: ActorCritic, params, obs: jax.Array, mask: jax.Array, key: jax.Array):
    """A sampled action of the policy: (action stored for the loss, its log-prob, the env's action, V(obs)).
    Continuous: the stored action is the pre-squash Gaussian sample, the env gets its tanh."""
    logits, value = network.apply(params, obs)
    if network.continuous:
        pi = squashed_gaussian(logits)
        action = pi.distribution.sample(seed=key)
        return action, squashed_log_prob(pi, action), jnp.tanh(action), value
    pi = masked_policy(logits, mask)
    action = pi.sample(seed=key)
    return action, pi.log_prob(action), action, value


def evaluate_actions(network: ActorCritic, params, obs: jax.Array, action: jax.Array, mask: jax.Array):
    """(log-prob of stored actions, entropy, value) under `params`; continuous: the pre-squash Gaussian's entropy
    (the squashed one has no closed form)."""
    logits, value = network.apply(params, obs)
    if network.continuous:
        pi = squashed_gaussian(logits)
        return squashed_log_prob(pi, action), pi.distribution.entropy(), value
    pi = masked_policy(logits, mask)
    return pi.log_prob(action), pi.entropy(), value


class EpisodeStats(NamedTuple):
    """Sums over the episodes that ended in one env step (all envs); the market_ fields are [M] arrays."""

    returns: jax.Array
    lengths: jax.Array
    episodes: jax.Array
    breaches: jax.Array
    market_episodes: jax.Array
    market_returns: jax.Array
    market_lengths: jax.Array
    market_breaches: jax.Array


def episode_stats(done, terminated, info: dict, num_markets: int) -> EpisodeStats:
    ended = jax.nn.one_hot(info["market"], num_markets) * done[:, None]  # [N, M]: the market of each episode that ended
    return EpisodeStats(returns=jnp.sum(done * info["episode_return"]), lengths=jnp.sum(done * info["episode_length"]),
                        episodes=jnp.sum(done),
                        breaches=jnp.sum(terminated), market_episodes=ended.sum(0),
                        market_returns=(ended * info["episode_return"][:, None]).sum(0),
                        market_lengths=(ended * info["episode_length"][:, None]).sum(0),
                        market_breaches=(ended * terminated[:, None]).sum(0))


def rollout_step(network: ActorCritic, env_params: EnvParams, data: MarketData, runner, _):
    """One vmapped env step of every env with the policy sampling; returns (runner, (Transition, EpisodeStats, raw obs))."""
    train_state, env_state, last_obs, norm, rng, update = runner
    num_envs = last_obs.shape[0]
    rng, k_act, k_env = jax.random.split(rng, 3)
    mask = jax.vmap(legal_mask, in_axes=(0, None, None))(env_state, env_params, data)
    choice = jax.vmap(has_choice, in_axes=(0, 0, None, None))(env_state, mask, env_params, data)
    obs_n = norm(last_obs)
    action, log_prob, env_action, value = policy_action(network, train_state.params, obs_n, mask, k_act)
    obs, env_state, reward, term, trunc, info = jax.vmap(step, in_axes=(0, 0, 0, None, None))(
        jax.random.split(k_env, num_envs), env_state, env_action, env_params, data)
    _, final_value = network.apply(train_state.params, norm(info["final_obs"]))
    transition = Transition(obs_n, action, log_prob, value, reward, term, trunc, final_value, mask, choice)
    stats = episode_stats(term | trunc, term, info, data.market_weights.shape[0])
    return RunnerState(train_state, env_state, obs, norm, rng, update), (transition, stats, obs)


def masked_mean(x: jax.Array, where: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(jnp.sum(where), 1)


def ppo_loss(params, network: ActorCritic, args: Args, tr: Transition, advantages: jax.Array, targets: jax.Array):
    """Clipped PPO loss of a minibatch; returns (loss, (policy loss, value loss, entropy, approx_kl, clipfrac)).

    The policy loss is the mean over all samples of the clipped surrogate where the action could change anything
    (`Transition.choice`), 0 elsewhere: a forced HOLD contributes no gradient anyway, and a continuous target clamped
    to 0 outside RTH would otherwise add the noise of an action without effect. The logged entropy, approx_kl and
    clipfrac are means over the samples with a choice."""
    log_prob, entropy, value = evaluate_actions(network, params, tr.obs, tr.action, tr.mask)
    logratio = log_prob - tr.log_prob
    ratio = jnp.exp(logratio)
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    surrogate = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
    pg_loss = jnp.where(tr.choice, surrogate, 0.0).mean()
    v_loss_unclipped = (value - targets) ** 2
    v_clipped = tr.value + jnp.clip(value - tr.value, -args.clip_coef, args.clip_coef)
    v_loss = 0.5 * (jnp.maximum(v_loss_unclipped, (v_clipped - targets) ** 2) if args.clip_vloss else v_loss_unclipped).mean()
    loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
    approx_kl = masked_mean((ratio - 1) - logratio, tr.choice)
    clipfrac = masked_mean((jnp.abs(ratio - 1) > args.clip_coef).astype(jnp.float32), tr.choice)
    return loss, (pg_loss, v_loss, masked_mean(entropy, tr.choice), approx_kl, clipfrac)


def make_train(args: Args, env_params: EnvParams, data: MarketData, mesh: Optional[Mesh] = None,
               transfer: Optional[tuple] = None):
    """PureJaxRL shape: returns (init(rng, transfer, data) -> RunnerState, train_chunk(RunnerState, data) ->
    (RunnerState, metrics), number of updates, network). `data` (the training split) is an argument of both, `data`
    here their default: every walk-forward fold's split (same shapes, other values) plays one compiled program.

    With a `mesh` (axes "seed", "env"), every minibatch is split over the "env" devices: each computes the
    loss on its share and XLA sums the gradients across them (the same gradient as on one device).
    `transfer` = (params, obs normaliser) of a phase 1 policy: phase 2 starts from them (`grow_params`); `init` takes
    another one per seed as its second argument."""
    num_updates = math.ceil(args.total_timesteps / (args.num_envs * args.num_steps) / args.chunk_updates) * args.chunk_updates
    minibatch = args.num_envs * args.num_steps // args.num_minibatches
    network = make_network(args)
    obs_dim = obs_size(args.window, data.features.shape[-1], args.phase)

    def in_force(update, split: MarketData):
        """(env_params, data, curriculum values) for this update: the real ones unless --curriculum (then traced)."""
        if not args.curriculum:
            return env_params, split, {}
        return curriculum_in_force(args, env_params, split, update / num_updates)

    def lr_schedule(count):
        frac = 1.0 - (count // (args.num_minibatches * args.update_epochs)) / num_updates
        return args.learning_rate * frac if args.anneal_lr else args.learning_rate

    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(learning_rate=lr_schedule, eps=1e-5))

    def init(rng, seed_transfer: Optional[tuple] = transfer, split: MarketData = data) -> RunnerState:
        rng, k_net, k_env = jax.random.split(rng, 3)
        params = network.init(k_net, jnp.zeros(obs_dim))
        if seed_transfer is not None:
            params = grow_params(params, seed_transfer[0], args.new_action_mass)
        train_state = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
        params0, data0, _ = in_force(jnp.int32(0), split)
        obs, env_state = jax.vmap(reset, in_axes=(0, None, None))(jax.random.split(k_env, args.num_envs), params0, data0)
        # statistics of a random-policy rollout, positions included: reset observations alone (flat accounts) would give
        # the position features a variance near 0 and blow any open position up to the clip in the first rollout
        if seed_transfer is None:
            norm = warm_up_norm(obs, env_state, params0, data0, jax.random.fold_in(k_env, 1))
        else:
            norm = grow_norm(seed_transfer[1], obs_dim)
        return RunnerState(train_state, env_state, obs, norm, rng, jnp.int32(0))

    def warm_up_norm(obs, env_state, params0: EnvParams, data0: MarketData, key) -> ObsNorm:
        """An observation normaliser fitted on `num_steps` steps of uniformly random legal actions from the reset states."""
        random_action = random_target_policy if args.action_space == "continuous" else random_policy

        def play(carry, k):
            obs, states = carry
            k_act, k_env = jax.random.split(k)
            mask = jax.vmap(legal_mask, in_axes=(0, None, None))(states, params0, data0)
            action = jax.vmap(random_action, in_axes=(None, 0, 0, 0))(None, jax.random.split(k_act, args.num_envs), obs, mask)
            obs, states, *_ = jax.vmap(step, in_axes=(0, 0, 0, None,
                                                      None))(jax.random.split(k_env, args.num_envs), states, action, params0,
                                                             data0)
            return (obs, states), obs

        _, played = jax.lax.scan(play, (obs, env_state), jax.random.split(key, args.num_steps))
        return ObsNorm.create(obs_dim).update(jnp.concatenate([obs, played.reshape(-1, obs_dim)]))

    def _update_step(split: MarketData, runner: RunnerState, _):
        # CURRICULUM: the env rules in force are computed from the update counter (no recompilation)
        env_params_t, data_t, curriculum = in_force(runner.update, split)

        # COLLECT TRAJECTORIES
        collect = functools.partial(rollout_step, network, env_params_t, data_t)
        runner, (traj, stats, raw_obs) = jax.lax.scan(collect, runner, None, args.num_steps)
        train_state, env_state, last_obs, norm, rng, update = runner

        # CALCULATE ADVANTAGE
        _, last_value = network.apply(train_state.params, norm(last_obs))
        advantages, targets = compute_gae(traj, last_value, args.gamma, args.gae_lambda)

        # UPDATE NETWORK
        def _update_epoch(carry, _):
            train_state, rng = carry
            rng, k_perm = jax.random.split(rng)
            batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), (traj, advantages, targets))
            perm = jax.random.permutation(k_perm, args.num_envs * args.num_steps)

            def _update_minibatch(train_state, mb_idx):
                # each minibatch gathers its rows when it runs: no shuffled copy of the whole rollout per epoch
                tr, adv, tgt = jax.tree.map(lambda x: jnp.take(x, mb_idx, axis=0), batch)
                # the shuffle is global (same minibatches as on one device); each device then works on its part
                if mesh is not None:
                    tr, adv, tgt = jax.lax.with_sharding_constraint((tr, adv, tgt), NamedSharding(mesh, P("env")))
                grads, aux = jax.grad(ppo_loss, has_aux=True)(train_state.params, network, args, tr, adv, tgt)
                return train_state.apply_gradients(grads=grads), aux

            train_state, aux = jax.lax.scan(_update_minibatch, train_state, perm.reshape(args.num_minibatches, minibatch))
            return (train_state, rng), aux

        (train_state, rng), aux = jax.lax.scan(_update_epoch, (train_state, rng), None, args.update_epochs)
        norm = norm.update(raw_obs.reshape(-1, raw_obs.shape[-1]))
        totals = jax.tree.map(lambda x: x.sum(0), stats)
        metrics = dict(
            episodic_return=totals.returns / jnp.maximum(totals.episodes, 1),
            episodic_length=totals.lengths / jnp.maximum(totals.episodes, 1),
            episodes=totals.episodes, breaches=totals.breaches,
            policy_loss=aux[0].mean(), value_loss=aux[1].mean(), entropy=aux[2].mean(), approx_kl=aux[3].mean(),
            clipfrac=aux[4].mean(),
            learning_rate=args.learning_rate * (1.0 - update / num_updates if args.anneal_lr else 1.0),
            explained_variance=1 - jnp.var(targets - traj.value) / (jnp.var(targets) + 1e-8),
            market_episodes=totals.market_episodes, market_return_sum=totals.market_returns,
            market_length_sum=totals.market_lengths,
            market_breaches=totals.market_breaches,  # [M] each
            **{f"curriculum_{k}": v for k, v in curriculum.items()},
        )
        return RunnerState(train_state, env_state, last_obs, norm, rng, update + 1), metrics

    def train_chunk(runner: RunnerState, split: MarketData = data):
        """`chunk_updates` PPO updates in one lax.scan on the training split `split` (compiled once, called repeatedly)."""
        return jax.lax.scan(functools.partial(_update_step, split), runner, None, args.chunk_updates)

    return init, train_chunk, num_updates, network


# ---- OUTER LOOP ----
def chunk_summary(m: dict, markets: list) -> tuple[dict, dict]:
    """One seed's chunk metrics ([chunk_updates] or [chunk_updates, M] arrays) -> (totals, {market: metrics}).

    Returns and lengths are means over the episodes that ended in the chunk; `episodes` and `breaches`
    are means per update; the learning rate and the curriculum values are those of the chunk's last update.
    A market with no finished episode in the chunk has a return and length of None.
    """
    last = ("learning_rate", "curriculum_dd_limit", "curriculum_commission_scale")
    out = {k: float(v[-1]) if k in last else float(np.mean(v)) for k, v in m.items() if not k.startswith("market_")}
    n = float(m["episodes"].sum())
    out["episodic_return"] = float(np.sum(m["episodic_return"] * m["episodes"]) / max(n, 1))
    out["episodic_length"] = float(np.sum(m["episodic_length"] * m["episodes"]) / max(n, 1))
    by_market = {}
    for i, market in enumerate(markets):
        n_m = float(m["market_episodes"][:, i].sum())
        by_market[market] = dict(episodic_return=float(m["market_return_sum"][:, i].sum() / n_m) if n_m else None,
                                 episodic_length=float(m["market_length_sum"][:, i].sum() / n_m) if n_m else None,
                                 episodes=float(m["market_episodes"][:, i].mean()),
                                 breaches=float(m["market_breaches"][:, i].mean()))
    return out, by_market
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
                        "the processes 0..P-1")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)


def make_mesh(args: Args) -> Mesh:
    """A ("seed", "env") mesh over --devices devices of every process: seeds split over gcd(num_seeds, devices)
    groups of devices, each seed's envs over the devices of its group."""
    local = jax.local_devices()
    n = len(local) if args.devices is None else args.devices
    if not 1 <= n <= len(local):
        raise DataError(f"--devices {n}: this process has {len(local)} {local[0].platform} device(s). Fix: pass --devices "
                        f"between 1 and {len(local)}")
    devices = [d for p in range(jax.process_count()) for d in [x for x in jax.devices() if x.process_index == p][:n]]
    n_seed = math.gcd(args.num_seeds, len(devices))
    n_env = len(devices) // n_seed
    minibatch = args.num_envs * args.num_steps // args.num_minibatches
    if args.num_envs % n_env or minibatch % n_env:
        raise DataError(f"--num-envs {args.num_envs} (and the minibatch of {minibatch}) must divide over {n_env} devices per "
                        "seed "
                        f"({len(devices)} devices, --num-seeds {args.num_seeds}). Fix: pass a multiple of {n_env} to "
                        "--num-envs, or change --devices")
    return Mesh(np.array(devices).reshape(n_seed, n_env), ("seed", "env"))


def runner_shardings(runner: RunnerState, mesh: Mesh) -> RunnerState:
    """Where each part of the (seed-stacked) runner state lives: env states and observations split by seed and
    env, everything else (params, optimiser, normaliser, RNG) split by seed and copied over a seed's env devices."""
    by_seed, by_env = NamedSharding(mesh, P("seed")), NamedSharding(mesh, P("seed", "env"))
    return RunnerState(jax.tree.map(lambda _: by_seed, runner.train_state), jax.tree.map(lambda _: by_env, runner.env_state),
                       by_env,
                       jax.tree.map(lambda _: by_seed, runner.obs_norm), by_seed, by_seed)


def place(tree, shardings):
    """Host or single-device arrays -> global arrays laid out by `shardings` (every process passes the same values)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=np.asarray(x): x[idx]), tree,
                        shardings)


def fetch(tree):
    """Global (possibly sharded, possibly multi-host) arrays -> NumPy arrays on every process."""
    return multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)


def seed_policies(runner: RunnerState) -> list:
    """(network params, observation normaliser) of every seed (the leading vmap axis), as host arrays."""
    params, norm = fetch((runner.train_state.params, runner.obs_norm))
    num_seeds = jax.tree.leaves(params)[0].shape[0]
    return [jax.tree.map(lambda x, k=k: x[k], (params, norm)) for k in range(num_seeds)]


def fold_dir(run_dir: Path, fold: int, num_folds: int) -> Path:
    """The folder of one walk-forward fold's training (checkpoint, logs, policy files): runs/NAME/fold<f>/, or the run
    folder itself for a single split."""
    return run_dir if num_folds == 1 else run_dir / f"fold{fold}"


def policy_file(run_dir: Path, seed_index: int, which: str) -> Path:
    """A seed's policy file in a run (or fold) folder: seed<k>/best.msgpack or final.msgpack."""
    return run_dir / f"seed{seed_index}" / f"{which}.msgpack"


def run_policy_files(run_dir: Path, flag_name: str) -> list[list[Path]]:
    """Per walk-forward fold, seed<k>/best.msgpack of every seed of a training run folder (its config.json says how
    many folds and seeds it has)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{flag_name} {run_dir}: a folder without config.json. Fix: pass a run folder written by "
                        "ppo_trader.py, or a policy file runs/NAME/seed0/best.msgpack")
    config = json.loads(cfg_path.read_text())
    num_seeds, num_folds = config.get("num_seeds", 1), config.get("walk_forward", 1)
    files = [[policy_file(fold_dir(run_dir, fold, num_folds), k, "best") for k in range(num_seeds)]
             for fold in range(num_folds)]
    missing = [f for fold_files in files for f in fold_files if not f.is_file()]
    if missing:
        raise DataError(f"{flag_name} {run_dir}: {missing[0]} does not exist (the run has {num_folds} fold(s) x {num_seeds} "
                        "seed(s)). Fix: pass a run folder whose training finished, or one policy file")
    return files


def save_checkpoint(path: Path, runner: RunnerState, extra: dict) -> None:
    """flax.serialization msgpack of the whole runner state (params, optimiser, envs, normaliser, RNG, counters).
    Host arrays without any device layout, so a checkpoint resumes on any number of devices. Every process
    calls it (the gather is collective); process 0 writes."""
    runner = fetch(runner)
    if jax.process_index() != 0:
        return
    payload = {"runner": flax.serialization.to_state_dict(runner), "extra": json.dumps(extra)}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def load_checkpoint(path: Path, template: RunnerState) -> tuple[RunnerState, dict]:
    """Restores a runner state saved by `save_checkpoint` into the structure of `template`."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        runner = flax.serialization.from_state_dict(template, payload["runner"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint. Fix: pass a .msgpack written by ppo_trader.py") from None
    except Exception as e:
        raise DataError(f"{path}: checkpoint does not match this configuration ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}). "
                        "Fix: use the flags the checkpoint was trained with (see its run's config.json)") from None
    shapes_ok = jax.tree.all(jax.tree.map(lambda a, b: jnp.shape(a) == jnp.shape(b), runner, template))
    if not shapes_ok:
        raise DataError(f"{path}: array shapes differ from this configuration. Fix: use the flags of the run's config.json")
    return runner, json.loads(payload["extra"])


def save_policy(path: Path, params, norm: ObsNorm, args: Args, info: dict, seed_index: int = 0) -> None:
    """A policy-only checkpoint (for --eval-only): network params, obs normaliser, the training split's
    feature statistics, the run's config and the indices of the seed and walk-forward fold (info['fold']) it belongs
    to. Written by process 0 only."""
    if jax.process_index() != 0:
        return
    payload = {"params": flax.serialization.to_state_dict(params), "obs_norm": flax.serialization.to_state_dict(norm),
               "config": json.dumps(dataclasses.asdict(args)), "num_actions": make_network(args).num_actions,
               "feature_stats": json.dumps([info["feature_mean"], info["feature_std"]]), "seed_index": seed_index,
               "fold": info["fold"]}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    os.replace(tmp, path)


def read_policy(path: str) -> dict:
    """The payload of a policy checkpoint, its config and feature statistics decoded."""
    try:
        payload = flax.serialization.msgpack_restore(Path(path).read_bytes())
        return dict(payload, config=json.loads(payload["config"]), num_actions=int(payload["num_actions"]),
                    feature_stats=tuple(json.loads(payload["feature_stats"])),
                    seed_index=int(payload.get("seed_index", 0)), fold=int(payload.get("fold", 0)))
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path}: no such checkpoint. Fix: pass runs/NAME/seed0/best.msgpack or final.msgpack") from None
    except Exception:
        raise DataError(f"{path}: not a ppo_trader policy checkpoint. "
                        "Fix: pass runs/NAME/seed0/best.msgpack or final.msgpack") from None


def policy_config(path: str) -> tuple[dict, tuple, int]:
    """The training config, feature statistics and seed index stored in a policy checkpoint."""
    payload = read_policy(path)
    return payload["config"], payload["feature_stats"], payload["seed_index"]


def load_policy(path: str, args: Args, obs_dim: int):
    """Loads a policy checkpoint; checks its action count and observation size against this configuration."""
    payload = read_policy(path)
    cfg, n_act = payload["config"], payload["num_actions"]
    if cfg.get("action_space", "discrete") != args.action_space:
        raise DataError(f"{path}: a policy for --action-space {cfg.get('action_space', 'discrete')}, this run has "
                        f"--action-space {args.action_space}. Fix: use a checkpoint of the same action space")
    network = make_network(dataclasses.replace(args, hidden=cfg["hidden"]))
    n_need = network.num_actions
    if n_act != n_need:
        raise DataError(f"{path}: policy has {n_act} actions, this run needs {n_need}. Fix: use a checkpoint of the same "
                        "phase")
    template = network.init(jax.random.PRNGKey(0), jnp.zeros(obs_dim))
    try:
        params = flax.serialization.from_state_dict(template, payload["params"])
        norm = flax.serialization.from_state_dict(ObsNorm.create(obs_dim), payload["obs_norm"])
    except Exception:
        raise DataError(f"{path}: network does not fit this configuration. Fix: pass the --window/--hidden it was trained "
                        "with") from None
    if jax.tree.map(jnp.shape, params) != jax.tree.map(jnp.shape, template) or norm.mean.shape != (obs_dim,):
        raise DataError(f"{path}: observation size differs (window {cfg['window']}). Fix: pass --window {cfg['window']} and "
                        "the same data features")
    return network, params, norm, cfg


def load_transfer(path: str, args: Args, num_features: int) -> tuple:
    """(params, obs normaliser) of the phase 1 policy `path` for --init-from, checked against this run."""
    cfg, _, _ = policy_config(path)
    if cfg.get("phase", 1) != 1:
        raise DataError(f"{path}: a phase {cfg.get('phase')} policy; --init-from needs a phase 1 policy. Fix: pass a phase 1 "
                        "run folder or its seed0/best.msgpack")
    for flag in ("window", "hidden"):
        if cfg.get(flag) != getattr(args, flag):
            raise DataError(f"{path}: trained with --{flag} {cfg.get(flag)}, this run has --{flag} {getattr(args, flag)}. "
                            f"Fix: pass --{flag} {cfg.get(flag)}")
    _, params, norm, _ = load_policy(path, dataclasses.replace(args, phase=1), obs_size(args.window, num_features, 1))
    return params, norm


TRANSFER_SPLIT_FLAGS = ("train_end", "val_end", "walk_forward", "walk_forward_train_bars")  # a fold's phase 1 = its phase 2


def init_transfers(args: Args, num_features: int, fold: int = 0) -> list:
    """--init-from for walk-forward fold `fold`: one (params, obs normaliser) per seed: a policy file's for every seed
    (a single split only), or seed k's best.msgpack of that fold of a phase 1 run folder for seed k (the folder must
    have --num-seeds seeds and, with --walk-forward K > 1, the same data and split flags, so each fold's phase 1 saw
    only that fold's training and validation blocks)."""
    source = Path(args.init_from)
    if not source.is_dir():
        if args.walk_forward > 1:
            raise DataError(f"--init-from {source}: one policy file cannot start every walk-forward fold (it was selected "
                            "on one validation block, another fold's training or test data). Fix: pass the phase 1 run "
                            "folder trained with the same --walk-forward, --train-end, --val-end and --data")
        return [load_transfer(args.init_from, args, num_features)] * args.num_seeds
    files = run_policy_files(source, "--init-from")
    if args.walk_forward > 1:
        config = json.loads((source / "config.json").read_text())
        differ = [name for name in TRANSFER_SPLIT_FLAGS if config.get(name) != getattr(args, name)]
        if Path(config.get("data", "")).resolve() != Path(args.data).resolve():
            differ.insert(0, "data")
        if differ:
            raise DataError(f"--init-from {source} was trained with {flag(differ[0])} {config.get(differ[0])}, this "
                            f"walk-forward run has {getattr(args, differ[0])}: its folds would not be this run's. Fix: "
                            f"pass {flag(differ[0])} {config.get(differ[0])}, or a phase 1 run of this run's folds")
    elif len(files) != 1:
        raise DataError(f"--init-from {source} is a walk-forward run of {len(files)} folds, this run has one split. Fix: "
                        f"pass --walk-forward {len(files)} and its split flags, or one policy file (e.g. {files[0][0]})")
    if len(files[fold]) != args.num_seeds:
        raise DataError(f"--init-from {source} has {len(files[fold])} seeds, this run has --num-seeds {args.num_seeds}. "
                        f"Fix: pass --num-seeds {len(files[fold])}, or one policy file (e.g. {files[fold][0]}) to start every "
                        "seed from it")
    return [load_transfer(str(f), args, num_features) for f in files[fold]]


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
def backtest_steps(env_params: EnvParams, bounds) -> int:
    """Steps of a backtest that plays every split of `bounds` ((first, end) bars of each market's split, of every
    split it plays) to its end: the longest one's; shorter ones idle at the end."""
    return max(int(hi) - int(lo) for lo, hi in bounds) - env_params.window


def make_split_backtest(env_params: EnvParams, num_steps: int):
    """Jitted contiguous pass over a split: `play(policies, policy_args, key, data)` plays every policy (a tuple of
    `policy(policy_args, key, obs, mask) -> action`, static: one compilation per tuple) on every market of the split
    `data` at once (vmapped, the market index traced), in one scan of `num_steps` steps (`backtest_steps`; a market's
    steps past its split's end are not `live`); `policy_args` (e.g. network params) and `data` are traced, so new
    parameters and every walk-forward fold's split play one compiled program. Returns one dict per policy of
    [M, steps] arrays.

    No auto-reset, no episode limit: one account from the first decision bar to the split end; after a
    drawdown breach the account stops trading and stays flat to the end of the split. The observation is the
    training one (`get_obs` with `env_params`).
    The split's last bar acts as a session end, with or without `flatten_at_close`: a position still open is
    closed at its close (slippage, commission), so the last equity is realised and every trade is closed, and
    no entry is allowed in the `no_entry_bars` before it (an entry there could only be closed at once).
    Per-step outputs (`live`: the step is inside the split; `breach`: the step breached the drawdown limit;
    `closed_*` [.., 2]: the contracts closed at the open by the action and inside the bar, see `step_core`).
    """
    window = env_params.window
    rules = env_params.replace(flatten_at_close=True)

    def bt_step(policy, policy_args, data, rules_data, state, alive, key):
        key, k = jax.random.split(key)
        in_split = state.t + 1 < data.hi[state.market]
        live = alive & in_split
        mask = legal_mask(state, rules, rules_data)
        action = jnp.where(live, policy(policy_args, k, get_obs(state, env_params, data), mask), HOLD)
        nxt, reward, term, info = step_core(state, action, rules, rules_data)
        nxt = jax.tree.map(lambda a, b: jnp.where(live, a, b), nxt, state)
        nxt = nxt.replace(t=jnp.where(in_split, state.t + 1, state.t))  # after a breach the clock runs on, flat
        closed = jax.tree.map(lambda x, empty: jnp.where(live, x, empty), info["closed"], no_close_pair(info["closed"]))
        out = dict(t=nxt.t, live=in_split, equity=nxt.equity, dir=nxt.dir, reward=jnp.where(live, reward, 0.0), action=action,
                   entry_price=jnp.where(live, info["entry_price"], jnp.nan), breach=live & term,
                   **{f"closed_{k}": v for k, v in closed._asdict().items()})
        return (nxt, alive & ~(live & term), key), out

    def play(policies, policy_args, key, data: MarketData):
        # the flatten rule closes at bars marked here: the session ends (if flatten_at_close) and the split's last bar;
        # the entry rule counts bars to the nearer of the session end and the split's last bar
        bar = jnp.arange(data.session_end.shape[1])[None]
        last = data.hi[:, None] - 1
        rules_data = data.replace(session_end=(data.session_end & env_params.flatten_at_close) | (bar == last),
                                  bars_to_close=jnp.minimum(data.bars_to_close, jnp.maximum(last - bar, 0)))
        markets = jnp.arange(data.lo.shape[0])
        start = jax.vmap(reset_at)(markets, data.lo + window - 1)
        keys = jnp.broadcast_to(key, markets.shape + key.shape)
        carry = tuple((start, jnp.ones(markets.shape, bool), keys) for _ in policies)

        def body(carry, _):
            steps = [jax.vmap(functools.partial(bt_step, policy, args, data, rules_data))(*c) for policy, args,
                     c in zip(policies, policy_args, carry)]
            return tuple(s[0] for s in steps), tuple(s[1] for s in steps)

        _, outs = jax.lax.scan(body, carry, None, num_steps)
        return tuple(jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out) for out in outs)  # [steps, M, ...] -> [M, steps, ...]

    return jax.jit(play, static_argnums=0)


def bind_split(play, data: MarketData):
    """`play(policies, policy_args, key)` of a `make_split_backtest` program on one split."""

    def backtest(policies, policy_args, key):
        return play(policies, policy_args, key, data)

    return backtest


def make_backtest(env_params: EnvParams, data: MarketData):
    """`play(policies, policy_args, key)`: the `make_split_backtest` pass over the split `data`, to its end."""
    steps = backtest_steps(env_params, zip(np.asarray(data.lo), np.asarray(data.hi)))
    return bind_split(make_split_backtest(env_params, steps), data)


def no_close_pair(closed: Closed) -> Closed:
    """The value of `closed` when nothing closed."""
    return Closed(*(jnp.full_like(x, jnp.nan) if name in ("price", "entry") else jnp.zeros_like(x) for name,
                    x in closed._asdict().items()))


def play_one(backtest, policy, policy_args, market: int, key) -> dict:
    """One policy on one market of a `make_backtest` split, as host arrays of the split's live steps."""
    out = backtest((policy,), (policy_args,), key)[0]
    out = {k: np.asarray(v[market]) for k, v in out.items()}
    return {k: v[out["live"]] for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def greedy_policy(network):
    """The trained policy acting greedily (most probable legal action); policy_args = (params, obs normaliser)."""

    def policy(policy_args, key, obs, mask):
        params, norm = policy_args
        logits, _ = network.apply(params, norm(obs))
        if network.continuous:  # the squashed mean as the target position
            return jnp.tanh(logits[0])
        return jnp.argmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min))

    return policy


@functools.lru_cache(maxsize=None)
def sampled_policy(network):
    """The trained policy sampling its actions as in training (masked categorical, or tanh of the Gaussian)."""

    def policy(policy_args, key, obs, mask):
        params, norm = policy_args
        logits, _ = network.apply(params, norm(obs))
        if network.continuous:
            return squashed_gaussian(logits).sample(seed=key)
        return masked_policy(logits, mask).sample(seed=key)

    return policy


def random_policy(policy_args, key, obs, mask):
    """Uniform over the legal actions."""
    return jax.random.choice(key, mask.shape[0], p=mask / mask.sum())


def random_target_policy(policy_args, key, obs, mask):
    """Continuous action space: a target position uniform in [-1, 1] every bar."""
    return jax.random.uniform(key, (), minval=-1.0, maxval=1.0)


def session_returns(equity: np.ndarray, day: np.ndarray, initial: float) -> np.ndarray:
    """Per-period returns of an equity curve (relative to the initial balance): the equity at each period's last bar
    (`day` labels each bar's period) over the one before, the first over the initial balance."""
    last_of_day = np.r_[day[1:] != day[:-1], True]
    daily = np.r_[initial, initial + equity[last_of_day]]
    return daily[1:] / daily[:-1] - 1


def session_ids(data: MarketData, market: int) -> np.ndarray:
    """The session of every bar of a market (a period of the report's metrics = one trading session)."""
    return np.r_[0, np.cumsum(np.asarray(data.session_end[market])[:-1])]


def period_metrics(equity: np.ndarray, day: np.ndarray, initial: float, periods_per_year: float = 252.0) -> dict:
    """Return/risk metrics from an equity curve: per-period returns (`day` labels each bar's session), 252 a year."""
    eq = initial + equity
    rets = session_returns(equity, day, initial)
    years = max(len(rets) / periods_per_year, 1e-9)
    total = eq[-1] / initial - 1
    ann = (1 + total) ** (1 / years) - 1 if total > -1 else -1.0
    vol = rets.std() * np.sqrt(periods_per_year)
    down = rets[rets < 0]  # Sortino: downside deviation over all periods (0 for up periods)
    dd = 1 - eq / np.maximum.accumulate(np.r_[initial, eq])[1:]
    max_dd = float(dd.max()) if len(dd) else 0.0
    return dict(total_return=float(total), annualised_return=float(ann), annualised_volatility=float(vol),
                sharpe=float(rets.mean() / rets.std() * np.sqrt(periods_per_year)) if rets.std() > 0 else 0.0,
                sortino=float(rets.mean() / np.sqrt((np.minimum(rets, 0) ** 2).mean()) * np.sqrt(periods_per_year))
                if len(down) else 0.0,
                max_drawdown=max_dd, calmar=float(ann / max_dd) if max_dd > 0 else 0.0, days=int(len(rets)))


def trade_metrics(out: dict) -> dict:
    """Counts and quality of closed trades, and exposure (fraction of live bars in a position). A profit factor
    without a losing trade is undefined: null (with no trade at all, 0)."""
    closed = np.isfinite(out["closed_price"])
    pnl = out["closed_round_trip"][closed]
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    live = out["live"]
    profit_factor = float(wins.sum() / -losses.sum()) if losses.sum() < 0 else (None if len(wins) else 0.0)
    return dict(trades=int(closed.sum()), win_rate=float((pnl > 0).mean()) if len(pnl) else 0.0, profit_factor=profit_factor,
                average_trade=float(pnl.mean()) if len(pnl) else 0.0,
                exposure=float((out["dir"][live] != 0).mean()) if live.any() else 0.0)


def buy_and_hold(data: MarketData, market: int, env_params: EnvParams) -> tuple[np.ndarray, bool]:
    """(equity relative to the initial balance at each bar, breached) of holding `contracts` (continuous actions:
    `max_contracts`) long from the first decision bar's next open to the split's last close, with the policy's
    costs (slippage and commission on both fills) and its prop-firm rule: equity marked at each close at or below
    the trailing threshold sells at that close and the account stays flat."""
    lo, hi, window = int(data.lo[market]), int(data.hi[market]), env_params.window
    close = np.asarray(data.close[market][lo + window: hi], np.float64)
    slip = env_params.slippage_ticks * float(data.tick_size[market])
    entry = float(data.open[market][lo + window]) + slip
    lots = env_params.max_contracts if env_params.action_space == "continuous" else env_params.contracts
    point_value = float(data.point_value[market]) * lots
    commission = float(data.commission[market]) * lots
    exit_cost = commission + slip * point_value
    equity = (close - entry) * point_value - commission
    equity[-1] -= exit_cost  # sold at the split's last close
    peak = np.maximum.accumulate(np.maximum(equity, 0.0))
    threshold = np.minimum(peak - env_params.dd_limit, env_params.dd_lock_offset)
    breach = np.flatnonzero(equity <= threshold)
    if len(breach):
        i = breach[0]
        equity[i:] = equity[i] - (exit_cost if i < len(equity) - 1 else 0.0)
    return equity, bool(len(breach))


def backtest_report(backtest, data: MarketData, info: dict, split: str, env_params: EnvParams, policies: dict,
                    seed: int) -> tuple[dict, dict]:
    """Plays every policy on every market of a split (one call); returns ({market: rows}, live outputs per policy and
    market, buy-and-hold's included, each with its per-session returns `session_returns`)."""
    report = {}
    names = list(policies)
    outs = backtest(tuple(policies[n][0] for n in names), tuple(policies[n][1] for n in names), jax.random.PRNGKey(seed))
    raws = {name: {} for name in names + ["buy_and_hold"]}
    initial = env_params.initial_balance
    for m, market in enumerate(info["markets"]):
        lo, hi = info["bounds"][m][split]
        ts = info["timestamps"][m]
        session_id = session_ids(data, m)
        rows = {}
        for name, out in zip(names, outs):
            out = {k: np.asarray(v[m]) for k, v in out.items()}
            out = {k: v[out["live"]] for k, v in out.items()}
            rows[name] = dict(period_metrics(out["equity"], session_id[out["t"]], initial),
                              **trade_metrics(out),
                              final_equity=float(initial + out["equity"][-1]),
                              breached=bool(out["breach"].any()))
            raws[name][market] = dict(out, session_returns=session_returns(out["equity"], session_id[out["t"]], initial))
        bh, bh_breached = buy_and_hold(data, m, env_params)
        t_bh = np.arange(lo + env_params.window, hi)
        rows["buy_and_hold"] = dict(period_metrics(bh, session_id[t_bh], initial), trades=1,
                                    final_equity=float(initial + bh[-1]), breached=bh_breached)
        raws["buy_and_hold"][market] = dict(t=t_bh, equity=bh, session_returns=session_returns(bh, session_id[t_bh], initial))
        report[market] = dict(bars=int(hi - lo), start=str(np.datetime64(int(ts[lo]), "ns")),
                              end=str(np.datetime64(int(ts[hi - 1]), "ns")), **rows)
    return report, raws


def trade_rows(out: dict, market: str, ts: np.ndarray) -> list[str]:
    """trades.csv rows of one market's backtest: per closed lot group, the time its position was opened, the exit
    time, direction, average entry price (the one the P&L uses), exit price and P&L with both commissions."""
    rows, opened_at, prev_dir = [], None, 0
    for i in range(len(out["t"])):
        fill_time = ts[out["t"][i]]
        for slot in (0, 1):  # closed at the open by the action, then inside the bar
            if slot == 1 and np.isfinite(out["entry_price"][i]) and (prev_dir == 0 or out["closed_lots"][i, 0] > 0):
                opened_at = fill_time  # a position opened from flat, or the new side of a reversal, at this open
            if np.isfinite(out["closed_price"][i, slot]):
                side = "long" if out["closed_direction"][i, slot] > 0 else "short"
                rows.append(f"{market},{np.datetime64(int(opened_at), 'ns')},{np.datetime64(int(fill_time), 'ns')},{side},"
                            f"{out['closed_entry'][i, slot]:.6g},{out['closed_price'][i, slot]:.6g},"
                            f"{out['closed_round_trip'][i, slot]:.2f}")
        prev_dir = out["dir"][i]
    return rows


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity), written to a temporary file and renamed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)


PLOT_POLICIES = {"policy": "tab:blue", "sampled": "tab:green", "random": "tab:gray", "buy_and_hold": "tab:orange"}


def stitched_equity(fold_curves: list, initial: float) -> np.ndarray:
    """[runs, bars] account values of runs stitched over the folds in order: `fold_curves` per fold a [runs, bars]
    array of equity relative to the initial balance (each fold's test starts a fresh account); every fold's block
    starts at the last one's value."""
    out, scale = [], np.ones(len(fold_curves[0]))
    for curves in fold_curves:
        growth = (initial + np.asarray(curves, np.float64)) / initial
        out.append(scale[:, None] * growth)
        scale = out[-1][:, -1]
    return initial * np.concatenate(out, axis=1)


def policy_curves(fold_runs: list, name: str, market: str) -> list:
    """Per fold, the [runs, bars] equity curves of policy `name` on `market`: one per seed, or per random run."""
    if name == "random":
        return [np.stack([equity for *_, equity in fold.random_runs[market]]) for fold in fold_runs]
    return [np.stack([raws[name][market]["equity"] for raws in fold.raws]) for fold in fold_runs]


def plot_equity(path: Path, report: dict, fold_runs: list, info: dict) -> None:
    """equity.png, one panel per market: per policy the median stitched account value over the runs (seeds; random:
    the random runs) with its 10-90% band, buy-and-hold as the median line, walk-forward fold boundaries dotted."""
    import matplotlib.pyplot as plt

    markets = info["markets"]
    fig, axes = plt.subplots(len(markets), 1, figsize=(10, 3.6 * len(markets)), squeeze=False)
    for ax, market in zip(axes[:, 0], markets):
        ts = info["timestamps"][markets.index(market)]
        fold_times = [ts[fold.raws[0]["policy"][market]["t"]].astype("datetime64[ns]") for fold in fold_runs]
        times = np.concatenate(fold_times)
        for name, color in PLOT_POLICIES.items():
            equity = stitched_equity(policy_curves(fold_runs, name, market), report["initial_balance"])
            low, median, high = np.percentile(equity, [10, 50, 90], axis=0)
            runs = f"{len(equity)} random runs" if name == "random" else f"{len(equity)} seeds"
            label = name if name == "buy_and_hold" else f"{name} (median of {runs})"  # buy-and-hold: one curve per fold
            ax.plot(times, median, color=color, lw=1.2, label=label)
            if name != "buy_and_hold" and len(equity) > 1:
                ax.fill_between(times, low, high, color=color, alpha=0.18, lw=0)
        for fold_start in fold_times[1:]:
            ax.axvline(fold_start[0], color="k", ls=":", lw=0.8)
        ax.axhline(report["initial_balance"], color="k", lw=0.5)
        folds_text = f", {len(fold_runs)} walk-forward folds (dotted: boundaries)" if len(fold_runs) > 1 else ""
        ax.set_title(f"{market}: {report['split']} split account value, median and 10-90% band over runs{folds_text}",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(path: Path, report: dict) -> None:
    """summary.png, one row per market under its verdict: the median total return and Sharpe ratio of each policy with
    their 95% bootstrap CIs."""
    import matplotlib.pyplot as plt

    markets = list(report["summary"])
    fig = plt.figure(figsize=(10, 3.4 * len(markets)), layout="constrained")
    for market, market_fig in zip(markets, np.atleast_1d(fig.subfigures(len(markets), 1))):
        summary = report["summary"][market]
        names = [name for name in PLOT_POLICIES if name in summary]
        for ax, metric in zip(market_fig.subplots(1, 2), ("total_return", "sharpe")):
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
            ax.xaxis.set_major_locator(plt.MaxNLocator(6))
            if metric == "total_return":
                ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:+.1%}"))
            ax.set_title(f"median {metric.replace('_', ' ')} of the runs, 95% bootstrap CI", fontsize=9)
        market_fig.suptitle("\n".join(textwrap.wrap(f"{market}: {report['verdict'][market]}", 130)), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_backtest_outputs(run_dir: Path, report: dict, fold_runs: list, info: dict, fold_column: bool) -> None:
    """report.json, trades.csv (the greedy policy's trades of every fold and seed; a first `fold` column when
    `fold_column`), equity.png (`plot_equity`) and summary.png (`plot_summary`), process 0 only."""
    if jax.process_index() != 0:
        return
    import matplotlib

    matplotlib.use("Agg")

    write_json(run_dir / "report.json", report)
    lines = [("fold," if fold_column else "") + "seed,market,entry_time,exit_time,direction,entry_price,exit_price,pnl"]
    for m, market in enumerate(info["markets"]):
        ts = info["timestamps"][m]
        for fold in fold_runs:
            for row, raws in zip(fold.rows, fold.raws):
                prefix = f"{row['fold']},{row['seed']}" if fold_column else f"{row['seed']}"
                lines += [f"{prefix},{line}" for line in trade_rows(raws["policy"][market], market, ts)]
    (run_dir / "trades.csv").write_text("\n".join(lines) + "\n")
    plot_equity(run_dir / "equity.png", report, fold_runs, info)
    plot_summary(run_dir / "summary.png", report)


def over_seeds(rows: list, markets: list) -> dict:
    """{market: {policy: {metric: {median, min, max}}}} over the report's rows (every fold x seed), for every numeric
    metric (a metric that is null for some runs, like a profit factor without a losing trade, over the others; null if
    null for all)."""
    out = {}
    for market in markets:
        out[market] = {}
        for name, metrics in rows[0][market].items():
            if not isinstance(metrics, dict):
                continue
            out[market][name] = {}
            for metric in metrics:
                values = [row[market][name][metric] for row in rows]
                if any(isinstance(value, bool) for value in values):
                    continue
                numbers = [value for value in values if value is not None]
                out[market][name][metric] = dict(median=float(np.median(numbers)), min=float(min(numbers)),
                                                 max=float(max(numbers))) if numbers else None
    return out


@functools.lru_cache(maxsize=None)
def random_runs_player(play, random):
    """The random policy `random` played once per key by a `make_split_backtest` program, vmapped over the keys: one
    compiled program for every fold's split."""

    def play_random(key, data):
        out = play((random,), (None,), key, data)[0]
        return {k: out[k] for k in ("t", "live", "equity")}

    return jax.jit(jax.vmap(play_random, in_axes=(0, None)))


def random_runs_report(play, random, data: MarketData, info: dict, env_params: EnvParams, num_runs: int,
                       seed: int) -> dict:
    """{market: [(metrics, per-session returns, equity of the live bars) of each run]} of `num_runs` random policies
    played in one vmapped backtest (`play`, a `make_split_backtest` program) of the split `data` (their keys split from
    PRNGKey(seed)); only what the statistics and the plot need leaves the device."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num_runs)
    outs = jax.tree.map(np.asarray, random_runs_player(play, random)(keys, data))
    runs = {}
    for m, market in enumerate(info["markets"]):
        session_id, runs[market] = session_ids(data, m), []
        for r in range(num_runs):
            live = outs["live"][r, m]
            equity, day = outs["equity"][r, m][live], session_id[outs["t"][r, m][live]]
            runs[market].append((period_metrics(equity, day, env_params.initial_balance),
                                 session_returns(equity, day, env_params.initial_balance), equity))
    return runs


class FoldRuns(NamedTuple):
    """What one walk-forward fold's split gave: the report rows and live outputs of its seeds and its random runs."""

    rows: list  # one report row per seed
    raws: list  # per seed {policy: {market: live outputs with session_returns}}
    random_runs: dict  # {market: [(metrics, per-session returns, equity) of each random run]}


# the report's summary: the trained policy's two ways of acting, and the baselines it is compared with
TRAINED_POLICIES = ("policy", "sampled")
BASELINES = {"random": "random", "buy_and_hold": "buy-and-hold"}  # report name: name in the verdict
CI_METRICS = ("total_return", "annualised_return", "sharpe")
SUMMARY_ABOUT = (  # the report's summary_about: what its summary holds, and why a field can be null
    "over folds x runs (one fold: the single train/validation/test split). random: the --random-runs random policies of "
    "each fold; policy, sampled, buy_and_hold: one run per seed and fold. {value, ci}: the statistic over all runs, ci "
    f"its 95% percentile bootstrap interval (scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} resamples, runs resampled "
    "within folds). null where undefined: a ci from a single run per fold, a std of one run, a Sharpe ratio of constant "
    "returns, a deflated Sharpe without the variance of the trials' Sharpe ratios. probability_of_improvement: P(this "
    "policy's total return > the other's), ties 1/2, over all pairs of runs of a fold, averaged over folds. "
    "probabilistic_sharpe (against 0) and deflated_sharpe: of each run's per-session returns stitched over the folds "
    "(seed k's fold tests in order; random run r's likewise), the median over runs (per_run: each run's); num_trials = "
    "folds x seeds x --trials for the trained policy, 1 for a baseline (nothing was selected). percentile_among_random: "
    "each run's total return among the random runs of its fold, ties half. improvement_over_markets: P(improvement) "
    "with a task per market and fold, averaged over them. Verdict rules: README.md")


class MarketRuns(NamedTuple):
    """One market's runs of every policy, as the STATISTICS take them."""
    metrics: dict  # {policy: {metric: [folds, runs]}} for the CI_METRICS
    session_returns: dict  # {policy: [per-session returns of each run]} (folds stitched, per run)


def market_runs(fold_runs: list, market: str) -> MarketRuns:
    """The runs of one market over the walk-forward folds (`fold_runs`, FoldRuns in fold order): [folds, runs] metric
    arrays, and each run's per-session returns stitched over the folds (seed k's over its folds; the r-th random run
    of every fold)."""
    per_seed = ("policy", "sampled", "buy_and_hold")
    metrics = {name: {metric: np.array([[row[market][name][metric] for row in fold.rows] for fold in fold_runs])
                      for metric in CI_METRICS} for name in per_seed}
    metrics["random"] = {metric: np.array([[run[0][metric] for run in fold.random_runs[market]] for fold in fold_runs])
                         for metric in CI_METRICS}
    returns = {name: [np.concatenate(runs) for runs in zip(*[[raws[name][market]["session_returns"] for raws in fold.raws]
                                                              for fold in fold_runs])] for name in per_seed}
    returns["random"] = [np.concatenate(runs) for runs in zip(*[[run[1] for run in fold.random_runs[market]]
                                                                for fold in fold_runs])]
    return MarketRuns(metrics, returns)


def improvement_over_markets(runs: list) -> dict:
    """{trained policy: {baseline: {value, ci}}} of P(improvement) in total return with a task per market (and fold),
    over the MarketRuns of every market."""
    tasks = {name: np.concatenate([market.metrics[name]["total_return"] for market in runs]) for name in SUMMARY_POLICIES}
    return {name: {other: probability_of_improvement(tasks[name], tasks[other]) for other in BASELINES}
            for name in TRAINED_POLICIES}


def market_summary(runs: MarketRuns, num_seeds: int, trials: int) -> tuple[dict, str]:
    """(summary, verdict) of one market: per policy the STATISTICS of its runs (see SUMMARY_ABOUT), and the verdict on
    the greedy policy against the baselines."""
    metric_runs, returns = runs
    totals = {name: policy_runs["total_return"] for name, policy_runs in metric_runs.items()}
    num_folds = len(totals["policy"])
    num_trials = num_folds * num_seeds * trials
    summary = {}
    for name in SUMMARY_POLICIES:
        trained = name in TRAINED_POLICIES
        trial_sharpes = [period_sharpe(rets) for rets in returns[name]] if trained else []
        summary[name] = dict(folds=num_folds, runs=int(totals[name].size), **run_summary(metric_runs[name]),
                             **sharpe_summary(returns[name], trial_sharpes, num_trials if trained else 1),
                             probability_of_improvement={other: probability_of_improvement(totals[name], totals[other])
                                                         for other in BASELINES if other != name})
        if name != "random":
            percentiles = percentile_among(totals[name], totals["random"])
            summary[name]["percentile_among_random"] = dict(median=median_or_none(percentiles), per_run=percentiles)
    improvements = {label: summary["policy"]["probability_of_improvement"][other] for other, label in BASELINES.items()}
    return summary, verdict(improvements, summary["policy"]["deflated_sharpe"], summary["policy"]["runs"], num_trials)


def fold_periods(info: dict, fold_indices: list) -> list:
    """Each walk-forward fold's train, validation and test periods per market (the times of their first and last bars)."""
    def stamp(m: int, i: int) -> str:
        return str(np.datetime64(int(info["timestamps"][m][i]), "ns"))

    return [{"fold": fold, **{market: {split: {"start": stamp(m, lo), "end": stamp(m, hi - 1)}
                                       for split, (lo, hi) in info["folds"][fold][m].items()}
                              for m, market in enumerate(info["markets"])}} for fold in fold_indices]


def evaluate(args: Args, network, fold_seeds: list, info: dict, env_params: EnvParams, run_dir: Path, split: str,
             extra: dict, fold_stats: Optional[dict] = None) -> dict:
    """Backtests each seed's policy (greedy, and sampling its actions), a random legal policy and buy-and-hold on a
    split of each walk-forward fold, seed k with the random key of --seed SEED+k; `fold_seeds` = [(fold, [(seed index,
    params, obs normaliser, checkpoint)])], `fold_stats` {fold: the feature statistics its policies were trained with}
    (default: the fold's training split's). Plays --random-runs random policies in one vmapped backtest per fold (keys
    of --seed + fold) and summarises every policy over folds x runs (`summary`, `verdict` per market). Every fold plays
    the same compiled backtests. Writes the report files (trades and the selection are the greedy policy's) with
    `extra`."""
    played = [(fold, seeds, *fold_data(info, fold, (fold_stats or {}).get(fold))) for fold, seeds in fold_seeds]
    play = make_split_backtest(env_params, backtest_steps(env_params, [b[split] for fold, _ in fold_seeds
                                                                       for b in info["folds"][fold]]))
    random = random_target_policy if args.action_space == "continuous" else random_policy
    rows, fold_runs = [], []
    for fold, seeds, datasets, fold_info in played:
        data = datasets[split]
        backtest = bind_split(play, data)
        fold_rows, fold_raws = [], []
        for seed_index, params, norm, checkpoint in seeds:
            policies = {"policy": (greedy_policy(network), (params, norm)),
                        "sampled": (sampled_policy(network), (params, norm)), "random": (random, None)}
            markets, raws = backtest_report(backtest, data, fold_info, split, env_params, policies, args.seed + seed_index)
            fold_rows.append(dict(fold=fold, seed=seed_index, prng_seed=args.seed + seed_index, checkpoint=str(checkpoint),
                                  **markets))
            fold_raws.append(raws)
        random_runs = random_runs_report(play, random, data, fold_info, env_params, args.random_runs, args.seed + fold)
        fold_runs.append(FoldRuns(fold_rows, fold_raws, random_runs))
        rows += fold_rows
    runs = {market: market_runs(fold_runs, market) for market in info["markets"]}
    summaries = {market: market_summary(runs[market], len(fold_seeds[0][1]), args.trials) for market in info["markets"]}
    report = dict(split=split, annualisation="per-session returns (equity at each session's last bar), 252 sessions a year",
                  initial_balance=env_params.initial_balance, **extra,
                  folds=fold_periods(info, [fold for fold, _ in fold_seeds]), seeds=rows,
                  over_seeds=over_seeds(rows, info["markets"]), random_runs=args.random_runs, trials=args.trials,
                  summary_about=SUMMARY_ABOUT, summary={market: summary for market, (summary, _) in summaries.items()},
                  verdict={market: sentence for market, (_, sentence) in summaries.items()},
                  improvement_over_markets=improvement_over_markets(list(runs.values())))
    write_backtest_outputs(run_dir, report, fold_runs, info, fold_column=args.walk_forward > 1)
    return report


def validation_return(args, network, params, norm, env_params, backtest, seed_index: int = 0) -> float:
    """Mean total return of the greedy policy over the markets of the validation split (model selection), played with
    the random key of --seed SEED+seed_index."""
    out = backtest((greedy_policy(network),), ((params, norm),), jax.random.PRNGKey(args.seed + seed_index))[0]
    equity, live = np.asarray(out["equity"]), np.asarray(out["live"])
    last = np.array([equity[m][live[m]][-1] for m in range(len(equity))])
    return float(np.mean(last / env_params.initial_balance))


# ---- MAIN ----
def hparam_table(args: Args) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())


LAYOUT_FLAGS = ("devices", "coordinator_address", "num_processes",
                "process_id")  # how to run, not what: a resume picks its own
RESUME_FLAGS = ("resume", "stop_after") + LAYOUT_FLAGS  # the only flags a resumed run takes from the command line
EVAL_FLAGS = ("data", "eval_only", "checkpoint", "eval_split", "out_dir", "run_name",
              "seed", "random_runs", "trials")  # what and where --eval-only plays, and how it is summarised
# --eval-only overrides of the policy's own values: costs, env rules and splits (stated in the report)
EVAL_OVERRIDES = ("slippage_ticks", "commission", "initial_balance", "dd_limit", "dd_lock_offset", "contracts", "sl_atr_mult",
                  "tp_atr_mult",
                  "trail_atr_mult", "no_entry_bars", "flatten_at_close", "train_end", "val_end")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_flags(args: Args) -> list[str]:
    """The fields of `args` that differ from their defaults (the flags given on the command line, as far as they matter)."""
    defaults = Args()
    return [f.name for f in dataclasses.fields(Args) if getattr(args, f.name) != getattr(defaults, f.name)]


def refuse_non_empty(run_dir: Path, how: str) -> None:
    """No output of an earlier run is overwritten."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise DataError(f"{run_dir} already holds a run's files. Fix: pass another --run-name, {how}")


class RunSetup(NamedTuple):
    args: Args  # the configuration that runs (a resumed or evaluated run's saved flags, with what the command line may change)
    run_dir: Path
    fold_stats: Optional[dict]  # --eval-only: {fold: its training split's feature statistics stored in its policies}
    overrides: dict  # --eval-only: the policy's values the command line replaced
    policy_files: tuple = ()  # --eval-only: (walk-forward fold, seed index, policy file) of each policy it plays


def resume_setup(args: Args) -> RunSetup:
    """--resume: the saved flags; any other flag given is refused (it could not change the run)."""
    run_dir = Path(args.resume)
    ignored = [name for name in given_flags(args) if name not in RESUME_FLAGS]
    if ignored:
        raise DataError(f"{flag(ignored[0])} cannot change a resumed run ({run_dir} continues with the flags of its "
                        "config.json). "
                        f"Fix: drop {' '.join(flag(n) for n in ignored)}, or start a new run with them")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise DataError(f"{run_dir}: no config.json. Fix: pass a run folder written by ppo_trader.py")
    saved = json.loads(cfg_path.read_text())
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k not in RESUME_FLAGS}
    return RunSetup(dataclasses.replace(args, **saved), run_dir, None, {})


def eval_only_setup(args: Args) -> RunSetup:
    """--eval-only: the policy's own window, network, env rules, splits, seed, random runs and trials, with the costs,
    rules, splits, seed, random runs and trials given on the command line instead; its own output folder
    (runs/NAME/eval_<split>_<data>/ inside a run folder --checkpoint, beside a policy file --checkpoint, by default). A
    run folder plays every fold's and seed's best.msgpack, each on its own fold's split."""
    if not args.checkpoint:
        raise DataError("--eval-only needs --checkpoint PATH. Fix: pass a run folder runs/NAME or a policy file "
                        "runs/NAME/seed0/best.msgpack")
    given = given_flags(args)
    ignored = [name for name in given if name not in EVAL_FLAGS + EVAL_OVERRIDES]
    if ignored:
        raise DataError(f"{flag(ignored[0])} does not apply to --eval-only (the policy's own value is used). Fix: drop "
                        f"{' '.join(flag(n) for n in ignored)}")
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        policy_files = tuple((fold, k, path) for fold, files in enumerate(run_policy_files(checkpoint, "--checkpoint"))
                             for k, path in enumerate(files))
    else:
        payload = read_policy(str(checkpoint))
        policy_files = ((payload["fold"], payload["seed_index"], checkpoint),)
    fold_stats = {}
    for fold, _, path in policy_files:  # a fold's seeds share its training split's statistics
        fold_stats.setdefault(fold, read_policy(str(path))["feature_stats"])
    saved = read_policy(str(policy_files[0][2]))["config"]
    overrides = {name: getattr(args, name) for name in given if name in EVAL_OVERRIDES}
    # from the command line: what to play (the policy's own data and seed unless given), where, the overrides
    from_policy = ("data", "seed", "random_runs", "trials")
    keep = tuple(name for name in EVAL_FLAGS if name not in from_policy or name in given) + tuple(overrides) + RESUME_FLAGS
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
             if k not in keep and k in Args.__dataclass_fields__}
    args = dataclasses.replace(args, **dict(saved, market_weights=None))  # backtests play every market
    eval_name = f"eval_{args.eval_split}_{Path(args.data).stem}"
    default_dir = checkpoint / eval_name if checkpoint.is_dir() else checkpoint.parent / eval_name
    run_dir = default_dir if args.run_name is None else Path(args.out_dir) / args.run_name
    refuse_non_empty(run_dir, "or delete that folder")
    return RunSetup(args, run_dir, fold_stats, overrides, policy_files)


def new_run_setup(args: Args) -> RunSetup:
    if args.checkpoint:
        raise DataError("--checkpoint is only read by --eval-only (training starts from scratch or --init-from). Fix: add "
                        "--eval-only or drop --checkpoint")
    args = dataclasses.replace(args, run_name=args.run_name or f"ppo_{Path(args.data).stem}_{args.seed}_{int(time.time())}")
    run_dir = Path(args.out_dir) / args.run_name
    refuse_non_empty(run_dir, "or continue that run with --resume")
    return RunSetup(args, run_dir, None, {})


def run_eval_only(setup: RunSetup) -> dict:
    """Backtests the policy (or every fold's and seed's policy) of --checkpoint on --eval-split of its walk-forward fold
    into its own folder."""
    args = setup.args
    folds = sorted(setup.fold_stats)
    datasets, info = load_data(args, setup.fold_stats[folds[0]])
    if folds[-1] >= len(info["folds"]):
        raise DataError(f"{args.checkpoint}: a policy of walk-forward fold {folds[-1]}, the data and flags give "
                        f"{len(info['folds'])} fold(s). Fix: evaluate with the run's own --walk-forward and split flags")
    obs_dim = obs_size(args.window, datasets["train"].features.shape[-1], args.phase)
    fold_seeds = []
    for fold in folds:
        seeds = []
        for file_fold, seed_index, path in setup.policy_files:
            if file_fold == fold:
                network, params, norm, _ = load_policy(str(path), args, obs_dim)
                seeds.append((seed_index, params, norm, path))
        fold_seeds.append((fold, seeds))
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate(args, network, fold_seeds, info, env_params_from_args(args), setup.run_dir, args.eval_split,
                      extra={"checkpoint": str(args.checkpoint), "overrides": setup.overrides}, fold_stats=setup.fold_stats)
    print(summary_table(report))
    if setup.overrides:
        print("overrides of the policy's values: " + " ".join(f"{flag(k)} {v}" for k, v in setup.overrides.items()))
    print(verdict_lines(report))
    return report


class Trainer(NamedTuple):
    """What the chunk loop needs, built once per walk-forward fold (the compiled chunk is the run's)."""

    compiled: object  # the jitted, compiled chunk: (runner, train data) -> (runner, metrics)
    network: ActorCritic
    num_chunks: int
    steps_per_chunk: int  # env steps of one chunk, all seeds
    checkpoint: Path  # the fold's
    train_data: MarketData  # the fold's training split, a copy on every device


def start_fold(args: Args, fold_path: Path, fold: int, init, train_data: MarketData, mesh: Mesh, transfers: list):
    """The seed-stacked runner state of one fold (`init` jitted, `train_data` the fold's training split as loaded,
    `transfers` per seed the phase 1 (params, obs normaliser) it starts from, or None), placed on the mesh: new, or
    restored from the fold's checkpoint on --resume (a later fold that had not started yet starts new; fold 0 always
    has one); returns (runner, checkpoint bookkeeping)."""
    rngs = jax.vmap(jax.random.PRNGKey)(jnp.arange(args.num_seeds) + args.seed)
    # one init per seed, stacked: vmapping flax's orthogonal initialisers (batched QR) can deadlock XLA:CPU's thread pool
    runner = jax.tree.map(lambda *x: jnp.stack(x), *[init(key, transfer, train_data)
                                                     for key, transfer in zip(rngs, transfers)])
    ckpt = fold_path / "checkpoint.msgpack"
    extra = {"chunk": 0, "best_val": [-1e30] * args.num_seeds, "elapsed": 0.0}
    resumed = bool(args.resume) and (ckpt.is_file() or fold == 0)
    if resumed:
        runner, extra = load_checkpoint(ckpt, runner)
    runner = place(runner, runner_shardings(runner, mesh))
    if not resumed:
        save_checkpoint(ckpt, runner, extra)  # the state before training: a NaN in the first chunk leaves a good checkpoint
    return runner, extra


def compile_chunk(train_chunk, runner, train_data: MarketData, mesh: Mesh):
    """The chunk vmapped over seeds, compiled once for the run: every walk-forward fold's training split plays it."""
    shardings = runner_shardings(runner, mesh)
    # vmap over seeds; spmd_axis_name puts the seed axis on the mesh's "seed" devices inside the chunk too
    chunk_fn = jax.jit(jax.vmap(train_chunk, in_axes=(0, None), spmd_axis_name="seed"),
                       in_shardings=(shardings, NamedSharding(mesh, P())),
                       out_shardings=(shardings, NamedSharding(mesh, P("seed"))))
    return chunk_fn.lower(runner, train_data).compile()


SEED_TAGS = ("episodic_return", "episodic_length", "policy_loss", "value_loss", "entropy", "val_return")  # seeds/<tag>/seed<k>
LOSS_KEYS = ("policy_loss", "value_loss", "entropy")  # a NaN/inf in any of them stops the run


def mean_over_seeds(values: list) -> Optional[float]:
    """The mean of the seeds' values that are not None (None if all are)."""
    numbers = [value for value in values if value is not None]
    return float(np.mean(numbers)) if numbers else None


def seed_summaries(metrics: dict, markets: list) -> tuple[dict, list]:
    """Chunk metrics of every seed ([seeds, chunk_updates, ...] arrays) -> (the mean over seeds of each total and of
    each market's values, [per seed: its totals with its `markets`])."""
    per_seed = [chunk_summary({k: v[s] for k, v in metrics.items()}, markets) for s in range(len(metrics["policy_loss"]))]
    mean = {key: mean_over_seeds([totals[key] for totals, _ in per_seed]) for key in per_seed[0][0]}
    mean["markets"] = {market: {key: mean_over_seeds([by_market[market][key] for _, by_market in per_seed])
                                for key in per_seed[0][1][market]} for market in markets}
    return mean, [dict(totals, markets=by_market) for totals, by_market in per_seed]


def log_chunk(writer, metrics_file, row: dict, step_count: int) -> None:
    """TensorBoard scalars (the mean over seeds under the usual tags, each seed's under seeds/<tag>/seed<k>) and the
    metrics.jsonl line of one chunk."""
    for tag in ("episodic_return", "episodic_length", "learning_rate", "breaches"):
        writer.add_scalar(f"charts/{tag}", row[tag], step_count)
    for market, values in row["markets"].items():
        for tag, value in values.items():
            if value is not None:  # no episode of this market ended in the chunk: no return or length to log
                writer.add_scalar(f"charts/{market}/{tag}", value, step_count)
    for tag in ("dd_limit", "commission_scale"):
        if f"curriculum_{tag}" in row:
            writer.add_scalar(f"curriculum/{tag}", row[f"curriculum_{tag}"], step_count)
    for tag in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance"):
        writer.add_scalar(f"losses/{tag}", row[tag], step_count)
    if "val_return" in row:
        writer.add_scalar("eval/val_return", row["val_return"], step_count)
    for seed_index, seed_row in enumerate(row["seeds"]):
        for tag in SEED_TAGS:
            if tag in seed_row:
                writer.add_scalar(f"seeds/{tag}/seed{seed_index}", seed_row[tag], step_count)
    writer.add_scalar("perf/SPS", row["sps"], step_count)
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()


def mean_and_spread(row: dict, key: str, fmt: str) -> str:
    """A chunk value's mean over seeds, and with several seeds their range [min..max]."""
    values = [seed_row[key] for seed_row in row["seeds"]]
    text = format(row[key], fmt)
    return text + (f" [{min(values):{fmt}}..{max(values):{fmt}}]" if len(values) > 1 else "")


def progress_line(args: Args, row: dict, num_updates: int, eta: float) -> str:
    """The chunk's progress: means over seeds, with the range over seeds of the training and validation returns."""
    markets = "".join(f"  {mk} {v['episodic_return']:+.3f}" for mk,
                      v in row["markets"].items() if len(row["markets"]) > 1 and v["episodic_return"] is not None)
    return (f"update {row['update']:5d}/{num_updates}  steps {row['global_step']:>10,}  return "
            + mean_and_spread(row, "episodic_return", "+.3f") + markets
            + (f"  dd_limit {row['curriculum_dd_limit']:.0f}" if args.curriculum else "")
            + f"  pg {row['policy_loss']:+.4f}  v {row['value_loss']:.4f}  ent {row['entropy']:.3f}"
            + (f"  val {mean_and_spread(row, 'val_return', '+.4f')}" if "val_return" in row else "")
            + f"  SPS {row['sps']:,.0f}  elapsed {row['elapsed']:.0f}s  ETA {eta:.0f}s")


def diverged_seeds(metrics: dict) -> list[int]:
    """Indices of the seeds with a NaN/inf loss in the chunk."""
    finite = np.stack([np.isfinite(metrics[k]).reshape(len(metrics[k]), -1).all(1) for k in LOSS_KEYS]).all(0)
    return [int(k) for k in np.flatnonzero(~finite)]


def train_chunks(args: Args, run_dir: Path, trainer: Trainer, runner, extra: dict, validate, markets: list,
                 resume_dir: Path) -> tuple[str, object, dict]:
    """The chunk loop of one walk-forward fold (its folder `run_dir`: logs): train, log, validate every --eval-every
    chunks (each seed's best.msgpack by its validation return), checkpoint; stops early on NaN/inf losses in any seed,
    --stop-after (chunks of this fold) or Ctrl-C, naming `resume_dir` (the run folder) to continue. Returns (status,
    runner, extra)."""
    from tensorboardX import SummaryWriter

    main_process = jax.process_index() == 0  # multi-host: only process 0 writes files
    writer = SummaryWriter(str(run_dir), write_to_disk=main_process)
    if extra["chunk"] == 0:
        writer.add_text("hyperparameters", hparam_table(args))
    metrics_file = open(run_dir / "metrics.jsonl" if main_process else os.devnull, "a")
    interrupted = {"flag": False}
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    start_chunk, elapsed0, t_start = extra["chunk"], extra["elapsed"], time.time()
    status = "done"
    try:
        for chunk in range(start_chunk, trainer.num_chunks):
            tc = time.time()
            new_runner, metrics = trainer.compiled(runner, trainer.train_data)
            metrics = fetch(metrics)  # [seeds, chunk_updates]
            diverged = diverged_seeds(metrics)
            if diverged:
                status = "nan"
                which = ", ".join(f"seed {k} (--seed {args.seed + k})" for k in diverged)
                print(f"error: NaN/inf in the losses of {which} at chunk {chunk + 1}; stopping. The last good checkpoint "
                      f"is {trainer.checkpoint}. "
                      "Fix: start a new run with a lower --learning-rate, or check the data", file=sys.stderr, flush=True)
                break
            runner = new_runner
            sps = trainer.steps_per_chunk / (time.time() - tc)
            mean, seed_rows = seed_summaries(metrics, markets)
            update = (chunk + 1) * args.chunk_updates
            row = dict(chunk=chunk + 1, update=update, global_step=update * args.num_envs * args.num_steps, sps=sps, **mean,
                       seeds=seed_rows)
            if (chunk + 1) % args.eval_every == 0 or chunk + 1 == trainer.num_chunks:
                started = time.time()
                val_returns = validate(runner, extra["best_val"])
                extra["val_seconds"] = extra.get("val_seconds", 0.0) + time.time() - started
                extra["best_val"] = [max(best, new) for best, new in zip(extra["best_val"], val_returns)]
                row["val_return"] = float(np.mean(val_returns))
                for seed_row, val_return in zip(seed_rows, val_returns):
                    seed_row["val_return"] = val_return
            row["elapsed"] = elapsed0 + time.time() - t_start
            eta = (time.time() - t_start) / (chunk + 1 - start_chunk) * (trainer.num_chunks - chunk - 1)
            log_chunk(writer, metrics_file, row, row["global_step"])
            print(progress_line(args, row, trainer.num_chunks * args.chunk_updates, eta), flush=True)
            extra = dict(extra, chunk=chunk + 1, elapsed=row["elapsed"])
            save_checkpoint(trainer.checkpoint, runner, extra)
            if interrupted["flag"] or (args.stop_after is not None and chunk + 1 - start_chunk >= args.stop_after):
                status = "stopped"
                print(f"stopped after chunk {chunk + 1}; checkpoint saved. Continue with: python ppo_trader.py --resume "
                      f"{resume_dir}", flush=True)
                break
    finally:
        signal.signal(signal.SIGINT, old_handler)
        metrics_file.close()
        writer.close()
    return status, runner, extra


def fold_text(info: dict, fold: int) -> str:
    """A walk-forward fold's periods (of its first market), for the progress output."""
    ts, bounds = info["timestamps"][0], info["folds"][fold][0]
    day = lambda i: str(np.datetime64(int(ts[i]), "ns").astype("datetime64[m]"))  # noqa: E731
    return (f"fold {fold}/{len(info['folds'])} ({info['markets'][0]}): "
            + ", ".join(f"{name} {day(lo)}..{day(hi - 1)}" for name, (lo, hi) in bounds.items()))


def fold_policies(args: Args, fold_path: Path, runner, info: dict, obs_dim: int) -> list:
    """At the end of a fold's training: every seed's final.msgpack; returns what the test backtests play, per seed
    (seed index, its best.msgpack's params and obs normaliser, the file)."""
    policies = seed_policies(runner)
    for seed_index, (params, norm) in enumerate(policies):
        save_policy(policy_file(fold_path, seed_index, "final"), params, norm, args, info, seed_index)
    if jax.process_index() == 0:
        policies = [load_policy(str(policy_file(fold_path, k, "best")), args, obs_dim)[1:3] for k in range(args.num_seeds)]
    if jax.process_count() > 1:  # process 0's best policies to every process: all play the test split, process 0 writes
        policies = multihost_utils.broadcast_one_to_all(policies)
    return [(k, params, norm, policy_file(fold_path, k, "best")) for k, (params, norm) in enumerate(policies)]


def train_and_report(args: Args) -> dict:
    """The whole job: resolve the run (new, --resume or --eval-only), load data; per walk-forward fold (one by default)
    train every seed in chunks with the one compiled chunk (validation on the fold's validation block); backtest each
    fold's and seed's best.msgpack on the fold's test block."""
    setup = resume_setup(args) if args.resume else eval_only_setup(args) if args.eval_only else new_run_setup(args)
    if args.eval_only:
        return run_eval_only(setup)
    args, run_dir = setup.args, setup.run_dir
    mesh = make_mesh(args)  # a layout that cannot work fails before anything is written
    datasets, info = load_data(args)
    env_params = env_params_from_args(args)
    num_features = datasets["train"].features.shape[-1]
    obs_dim = obs_size(args.window, num_features, args.phase)
    num_folds = len(info["folds"])
    use_transfer = args.init_from and not args.resume
    transfers = [init_transfers(args, num_features, fold) if use_transfer else [None] * args.num_seeds
                 for fold in range(num_folds)]
    main_process = jax.process_index() == 0  # multi-host: only process 0 writes files
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and main_process:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    init, train_chunk, num_updates, network = make_train(args, env_params, datasets["train"], mesh)
    init = jax.jit(init)
    # every fold's validation block plays one compiled backtest
    val_play = make_split_backtest(env_params, backtest_steps(env_params, [b["val"] for bounds in info["folds"]
                                                                          for b in bounds]))
    compiled, fold_seeds = None, []
    for fold in range(num_folds):
        fold_datasets, fold_info = (datasets, info) if fold == 0 else fold_data(info, fold)
        fold_path = fold_dir(run_dir, fold, num_folds)
        if main_process:
            for seed_index in range(args.num_seeds):
                policy_file(fold_path, seed_index, "best").parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        runner, extra = start_fold(args, fold_path, fold, init, fold_datasets["train"], mesh, transfers[fold])
        train_data = place(fold_datasets["train"], NamedSharding(mesh, P()))  # market data: a copy on every device
        if compiled is None:
            compiled = compile_chunk(train_chunk, runner, train_data, mesh)
            print(f"run {run_dir}  updates {num_updates}  chunks {num_updates // args.chunk_updates}  env steps "
                  f"{num_updates * args.num_envs * args.num_steps:,} per seed"
                  + (f"  walk-forward folds {num_folds}" if num_folds > 1 else "")
                  + f"  devices {mesh.devices.size} ({mesh.shape['seed']} seed x {mesh.shape['env']} env, "
                  f"{jax.process_count()} process(es))  compile {time.time() - started:.1f}s", flush=True)
        if num_folds > 1:
            print(fold_text(info, fold), flush=True)
        trainer = Trainer(compiled, network, num_updates // args.chunk_updates,
                          args.chunk_updates * args.num_envs * args.num_steps * args.num_seeds,
                          fold_path / "checkpoint.msgpack", train_data)
        val_backtest = bind_split(val_play, fold_datasets["val"])

        def validate(runner, best_val: list, fold_path=fold_path, fold_info=fold_info, val_backtest=val_backtest) -> list:
            """Each seed's greedy validation return; a seed's new best is saved as its seed<k>/best.msgpack."""
            val_returns = []
            for seed_index, (params, norm) in enumerate(seed_policies(runner)):
                val_returns.append(validation_return(args, network, params, norm, env_params, val_backtest, seed_index))
                if val_returns[-1] > best_val[seed_index]:
                    save_policy(policy_file(fold_path, seed_index, "best"), params, norm, args, fold_info, seed_index)
            return val_returns

        status, runner, extra = train_chunks(args, fold_path, trainer, runner, extra, validate, info["markets"], run_dir)
        if status != "done":
            return {"status": status, "run_dir": str(run_dir)}
        print(f"validation backtests: {extra.get('val_seconds', 0.0):.1f}s of {extra['elapsed']:.1f}s of training",
              flush=True)
        fold_seeds.append((fold, fold_policies(args, fold_path, runner, fold_info, obs_dim)))
    report = evaluate(args, network, fold_seeds, info, env_params, run_dir, "test",
                      extra={"selected_by": "best validation return of each seed (seed<k>/best.msgpack)"})
    print(summary_table(report))
    print(verdict_lines(report))
    return report


SUMMARY_METRICS = ("total_return", "sharpe", "max_drawdown", "trades")
SUMMARY_POLICIES = ("policy", "sampled", "random", "buy_and_hold")


def table_line(label: str, values) -> str:
    """One line of the summary table: a label, then each value (or column name) right-aligned in 14 characters."""
    return f"{label:<44}" + "".join(f"{value:>14.4g}" if not isinstance(value, str) else f"{value:>14}" for value in values)


def verdict_lines(report: dict) -> str:
    """The end of the end-of-run print: each market's verdict (the rules are in README.md)."""
    return "\n".join(f"verdict, {report['split']} split, {market}: {sentence}"
                     for market, sentence in report["verdict"].items())


def summary_table(report: dict) -> str:
    """A short view of a report: per market, a line per (walk-forward fold and) seed and policy (total return, Sharpe,
    max drawdown, trades) and a line per policy with the median over the runs."""
    lines = []
    several_folds = len(report["folds"]) > 1
    over = "folds x seeds" if several_folds else "seeds"
    for market, by_policy in report["over_seeds"].items():
        lines.append(table_line(f"{report['split']} split, {market}", SUMMARY_METRICS))
        for row in report["seeds"]:
            run = f"fold {row['fold']} seed {row['seed']}" if several_folds else f"seed {row['seed']}"
            lines += [table_line(f"  {run} {name}", [row[market][name][metric] for metric in SUMMARY_METRICS])
                      for name in SUMMARY_POLICIES]
        lines += [table_line(f"  median over {over} {name}",
                             [by_policy[name][metric]["median"] for metric in SUMMARY_METRICS]) for name in SUMMARY_POLICIES]
    return "\n".join(lines)


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
        raise DataError(f"{detail}. Fix: see python ppo_trader.py --help") from None


def check_args(args: Args) -> None:
    """Flag combinations that cannot work, caught before any compilation."""
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "num_seeds", "window", "episode_bars",
                 "chunk_updates", "eval_every", "hidden", "contracts", "random_runs", "trials", "walk_forward"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)}). Fix: pass a positive value")
    if (args.num_envs * args.num_steps) % args.num_minibatches:
        raise DataError(f"--num-envs x --num-steps ({args.num_envs * args.num_steps}) is not divisible by --num-minibatches "
                        f"{args.num_minibatches}. Fix: change one of them")
    if args.no_entry_bars < 0 or args.sl_atr_mult <= 0 or args.tp_atr_mult <= 0 or args.slippage_ticks < 0:
        raise DataError("--no-entry-bars and --slippage-ticks must be >= 0, --sl-atr-mult and --tp-atr-mult > 0. Fix: pass "
                        "valid values")
    if args.dd_limit <= 0:
        raise DataError("--dd-limit must be > 0. Fix: pass the account's trailing drawdown in account currency")
    if args.phase not in (1, 2):
        raise DataError(f"--phase {args.phase}: must be 1 (entries) or 2 (entries and position management). Fix: pass "
                        "--phase 1 or --phase 2")
    if args.init_from and args.phase != 2:
        raise DataError("--init-from starts phase 2 from a phase 1 policy. Fix: add --phase 2")
    if args.trail_atr_mult <= 0 or not 0 < args.new_action_mass < 1:
        raise DataError("--trail-atr-mult must be > 0 and --new-action-mass in (0, 1). Fix: pass valid values")
    if args.curriculum and not (0 < args.curriculum_end <= 1 and args.curriculum_commission_start >= 0
                                and (args.curriculum_dd_start is None or args.curriculum_dd_start > 0)):
        raise DataError("--curriculum-end must be in (0, 1], --curriculum-commission-start >= 0 and --curriculum-dd-start > "
                        f"0 (got {args.curriculum_end}, "
                        f"{args.curriculum_commission_start}, {args.curriculum_dd_start}). Fix: e.g. --curriculum-end 0.8 "
                        "--curriculum-commission-start 0 --curriculum-dd-start 4000")
    if args.action_space not in ("discrete", "continuous") or args.max_contracts < 1:
        raise DataError(f"--action-space '{args.action_space}' must be discrete or continuous and --max-contracts >= 1 (got "
                        f"{args.max_contracts}). Fix: e.g. --action-space continuous --max-contracts 3")
    if args.action_space == "continuous" and args.phase != 1:
        raise DataError("--action-space continuous sets the position directly; it has no phase 2 (break-even, trailing). "
                        "Fix: drop --phase 2 or use --action-space discrete")
    if args.walk_forward_train_bars is not None and (args.walk_forward == 1 or args.walk_forward_train_bars < 1):
        raise DataError(f"--walk-forward-train-bars {args.walk_forward_train_bars} needs --walk-forward 2 or more and a "
                        "value >= 1. Fix: pass --walk-forward K, or drop --walk-forward-train-bars")
    if args.eval_split not in ("train", "val", "test"):
        raise DataError(f"--eval-split '{args.eval_split}' is not train, val or test. Fix: pick one of them")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        init_distributed(args)
        result = train_and_report(args)
    except DataError as e:
        print(f"ppo_trader: error: {e}", file=sys.stderr)
        return 2
    return 1 if result.get("status") == "nan" else 0


if __name__ == "__main__":
    sys.exit(main())
