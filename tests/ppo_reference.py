"""NumPy reference implementation of the intraday env of ``ppo_trader.py`` (phases 1 and 2).

Written from the exact spec (``ppo_env_spec.md``) only, in float64 and plain Python loops, so that
the JAX environment can be checked against it step by step. Nothing here depends on anything but
NumPy.

Conventions
-----------
* ``data``: dict of 1-D arrays over bars (``open high low close atr rth session_end bars_to_close
  hours_to_close``) plus ``features`` [T, F].
* ``spec``: dict with ``point_value``, ``tick_size``, ``commission``.
* ``params``: dict with ``window contracts sl_atr_mult tp_atr_mult slippage_ticks initial_balance
  dd_limit dd_lock_offset breach_penalty episode_bars no_entry_bars flatten_at_close phase
  trail_atr_mult``.
* Actions: 0 HOLD, 1 BUY, 2 SELL; phase 2 adds 3 MOVE_SL_TO_BE, 4 ENABLE_TRAIL, 5 DISABLE_TRAIL.
  An illegal action is treated as HOLD. With ``params["action_space"] == "continuous"`` an action
  is a float target position in [-1, 1] x ``max_contracts`` (``step_state_continuous``).
* A step decides at bar ``t`` and plays out bar ``u = t + 1``.

Builders (``make_data``, ``make_data_ohlc``, ``default_spec``, ``default_params``) are provided for
hand-made scenarios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOLD, BUY, SELL = 0, 1, 2
MOVE_SL_TO_BE, ENABLE_TRAIL, DISABLE_TRAIL = 3, 4, 5
N_ACTIONS = 3  # phase 1 (phase 2: 6)
N_POSITION_FEATURES = 7  # phase 1 (phase 2: 9, + break-even flag, trailing flag)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def default_spec(**overrides) -> dict:
    """An ES-like contract spec: point value 50, tick 0.25, commission 2 per contract per side."""
    spec = dict(point_value=50.0, tick_size=0.25, commission=2.0)
    _check_keys(overrides, spec)
    spec.update(overrides)
    return spec


def default_params(**overrides) -> dict:
    """Env params chosen for hand arithmetic (window 2, 1 contract, stop 1 ATR, target 2 ATR,
    1 tick slippage, balance 50000, drawdown limit 2000 locking at +100, 100-bar episodes)."""
    params = dict(
        window=2,
        contracts=1,
        sl_atr_mult=1.0,
        tp_atr_mult=2.0,
        slippage_ticks=1.0,
        initial_balance=50_000.0,
        dd_limit=2_000.0,
        dd_lock_offset=100.0,
        breach_penalty=1.0,
        episode_bars=100,
        no_entry_bars=1,
        flatten_at_close=True,
        phase=1,
        trail_atr_mult=1.0,
        action_space="discrete",
        max_contracts=1,
    )
    _check_keys(overrides, params)
    params.update(overrides)
    return params


def _check_keys(overrides: dict, base: dict) -> None:
    """Raise if ``overrides`` names a key that ``base`` does not have (catches typos in tests)."""
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)}")


def make_data(
    open, high, low, close, atr=2.0, rth=True, session_end=None, features=None, bar_hours=1.0, timestamps_hours=None
) -> dict:
    """Build a ``data`` dict from price lists.

    ``atr`` and ``rth`` may be scalars (broadcast) or per-bar lists; ``session_end`` defaults to
    all False. ``features`` defaults to ``features[t, f] = 10 * t + f`` with F = 2, so that window
    slices are easy to recognise. Timestamps are ``t * bar_hours`` hours unless
    ``timestamps_hours`` is given. ``bars_to_close[t]`` is the smallest k >= 0 with
    ``session_end[t + k]`` (T if none) and ``hours_to_close[t]`` the time to that bar in hours
    clipped to [0, 24] (24 if none). Checks that low <= open, close <= high.
    """
    o, h, l, c = (np.asarray(x, dtype=np.float64) for x in (open, high, low, close))
    T = o.shape[0]
    if not (h.shape == l.shape == c.shape == (T,)):
        raise ValueError("open/high/low/close must have the same length")
    if np.any(h < np.maximum(o, c)) or np.any(l > np.minimum(o, c)) or np.any(l > h):
        raise ValueError("inconsistent OHLC bars")
    atr_a = np.broadcast_to(np.asarray(atr, dtype=np.float64), (T,)).copy()
    if np.any(atr_a <= 0):
        raise ValueError("atr must be > 0")
    rth_a = np.broadcast_to(np.asarray(rth, dtype=bool), (T,)).copy()
    if session_end is None:
        se = np.zeros(T, dtype=bool)
    else:
        se = np.asarray(session_end, dtype=bool).copy()
        if se.shape != (T,):
            raise ValueError("session_end must have length T")
    if features is None:
        feats = 10.0 * np.arange(T, dtype=np.float64)[:, None] + np.arange(2, dtype=np.float64)[None, :]
    else:
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != T:
            raise ValueError("features must be [T, F]")
    if timestamps_hours is None:
        ts = np.arange(T, dtype=np.float64) * float(bar_hours)
    else:
        ts = np.asarray(timestamps_hours, dtype=np.float64)

    bars_to_close = np.full(T, T, dtype=np.int64)
    hours_to_close = np.full(T, 24.0, dtype=np.float64)
    next_end = None  # index of the nearest session-end bar at or after t
    for t in range(T - 1, -1, -1):
        if se[t]:
            next_end = t
        if next_end is not None:
            bars_to_close[t] = next_end - t
            hours_to_close[t] = np.clip(ts[next_end] - ts[t], 0.0, 24.0)

    return dict(
        open=o,
        high=h,
        low=l,
        close=c,
        atr=atr_a,
        rth=rth_a,
        session_end=se,
        features=feats,
        bars_to_close=bars_to_close,
        hours_to_close=hours_to_close,
    )


def make_data_ohlc(rows, **kwargs) -> dict:
    """``make_data`` from a list of ``(open, high, low, close)`` tuples, one per bar."""
    arr = np.asarray(rows, dtype=np.float64)
    return make_data(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], **kwargs)


# --------------------------------------------------------------------------------------------------
# Core rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvState:
    """Env state after a reset or a step; ``equity`` is marked to market at ``close[t]``."""

    t: int
    steps: int
    dir: int  # -1 short, 0 flat, +1 long
    entry: float  # 0 when flat
    sl: float  # 0 when flat
    tp: float  # 0 when flat
    bars_in_pos: int
    balance: float
    peak: float
    equity: float
    trail: bool = False  # phase 2: trailing stop on
    size: int = 0  # continuous action space: contracts held (0 flat)
    best: float = 0.0  # phase 2: highest high (long) / lowest low (short) since the entry bar; 0 flat


def round_tick(x: float, tick: float) -> float:
    """Round a price to the tick grid (numpy round-half-even, like ``jnp.round``)."""
    return float(np.round(x / tick) * tick)


def dd_threshold(peak: float, params: dict) -> float:
    """Trailing drawdown threshold: ``peak - dd_limit``, capped at ``initial_balance + dd_lock_offset``."""
    return min(peak - params["dd_limit"], params["initial_balance"] + params["dd_lock_offset"])


def legal_mask(state: EnvState, data: dict, params: dict) -> np.ndarray:
    """Action mask [3] at the decision bar ``state.t``: HOLD always; BUY/SELL only when flat,
    inside RTH and with ``bars_to_close[t] > no_entry_bars``. Phase 2, mask [6]: MOVE_SL_TO_BE in a
    position whose close[t] is beyond the entry (open profit) and whose stop is still short of the
    entry; ENABLE_TRAIL in a position with trailing off; DISABLE_TRAIL in one with trailing on."""
    t = state.t
    entry_ok = bool(state.dir == 0 and data["rth"][t] and data["bars_to_close"][t] > params["no_entry_bars"])
    if params.get("phase", 1) == 1:
        return np.array([True, entry_ok, entry_ok], dtype=bool)
    d = state.dir
    in_pos = d != 0
    be_ok = in_pos and (data["close"][t] - state.entry) * d > 0 and (state.entry - state.sl) * d > 0
    return np.array([True, entry_ok, entry_ok, be_ok, in_pos and not state.trail, in_pos and state.trail], dtype=bool)


def reset_state(data: dict, params: dict, start: int) -> EnvState:
    """State at reset on bar ``start``: flat, balance = peak = equity = initial_balance."""
    if start < params["window"] - 1:
        raise ValueError("start must be >= window - 1")
    ib = float(params["initial_balance"])
    return EnvState(t=int(start), steps=0, dir=0, entry=0.0, sl=0.0, tp=0.0, bars_in_pos=0, balance=ib, peak=ib, equity=ib)


def observation(state: EnvState, data: dict, params: dict) -> np.ndarray:
    """Observation at bar ``state.t``: the window of features (oldest first, row-major) followed by
    the 7 position features (dir, unrealised P&L, distance to stop, distance to target, all in ATR
    units; bars_in_pos / episode_bars; (equity - threshold) / dd_limit; hours_to_close / 24);
    phase 2 appends the break-even flag and the trailing flag."""
    t, W = state.t, params["window"]
    window = data["features"][t - W + 1 : t + 1, :].reshape(-1)
    close, atr = data["close"][t], data["atr"][t]
    d = state.dir
    held = d * state.size / params["max_contracts"] if params.get("action_space") == "continuous" else float(d)
    if d != 0:
        unreal = (close - state.entry) * d / atr
        to_sl = (close - state.sl) * d / atr
        to_tp = (state.tp - close) * d / atr
    else:
        unreal = to_sl = to_tp = 0.0
    pos = np.array(
        [
            held,
            unreal,
            to_sl,
            to_tp,
            state.bars_in_pos / params["episode_bars"],
            (state.equity - dd_threshold(state.peak, params)) / params["dd_limit"],
            data["hours_to_close"][t] / 24.0,
        ],
        dtype=np.float64,
    )
    if params.get("phase", 1) == 2:
        # break-even flag: the stop is at or beyond the entry; trailing flag
        be = d != 0 and (state.sl - state.entry) * d >= 0
        pos = np.concatenate([pos, [float(be), float(d != 0 and state.trail)]])
    return np.concatenate([window.astype(np.float64), pos])


def step_state(state: EnvState, action: int, data: dict, spec: dict, params: dict, end: int):
    """One env step from decision bar ``t`` with ``action``; bar ``u = t + 1`` plays out.

    Returns ``(new_state, reward, terminated, truncated, info)`` where ``info`` holds ``mask``
    (at ``t``, before the action), ``entry_price`` and ``exit_price`` (NaN when none this step).
    """
    if params.get("action_space") == "continuous":
        return step_state_continuous(state, float(action), data, spec, params, end)
    action = int(action)
    n_actions = 6 if params.get("phase", 1) == 2 else 3
    if not 0 <= action < n_actions:
        raise ValueError(f"action must be in [0, {n_actions}), got {action}")
    t = state.t
    u = t + 1
    if u >= end or u >= data["open"].shape[0]:
        raise ValueError("no bar left to play in the split")

    tick = spec["tick_size"]
    pv = spec["point_value"] * params["contracts"]
    slip = params["slippage_ticks"] * tick
    comm = spec["commission"] * params["contracts"]
    o, h, l, c = data["open"][u], data["high"][u], data["low"][u], data["close"][u]

    mask = legal_mask(state, data, params)
    a = action if mask[action] else HOLD

    d, entry, sl, tp = state.dir, state.entry, state.sl, state.tp
    bars_in_pos, balance = state.bars_in_pos, state.balance
    trail, best = state.trail, state.best
    entry_price = np.nan
    exit_price = np.nan

    # 0. Phase 2 management (only legal in a position), in force for bar u: break-even moves the
    #    stop to the entry; trailing on/off; with trailing on, the stop ratchets to
    #    best - d * trail_atr_mult * atr[t] (rounded to the tick) if that is tighter, never looser.
    if a == MOVE_SL_TO_BE:
        sl = entry
    elif a == ENABLE_TRAIL:
        trail = True
    elif a == DISABLE_TRAIL:
        trail = False
    if trail:
        level = round_tick(best - d * params["trail_atr_mult"] * data["atr"][t], tick)
        sl = max(sl, level) if d == 1 else min(sl, level)

    # 1. Entry at the open of u, slippage against the trader; levels from atr[t].
    if d == 0 and a in (BUY, SELL):
        d = 1 if a == BUY else -1
        entry = o + d * slip
        balance -= comm
        sl = round_tick(entry - d * params["sl_atr_mult"] * data["atr"][t], tick)
        tp = round_tick(entry + d * params["tp_atr_mult"] * data["atr"][t], tick)
        bars_in_pos = 0
        entry_price = entry
        best = o

    def close_position(px: float) -> None:
        """Book an exit at ``px`` (P&L minus one side of commission) and go flat."""
        nonlocal d, entry, sl, tp, bars_in_pos, balance, exit_price, trail, best
        balance += (px - entry) * d * pv - comm
        exit_price = px
        d, entry, sl, tp, bars_in_pos, trail, best = 0, 0.0, 0.0, 0.0, 0, False, 0.0

    # 2. Stop / target during bar u (stop checked first; gaps fill at the open).
    if d == 1:
        if o <= sl:
            close_position(o - slip)
        elif o >= tp:
            close_position(o)
        elif l <= sl:
            close_position(sl - slip)
        elif h >= tp:
            close_position(tp)
    elif d == -1:
        if o >= sl:
            close_position(o + slip)
        elif o <= tp:
            close_position(o)
        elif h >= sl:
            close_position(sl + slip)
        elif l <= tp:
            close_position(tp)

    # 3. Flatten at the session-end close.
    if d != 0 and params["flatten_at_close"] and data["session_end"][u]:
        close_position(c - d * slip)

    # 4. Bars in position; best price since entry (the entry bar included).
    if d != 0:
        bars_in_pos += 1
        best = max(best, h) if d == 1 else min(best, l)

    # 5. Mark to market, trailing drawdown, breach.
    equity = balance + (c - entry) * d * pv if d != 0 else balance
    peak = max(state.peak, equity)
    threshold = dd_threshold(peak, params)
    terminated = bool(equity <= threshold)
    if terminated:
        if d != 0:
            close_position(c - d * slip)
        equity = balance

    # 6. Reward.
    reward = (equity - state.equity) / params["dd_limit"]
    if terminated:
        reward -= params["breach_penalty"]

    # 7. Advance.
    steps = state.steps + 1
    truncated = bool((not terminated) and (steps >= params["episode_bars"] or u + 1 >= end))

    new_state = EnvState(
        t=u,
        steps=steps,
        dir=d,
        entry=float(entry),
        sl=float(sl),
        tp=float(tp),
        bars_in_pos=bars_in_pos,
        balance=float(balance),
        peak=float(peak),
        equity=float(equity),
        trail=bool(trail),
        best=float(best),
    )
    info = dict(mask=mask, entry_price=float(entry_price), exit_price=float(exit_price))
    return new_state, float(reward), terminated, truncated, info


def target_contracts(state: EnvState, action: float, data: dict, params: dict) -> int:
    """Continuous action space: target = round(clip(action, -1, 1) * max_contracts) signed contracts
    (half to even). Outside RTH or with ``bars_to_close[t] <= no_entry_bars`` the target is clamped
    between 0 and the current position: reduce or close only, never add or reverse."""
    t = state.t
    q = state.dir * state.size
    target = int(np.round(np.clip(action, -1.0, 1.0) * params["max_contracts"]))
    if not (data["rth"][t] and data["bars_to_close"][t] > params["no_entry_bars"]):
        target = int(np.clip(target, min(q, 0), max(q, 0)))
    return target


def step_state_continuous(state: EnvState, action: float, data: dict, spec: dict, params: dict, end: int):
    """One step with a continuous action (a target position, see ``target_contracts``).

    At the open of ``u``: a target of 0 or on the other side closes the whole position at
    ``open - d * slip``, then the new side opens; a smaller target on the same side closes the
    difference (entry, stop and target unchanged); a larger one adds contracts at ``open + d * slip``,
    the entry becomes the average entry price and stop/target are set again around it from
    ``atr[t]``. Commission per contract per side. Then the phase 1 rules on the whole position:
    stop/target in bar ``u``, session-end flatten, bars in position, mark to market, drawdown.
    ``info`` as ``step_state``, ``exit_price`` the last exit of the step."""
    t = state.t
    u = t + 1
    if u >= end or u >= data["open"].shape[0]:
        raise ValueError("no bar left to play in the split")
    tick = spec["tick_size"]
    pv = spec["point_value"]
    slip = params["slippage_ticks"] * tick
    comm = spec["commission"]
    o, h, l, c = data["open"][u], data["high"][u], data["low"][u], data["close"][u]
    mask = legal_mask(state, data, params)
    target = target_contracts(state, action, data, params)

    d, size, entry, sl, tp = state.dir, state.size, state.entry, state.sl, state.tp
    bars_in_pos, balance = state.bars_in_pos, state.balance
    entry_price = exit_price = np.nan

    def close_contracts(k: int, px: float) -> None:
        """Close ``k`` contracts at ``px``; flat when none is left."""
        nonlocal d, size, entry, sl, tp, bars_in_pos, balance, exit_price
        balance += ((px - entry) * d * pv - comm) * k
        exit_price = px
        size -= k
        if size == 0:
            d, entry, sl, tp, bars_in_pos = 0, 0.0, 0.0, 0.0, 0

    # 1. Move to the target at the open of u.
    if d != 0 and target * d <= 0:
        close_contracts(size, o - d * slip)
    elif d != 0 and abs(target) < size:
        close_contracts(size - abs(target), o - d * slip)
    add = abs(target) - size if target != 0 else 0
    if add > 0:
        d = 1 if target > 0 else -1
        px = o + d * slip
        entry = (size * entry + add * px) / (size + add)
        size += add
        balance -= comm * add
        sl = round_tick(entry - d * params["sl_atr_mult"] * data["atr"][t], tick)
        tp = round_tick(entry + d * params["tp_atr_mult"] * data["atr"][t], tick)
        entry_price = px

    # 2. Stop / target during bar u on the whole position (stop first; gaps fill at the open).
    if d == 1:
        if o <= sl:
            close_contracts(size, o - slip)
        elif o >= tp:
            close_contracts(size, o)
        elif l <= sl:
            close_contracts(size, sl - slip)
        elif h >= tp:
            close_contracts(size, tp)
    elif d == -1:
        if o >= sl:
            close_contracts(size, o + slip)
        elif o <= tp:
            close_contracts(size, o)
        elif h >= sl:
            close_contracts(size, sl + slip)
        elif l <= tp:
            close_contracts(size, tp)

    # 3. Flatten at the session-end close.
    if d != 0 and params["flatten_at_close"] and data["session_end"][u]:
        close_contracts(size, c - d * slip)

    # 4.-6. Bars in position, mark to market, drawdown, reward.
    if d != 0:
        bars_in_pos += 1
    equity = balance + (c - entry) * d * pv * size if d != 0 else balance
    peak = max(state.peak, equity)
    terminated = bool(equity <= dd_threshold(peak, params))
    if terminated:
        if d != 0:
            close_contracts(size, c - d * slip)
        equity = balance
    reward = (equity - state.equity) / params["dd_limit"]
    if terminated:
        reward -= params["breach_penalty"]
    steps = state.steps + 1
    truncated = bool((not terminated) and (steps >= params["episode_bars"] or u + 1 >= end))
    new_state = EnvState(
        t=u,
        steps=steps,
        dir=d,
        entry=float(entry),
        sl=float(sl),
        tp=float(tp),
        bars_in_pos=bars_in_pos,
        balance=float(balance),
        peak=float(peak),
        equity=float(equity),
        size=int(size),
    )
    info = dict(mask=mask, entry_price=float(entry_price), exit_price=float(exit_price))
    return new_state, float(reward), terminated, truncated, info


# --------------------------------------------------------------------------------------------------
# Env wrapper and episode runners
# --------------------------------------------------------------------------------------------------


class RefEnv:
    """Small stateful wrapper: ``reset(start) -> obs`` and ``step(action) -> (obs, reward,
    terminated, truncated, info)``. No auto-reset; the obs returned is the one at the new bar."""

    def __init__(self, data: dict, spec: dict, params: dict, end: int):
        """Keep the market ``data``, ``spec``, ``params`` and the exclusive split ``end``."""
        if end > data["open"].shape[0]:
            raise ValueError("end must be <= T")
        self.data, self.spec, self.params, self.end = data, spec, params, int(end)
        self.state: EnvState | None = None

    def reset(self, start: int) -> np.ndarray:
        """Reset at bar ``start`` and return the observation there."""
        if not (start + 1 < self.end):
            raise ValueError("need at least one bar after start inside the split")
        self.state = reset_state(self.data, self.params, start)
        return observation(self.state, self.data, self.params)

    def mask(self) -> np.ndarray:
        """Legal-action mask at the current decision bar."""
        return legal_mask(self.state, self.data, self.params)

    def step(self, action: int):
        """Apply one action; returns ``(obs, reward, terminated, truncated, info)``."""
        self.state, reward, term, trunc, info = step_state(self.state, action, self.data, self.spec, self.params, self.end)
        obs = observation(self.state, self.data, self.params)
        return obs, reward, term, trunc, info


def _play(data, spec, params, start, end, choose, max_steps, env_holder=None) -> dict:
    """Reset at ``start`` and step with ``choose(step_index, mask)`` until termination, truncation
    or ``max_steps`` steps; collect the per-step outputs into numpy arrays."""
    env = RefEnv(data, spec, params, end)
    if env_holder is not None:
        env_holder["env"] = env
    obs0 = env.reset(start)
    rec = {
        k: []
        for k in (
            "obs",
            "reward",
            "terminated",
            "truncated",
            "mask",
            "balance",
            "equity",
            "dir",
            "exit_price",
            "entry_price",
            "sl",
            "actions",
            "size",
        )
    }
    for i in range(max_steps):
        mask = env.mask()
        action = choose(i, mask)
        obs, reward, term, trunc, info = env.step(action)
        s = env.state
        rec["obs"].append(obs)
        rec["reward"].append(reward)
        rec["terminated"].append(term)
        rec["truncated"].append(trunc)
        rec["mask"].append(info["mask"])
        rec["balance"].append(s.balance)
        rec["equity"].append(s.equity)
        rec["dir"].append(s.dir)
        rec["exit_price"].append(info["exit_price"])
        rec["entry_price"].append(info["entry_price"])
        rec["sl"].append(s.sl)
        rec["actions"].append(action)
        rec["size"].append(s.size)
        if term or trunc:
            break
    D = obs0.shape[0]
    return dict(
        obs0=obs0,
        obs=np.asarray(rec["obs"], dtype=np.float64).reshape(-1, D),
        reward=np.asarray(rec["reward"], dtype=np.float64),
        terminated=np.asarray(rec["terminated"], dtype=bool),
        truncated=np.asarray(rec["truncated"], dtype=bool),
        mask=np.asarray(rec["mask"], dtype=bool).reshape(-1, 6 if params.get("phase", 1) == 2 else 3),
        balance=np.asarray(rec["balance"], dtype=np.float64),
        equity=np.asarray(rec["equity"], dtype=np.float64),
        dir=np.asarray(rec["dir"], dtype=np.int64),
        exit_price=np.asarray(rec["exit_price"], dtype=np.float64),
        entry_price=np.asarray(rec["entry_price"], dtype=np.float64),
        sl=np.asarray(rec["sl"], dtype=np.float64),
        actions=np.asarray(rec["actions"], dtype=np.float64 if params.get("action_space") == "continuous" else np.int64),
        size=np.asarray(rec["size"], dtype=np.int64),
    )


def run_episode(data: dict, spec: dict, params: dict, start: int, end: int, actions) -> dict:
    """Reset at ``start`` and apply ``actions`` one per step, stopping early when terminated or
    truncated. Returns numpy arrays: ``obs0`` [D], ``obs`` [n, D] (pre-reset obs at the new bar),
    ``reward terminated truncated balance equity dir exit_price entry_price sl`` [n] and ``mask`` [n, A]
    (at the decision bar, before the action), n <= len(actions)."""
    actions = np.asarray(actions, dtype=np.float64 if params.get("action_space") == "continuous" else np.int64).reshape(-1)
    out = _play(data, spec, params, start, end, lambda i, mask: actions[i], len(actions))
    del out["actions"]
    return out


def random_legal_episode(
    data: dict, spec: dict, params: dict, start: int, end: int, n_steps: int, rng: np.random.Generator
) -> dict:
    """Like ``run_episode`` but each action is drawn uniformly from the legal ones at that step
    (mask recomputed every step), for at most ``n_steps`` steps. Adds ``actions`` [n]."""

    def choose(i, mask):
        """Uniform draw among the legal actions."""
        return int(rng.choice(np.flatnonzero(mask)))

    return _play(data, spec, params, start, end, choose, int(n_steps))


def random_target_episode(
    data: dict, spec: dict, params: dict, start: int, end: int, n_steps: int, rng: np.random.Generator
) -> dict:
    """Continuous action space: like ``random_legal_episode`` with random target positions. Each
    action is (k + jitter) / max_contracts for a uniform integer k in [-max_contracts, max_contracts]
    and a jitter in [-0.4, 0.4] (clipped to [-1, 1], stored as float32 values), so the rounding never
    sits at a half; half the time the target repeats the current position. Adds ``actions`` [n]."""
    n = params["max_contracts"]

    def choose(i, mask):
        """A random target (or the current one), as a float32 value."""
        k = int(rng.integers(-n, n + 1))
        return float(np.float32(np.clip((k + rng.uniform(-0.4, 0.4)) / n, -1.0, 1.0)))

    env_holder = {}

    def choose_or_hold(i, mask):
        """Half the time keep the current position (so positions live long enough to hit levels)."""
        s = env_holder["env"].state
        if rng.random() < 0.5:
            return float(np.float32(s.dir * s.size / n))
        return choose(i, mask)

    return _play(data, spec, params, start, end, choose_or_hold, int(n_steps), env_holder)
