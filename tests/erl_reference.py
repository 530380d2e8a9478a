"""NumPy reference implementation of the daily multi-stock env of ``erl_trader.py``.

Written from the exact spec (``erl_env_spec.md``) only, in float64 and plain Python loops, so that
the JAX environment can be checked against it step by step. Nothing here depends on anything but
NumPy.

Conventions
-----------
* ``data``: dict with ``open high low close`` [T, N] (forward-filled after listing, 0 before),
  ``valid`` [T, N] bool (a real price), ``feature_valid`` [T, N] bool (valid and full-look-back
  features: the stock may be bought, and shows as valid in the observation), ``investable`` [N]
  bool and ``features`` [T, N, F].
* ``params``: dict with ``window trading_days settlement_days max_positions max_holding_days
  coef_max coef_threshold cost_bps hurdle_pct inaction_penalty`` (short aliases W, D, S, K, H are
  used in the docstrings).
* ``I``: the investable columns in column order, ``n = len(I)``. Actions (``coef`` and ``target``,
  both [n]) are indexed in the order of ``I``; everything returned is indexed by column (0..N-1).
* Step ``k`` (0 .. D+S-1) decides at day ``t = start + k`` and plays day ``u = t + 1``; steps
  ``k < D`` are trading days, the others settlement days. Cash starts at 1.0.

Builders (``make_data``, ``default_params``) are provided for hand-made scenarios and
``random_episode`` for random play.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

OBS_EPS = 1e-6  # added to the window std in the instance normalisation
EXIT_DELIST, EXIT_TARGET, EXIT_MAX_HOLD, EXIT_END = "delist", "target", "max_hold", "end"


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def default_params(**overrides) -> dict:
    """Env params chosen for hand arithmetic: window 3, 5 trading + 2 settlement days, 2 slots,
    max holding 3 days, coef_max 100, threshold 50, 10 bps per side, hurdle 0.5 %, inaction
    penalty 0.01. Unknown keys raise ``KeyError``."""
    params = dict(
        window=3,
        trading_days=5,
        settlement_days=2,
        max_positions=2,
        max_holding_days=3,
        coef_max=100.0,
        coef_threshold=50.0,
        cost_bps=10.0,
        hurdle_pct=0.5,
        inaction_penalty=0.01,
    )
    _check_keys(overrides, params)
    params.update(overrides)
    return params


def _check_keys(overrides: dict, base: dict) -> None:
    """Raise if ``overrides`` names a key that ``base`` does not have (catches typos in tests)."""
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)}")


def default_features(T: int, N: int) -> np.ndarray:
    """Deterministic features [T, N, 2]: ``f0 = (t + 1) * (j + 1)`` (a trend) and
    ``f1 = (t * t + 3 * j) % 7`` (a wiggle), so windows are recognisable and not constant."""
    t = np.arange(T, dtype=np.float64)[:, None]
    j = np.arange(N, dtype=np.float64)[None, :]
    f0 = (t + 1.0) * (j + 1.0)
    f1 = np.mod(t * t + 3.0 * j, 7.0)
    return np.stack([f0, f1], axis=-1)


def make_data(open, high, low, close, valid=None, investable=None, features=None, feature_valid=None) -> dict:
    """Build a ``data`` dict from 2-D price lists [T][N].

    ``valid`` defaults to ``close > 0``, ``feature_valid`` to ``valid``, ``investable`` to all True, ``features`` to
    ``default_features(T, N)`` (F = 2). Checks shapes, that prices are > 0 and
    ``low <= open, close <= high`` on valid days (invalid days are not checked: they hold
    forward-filled or zero prices).
    """
    o, h, l, c = (np.asarray(x, dtype=np.float64) for x in (open, high, low, close))
    if o.ndim != 2 or not (h.shape == l.shape == c.shape == o.shape):
        raise ValueError("open/high/low/close must all be [T, N]")
    T, N = o.shape
    v = (c > 0) if valid is None else np.asarray(valid, dtype=bool)
    if v.shape != (T, N):
        raise ValueError("valid must be [T, N]")
    inv = np.ones(N, dtype=bool) if investable is None else np.asarray(investable, dtype=bool)
    if inv.shape != (N,):
        raise ValueError("investable must be [N]")
    feats = default_features(T, N) if features is None else np.asarray(features, dtype=np.float64)
    if feats.ndim != 3 or feats.shape[:2] != (T, N):
        raise ValueError("features must be [T, N, F]")
    if np.any(o[v] <= 0) or np.any(c[v] <= 0):
        raise ValueError("prices must be > 0 on valid days")
    if np.any(h[v] < np.maximum(o, c)[v]) or np.any(l[v] > np.minimum(o, c)[v]):
        raise ValueError("inconsistent OHLC on a valid day")
    fv = v if feature_valid is None else np.asarray(feature_valid, dtype=bool) & v
    if fv.shape != (T, N):
        raise ValueError("feature_valid must be [T, N]")
    return dict(open=o, high=h, low=l, close=c, valid=v, feature_valid=fv, investable=inv, features=feats)


def investable_columns(data: dict) -> np.ndarray:
    """``I``: indices of the investable columns, in column order."""
    return np.flatnonzero(np.asarray(data["investable"], dtype=bool))


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def split_decision_days(T: int, train_end: int, val_end: int, W: int) -> dict:
    """Decision days of each split, as lists. Days ``[0, train_end)`` are training, ``[train_end,
    val_end)`` validation, the rest test. Training decides from its first full window (day W - 1).
    The first W days of validation and test are an embargo: no decision, only read by the
    observations of the split's first decisions, so no validation observation reads a training day
    and W days separate the last training day from the first validation decision. Every split's last
    decision day is the day before its last day (a decision fills on the next day)."""
    ranges = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, T)}
    out = {}
    for name, (begin, end) in ranges.items():
        first = W - 1 if name == "train" else begin + W
        out[name] = [t for t in range(begin, end) if t >= first and t + 1 < end]
    return out


# --------------------------------------------------------------------------------------------------
# Observation
# --------------------------------------------------------------------------------------------------


def observation(data: dict, t: int, W: int) -> np.ndarray:
    """Observation at day ``t``: [W, N, F+1]. Channels 0..F-1 are the features of days
    t-W+1..t (oldest first), each column and feature z-scored over its own window with the
    population std plus ``OBS_EPS``; channel F is ``feature_valid`` over the same days as 0/1."""
    if t - W + 1 < 0:
        raise ValueError("need W days of history")
    x = np.asarray(data["features"], dtype=np.float64)[t - W + 1 : t + 1]  # [W, N, F]
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True)  # ddof 0
    z = (x - mean) / (std + OBS_EPS)
    valid = np.asarray(data["feature_valid"], dtype=np.float64)[t - W + 1 : t + 1, :, None]
    return np.concatenate([z, valid], axis=-1)


# --------------------------------------------------------------------------------------------------
# State and one step
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One held position."""

    col: int  # column index j in 0..N-1
    entry: float  # entry price (open of the entry day)
    entry_day: int
    coef: float  # the coefficient it was opened with (used in its exit reward)
    target: float  # target price = entry * (1 + target% / 100)
    shares: float


@dataclass(frozen=True)
class EnvState:
    """State before step ``k``: the decision day is ``t = start + k``; ``equity`` is marked at
    ``close[t]``; ``slots`` has K entries, each a ``Slot`` or ``None``."""

    start: int
    k: int
    cash: float
    equity: float
    slots: tuple

    @property
    def t(self) -> int:
        """Decision day of the next step."""
        return self.start + self.k


def reset_state(data: dict, params: dict, start: int) -> EnvState:
    """State at reset on day ``start``: all slots empty, cash = equity = 1.0. Checks that
    ``start >= W - 1`` and ``start + D + S <= T - 1``."""
    T = data["close"].shape[0]
    n_steps = params["trading_days"] + params["settlement_days"]
    if start < params["window"] - 1 or start + n_steps > T - 1:
        raise ValueError("start must satisfy W - 1 <= start and start + D + S <= T - 1")
    return EnvState(start=int(start), k=0, cash=1.0, equity=1.0, slots=(None,) * int(params["max_positions"]))


def held_columns(state: EnvState, N: int) -> np.ndarray:
    """[N] bool: which columns are held in some slot."""
    held = np.zeros(N, dtype=bool)
    for slot in state.slots:
        if slot is not None:
            held[slot.col] = True
    return held


def exit_reward(slot: Slot, exit_price: float, params: dict) -> float:
    """``(coef / coef_max) * (gain% - hurdle_pct) - 2 * cost_bps / 100`` with
    ``gain% = (exit / entry - 1) * 100``."""
    gain_pct = (exit_price / slot.entry - 1.0) * 100.0
    return (slot.coef / params["coef_max"]) * (gain_pct - params["hurdle_pct"]) - 2.0 * params["cost_bps"] / 100.0


def step_state(state: EnvState, coef, target, data: dict, params: dict):
    """One env step (decision day ``t``, played day ``u = t + 1``) with ``coef`` and ``target``
    [n] in the order of ``I``.

    Returns ``(new_state, reward, done, info)``; ``info`` has ``opened`` (column or -1),
    ``open`` (dict of the fill or None), ``exits`` (list of dicts: col, reason, entry, exit,
    coef, shares, proceeds, reward), ``n_exits``, ``exit_reward_sum`` and ``penalty``.
    """
    D, S = params["trading_days"], params["settlement_days"]
    K = params["max_positions"]
    if state.k >= D + S:
        raise ValueError("episode already done")
    I = investable_columns(data)
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if coef.shape != (len(I),) or target.shape != (len(I),):
        raise ValueError(f"coef and target must have shape [{len(I)}]")

    o, h, c, valid = data["open"], data["high"], data["close"], data["valid"]
    N = c.shape[1]
    k, t = state.k, state.t
    u = t + 1
    cost = params["cost_bps"] / 10_000.0
    slots = list(state.slots)
    cash = state.cash
    equity_prev = state.equity  # marked at close[t]

    # 1. OPEN (trading days only): only the best candidate is considered.
    opened, open_info = -1, None
    if k < D:
        held = held_columns(state, N)
        cand = [i for i, j in enumerate(I) if data["feature_valid"][t, j] and not held[j]]
        if cand:
            best = max(cand, key=lambda i: coef[i])  # max() keeps the first of equal coefs
            j_star = int(I[best])
            free = [s for s, slot in enumerate(slots) if slot is None]
            if coef[best] > params["coef_threshold"] and free and valid[u, j_star]:
                entry = float(o[u, j_star])
                alloc = min(cash, equity_prev / K)
                shares = alloc * (1.0 - cost) / entry
                cash -= alloc
                slots[free[0]] = Slot(
                    col=j_star,
                    entry=entry,
                    entry_day=u,
                    coef=float(coef[best]),
                    target=entry * (1.0 + target[best] / 100.0),
                    shares=shares,
                )
                opened = j_star
                open_info = dict(col=j_star, entry=entry, alloc=alloc, shares=shares)

    # 2. EXITS on day u: positions opened before u, then everything on the last step.
    last = k == D + S - 1
    exits = []
    for s, slot in enumerate(slots):
        if slot is None:
            continue
        j = slot.col
        reason, price = None, None
        if slot.entry_day < u:
            if not valid[u, j]:
                reason, price = EXIT_DELIST, c[u, j]
            elif h[u, j] >= slot.target:
                reason, price = EXIT_TARGET, max(slot.target, o[u, j])
            elif u - slot.entry_day >= params["max_holding_days"]:
                reason, price = EXIT_MAX_HOLD, c[u, j]
        if reason is None and last:
            reason, price = EXIT_END, c[u, j]
        if reason is None:
            continue
        price = float(price)
        proceeds = slot.shares * price * (1.0 - cost)
        cash += proceeds
        exits.append(
            dict(
                col=j,
                reason=reason,
                entry=slot.entry,
                exit=price,
                coef=slot.coef,
                shares=slot.shares,
                proceeds=proceeds,
                reward=exit_reward(slot, price, params),
            )
        )
        slots[s] = None

    # 3. REWARD: exit rewards minus the inaction penalty on trading days with nothing held.
    exit_reward_sum = float(sum(e["reward"] for e in exits))
    nothing_held = all(slot is None for slot in slots)
    penalty = params["inaction_penalty"] if (k < D and nothing_held) else 0.0
    reward = exit_reward_sum - penalty

    # 4. MARK at close[u].
    equity = cash + sum(slot.shares * c[u, slot.col] for slot in slots if slot is not None)
    new_state = replace(state, k=k + 1, cash=float(cash), equity=float(equity), slots=tuple(slots))
    info = dict(
        opened=opened, open=open_info, exits=exits, n_exits=len(exits), exit_reward_sum=exit_reward_sum, penalty=penalty
    )
    return new_state, float(reward), bool(last), info


# --------------------------------------------------------------------------------------------------
# Episode runners
# --------------------------------------------------------------------------------------------------


def _play(data: dict, params: dict, start: int, coefs, targets, log=None) -> dict:
    """Reset at ``start`` and step with row ``k`` of ``coefs`` / ``targets`` until done or the rows
    run out; collect the per-step outputs. ``log``, if a list, receives ``(state, info)`` per
    step (the state after the step)."""
    coefs = np.asarray(coefs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    n_inv = len(investable_columns(data))
    if coefs.ndim != 2 or coefs.shape[1] != n_inv or targets.shape != coefs.shape:
        raise ValueError(f"coefs and targets must be [n_steps, {n_inv}]")
    W, N = params["window"], data["close"].shape[1]
    state = reset_state(data, params, start)
    obs0 = observation(data, state.t, W)
    rec = {key: [] for key in ("obs", "reward", "done", "cash", "equity", "held", "n_exits", "exit_reward_sum", "opened")}
    for k in range(coefs.shape[0]):
        state, reward, done, info = step_state(state, coefs[k], targets[k], data, params)
        rec["obs"].append(observation(data, state.t, W))  # state.t is now the played day u
        rec["reward"].append(reward)
        rec["done"].append(done)
        rec["cash"].append(state.cash)
        rec["equity"].append(state.equity)
        rec["held"].append(held_columns(state, N))
        rec["n_exits"].append(info["n_exits"])
        rec["exit_reward_sum"].append(info["exit_reward_sum"])
        rec["opened"].append(info["opened"])
        if log is not None:
            log.append((state, info))
        if done:
            break
    return dict(
        obs0=obs0,
        obs=np.asarray(rec["obs"], dtype=np.float64).reshape((-1,) + obs0.shape),
        reward=np.asarray(rec["reward"], dtype=np.float64),
        done=np.asarray(rec["done"], dtype=bool),
        cash=np.asarray(rec["cash"], dtype=np.float64),
        equity=np.asarray(rec["equity"], dtype=np.float64),
        held=np.asarray(rec["held"], dtype=bool).reshape(-1, N),
        n_exits=np.asarray(rec["n_exits"], dtype=np.int64),
        exit_reward_sum=np.asarray(rec["exit_reward_sum"], dtype=np.float64),
        opened=np.asarray(rec["opened"], dtype=np.int64),
    )


def run_episode(data: dict, params: dict, start: int, coefs, targets) -> dict:
    """Reset at ``start`` and apply row ``k`` of ``coefs`` / ``targets`` ([n_steps, n], in the
    order of ``I``) at step ``k``, stopping at done (or when the rows run out).

    Returns numpy arrays: ``obs0`` [W, N, F+1] (at ``start``), ``obs`` [n, W, N, F+1] (at the
    played day ``u`` after each step), ``reward done cash equity n_exits exit_reward_sum`` [n],
    ``held`` [n, N] (columns held after the step) and ``opened`` [n] (column opened or -1)."""
    return _play(data, params, start, coefs, targets)


def run_episode_log(data: dict, params: dict, start: int, coefs, targets):
    """``run_episode`` plus the list of ``(state_after, info)`` per step, for consistency tests."""
    log = []
    out = _play(data, params, start, coefs, targets, log=log)
    return out, log


def random_actions(params: dict, n_steps: int, n_inv: int, rng: np.random.Generator):
    """Random ``coefs`` in [0, coef_max] and ``targets`` in [1, 10] %, both [n_steps, n_inv], on a
    0.25 grid (exact in float32, so a float32 env sees the same ties and threshold comparisons).
    Each step is, with probability 1/3, drawn below the threshold only (an idle day), otherwise
    from [0, coef_max], so most trading days have a best coef above the threshold."""
    top = np.where(rng.random(n_steps) < 1.0 / 3.0, params["coef_threshold"], params["coef_max"])
    coefs = rng.uniform(0.0, 1.0, (n_steps, n_inv)) * top[:, None]
    coefs = np.clip(np.round(coefs * 4.0) / 4.0, 0.0, params["coef_max"])
    targets = np.round(rng.uniform(1.0, 10.0, (n_steps, n_inv)) * 4.0) / 4.0
    return coefs, targets


def random_episode(data: dict, params: dict, start: int, rng: np.random.Generator) -> dict:
    """``run_episode`` with random actions (``random_actions``) for D + S steps; the returned
    dict also holds ``coefs`` and ``targets``."""
    n_steps = params["trading_days"] + params["settlement_days"]
    coefs, targets = random_actions(params, n_steps, len(investable_columns(data)), rng)
    out = run_episode(data, params, start, coefs, targets)
    out["coefs"], out["targets"] = coefs, targets
    return out
