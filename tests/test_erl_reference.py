"""Hand-computed scenarios for the daily multi-stock env of ``erl_trader.py``.

Each ``scenario_xxx(run)`` takes a runner with the signature of
``erl_reference.run_episode(data, params, start, coefs, targets) -> dict`` and asserts on its
outputs only (obs0, obs, reward, done, cash, equity, held, n_exits, exit_reward_sum, opened), so the
same scenarios can be run on the JAX env through an adapter. Floats are compared at rtol 1e-5,
atol 1e-6 (the JAX side is float32); no scenario sits on an exact float boundary except
``coef == coef_threshold`` (50.0, exact in float32).

Unless a scenario says otherwise: T = 10 days, start = 2, ``default_params()`` (W 3, D 5, S 2, K 2,
H 3, coef_max 100, threshold 50, 10 bps per side, hurdle 0.5 %, penalty 0.01), so step k decides at
t = 2 + k and plays u = 3 + k; steps 0..4 trade, 5..6 settle, step 6 closes everything at close[9].
Every stock is quiet at open 100, high 101, low 99, close 100 unless changed; coefs default to 0
(nothing opens) and targets to 5 % (target price 105 on an entry at 100).

The standard entry: coef 80 at k = 0, fill at open[3] = 100 with alloc = min(1, 1 / 2) = 0.5:
with costs (c = 0.001) shares = 0.5 * 0.999 / 100 = 0.004995, cash 0.5, equity at close 100 =
0.5 + 0.4995 = 0.9995; without costs shares = 0.005, equity 1.0.
"""

import numpy as np
import pytest

from erl_reference import default_params, investable_columns, make_data, random_episode, run_episode, run_episode_log

START = 2
T_, F_ = True, False


def close(actual, expected):
    """Float comparison used throughout (float32-friendly tolerances)."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=1e-5, atol=1e-6
    )


def same(actual, expected):
    """Exact comparison for bool / int outputs."""
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def quiet(T=10, N=1):
    """Price arrays [T, N] of a quiet market: open 100, high 101, low 99, close 100."""
    return (np.full((T, N), 100.0), np.full((T, N), 101.0), np.full((T, N), 99.0), np.full((T, N), 100.0))


def bar(prices, day, col, ohlc):
    """Set day ``day`` of column ``col`` to ``(open, high, low, close)`` in the ``prices`` tuple."""
    for arr, x in zip(prices, ohlc):
        arr[day, col] = x


def actions(n_inv, rows, n_steps=7, target=5.0):
    """``coefs`` [n_steps, n_inv] all 0 except ``rows = {k: [coef per investable stock]}``, and
    ``targets`` all ``target`` percent."""
    coefs = np.zeros((n_steps, n_inv))
    for k, row in rows.items():
        coefs[k] = row
    return coefs, np.full((n_steps, n_inv), float(target))


NO_FRICTION = dict(cost_bps=0.0, hurdle_pct=0.0)


# --------------------------------------------------------------------------------------------------
# Exits
# --------------------------------------------------------------------------------------------------


def scenario_target_hit(run):
    """A later day's high reaches the target: sell at the target; the exit reward uses the coef
    the position was opened with (80), not the later coef of the held stock (10)."""
    p = quiet()
    bar(p, 4, 0, (101, 106, 100, 105.5))  # high 106 >= 105, open 101 -> exit 105
    data = make_data(*p)
    coefs, targets = actions(1, {0: [80], 1: [10]})
    out = run(data, default_params(), START, coefs, targets)
    same(out["done"], [F_] * 6 + [T_])
    same(out["opened"], [0, -1, -1, -1, -1, -1, -1])
    same(out["held"], [[T_]] + [[F_]] * 6)
    same(out["n_exits"], [0, 1, 0, 0, 0, 0, 0])
    # 0.8 * (5 - 0.5) - 2 * 10 / 100 = 3.6 - 0.2 = 3.4
    close(out["exit_reward_sum"], [0, 3.4, 0, 0, 0, 0, 0])
    # nothing held after k = 1..4 (trading days) -> -0.01; settlement days no penalty
    close(out["reward"], [0, 3.39, -0.01, -0.01, -0.01, 0, 0])
    # 0.5 + 0.004995 * 105 * 0.999 = 0.5 + 0.523950525
    close(out["cash"], [0.5] + [1.023950525] * 6)
    close(out["equity"], [0.9995] + [1.023950525] * 6)


def scenario_target_gap_up(run):
    """The day opens above the target: sell at the open."""
    p = quiet()
    bar(p, 4, 0, (107, 108, 106.5, 107.5))  # open 107 > target 105 -> exit 107
    data = make_data(*p)
    coefs, targets = actions(1, {0: [80]})
    out = run(data, default_params(), START, coefs, targets)
    same(out["n_exits"], [0, 1, 0, 0, 0, 0, 0])
    # 0.8 * (7 - 0.5) - 0.2 = 5.2 - 0.2 = 5.0; minus the inaction penalty 0.01
    close(out["exit_reward_sum"], [0, 5.0, 0, 0, 0, 0, 0])
    close(out["reward"], [0, 4.99, -0.01, -0.01, -0.01, 0, 0])
    # 0.5 + 0.004995 * 107 * 0.999 = 0.5 + 0.533930535
    close(out["cash"], [0.5] + [1.033930535] * 6)
    close(out["equity"], [0.9995] + [1.033930535] * 6)


def scenario_max_holding(run):
    """Held H days (entry day 3, H = 3): sold at the close of day 6; with H = 2 at day 5's close;
    a target hit on the max-holding day wins (target before max holding)."""
    p = quiet()
    bar(p, 6, 0, (101, 102.5, 100.5, 102))  # u - entry = 3 >= 3 -> exit at close 102
    data = make_data(*p)
    coefs, targets = actions(1, {0: [80]})
    out = run(data, default_params(), START, coefs, targets)
    same(out["held"], [[T_]] * 3 + [[F_]] * 4)
    same(out["n_exits"], [0, 0, 0, 1, 0, 0, 0])
    # 0.8 * (2 - 0.5) - 0.2 = 1.0; k = 3 is a trading day with nothing held -> 0.99
    close(out["exit_reward_sum"], [0, 0, 0, 1.0, 0, 0, 0])
    close(out["reward"], [0, 0, 0, 0.99, -0.01, 0, 0])
    # 0.5 + 0.004995 * 102 * 0.999 = 0.5 + 0.50898051
    close(out["cash"], [0.5] * 3 + [1.00898051] * 4)
    close(out["equity"], [0.9995] * 3 + [1.00898051] * 4)

    out = run(data, default_params(max_holding_days=2), START, coefs, targets)
    same(out["n_exits"], [0, 0, 1, 0, 0, 0, 0])
    # exit at close[5] = 100: 0.8 * (0 - 0.5) - 0.2 = -0.6; -0.61 with the penalty
    close(out["reward"], [0, 0, -0.61, -0.01, -0.01, 0, 0])
    # 0.5 + 0.4995 * 0.999 = 0.9990005
    close(out["cash"], [0.5, 0.5] + [0.9990005] * 5)

    p = quiet()
    bar(p, 6, 0, (101, 106, 100.5, 102))  # day 6: target 105 reached and 3 days held
    out = run(make_data(*p), default_params(), START, coefs, targets)
    same(out["n_exits"], [0, 0, 0, 1, 0, 0, 0])
    close(out["exit_reward_sum"], [0, 0, 0, 3.4, 0, 0, 0])  # at 105, not at close 102
    close(out["cash"][-1], 1.023950525)


def scenario_delisting(run):
    """Invalid from day 5 on: sold at the last valid close (98, carried forward) even though the
    carried high (106) is above the target; an invalid stock is never a candidate."""
    p = quiet()
    bar(p, 4, 0, (100, 100.5, 97.5, 98))
    for day in range(5, 10):
        bar(p, day, 0, (98, 98, 98, 98))
    p[1][5, 0] = 106.0  # garbage high on the delisting day
    valid = np.ones((10, 1), dtype=bool)
    valid[5:, 0] = False
    data = make_data(*p, valid=valid)
    coefs, targets = actions(1, {0: [80], 3: [90], 4: [90]})
    out = run(data, default_params(), START, coefs, targets)
    same(out["opened"], [0, -1, -1, -1, -1, -1, -1])  # k = 3, 4: invalid at t -> no candidate
    same(out["n_exits"], [0, 0, 1, 0, 0, 0, 0])
    # 0.8 * (-2 - 0.5) - 0.2 = -2.2; -2.21 with the penalty
    close(out["exit_reward_sum"], [0, 0, -2.2, 0, 0, 0, 0])
    close(out["reward"], [0, 0, -2.21, -0.01, -0.01, 0, 0])
    # k = 1: 0.5 + 0.004995 * 98 = 0.98951; k = 2: 0.5 + 0.48951 * 0.999 = 0.98902049
    close(out["equity"], [0.9995, 0.98951] + [0.98902049] * 5)
    close(out["cash"], [0.5, 0.5] + [0.98902049] * 5)


def scenario_settlement_and_end(run):
    """Settlement days open nothing (stock 1 is a valid candidate with a free slot and coef 90);
    the last step sells everything at close[9]. With S = 0 a position opened on the last step is
    bought at the open and sold at the close of the same day; the runner stops at done."""
    p = quiet(N=2)
    bar(p, 9, 0, (103, 104.5, 102.5, 104))
    data = make_data(*p)
    coefs, targets = actions(2, {0: [80, 0], 5: [0, 90], 6: [0, 90]})
    out = run(data, default_params(max_holding_days=10), START, coefs, targets)
    same(out["done"], [F_] * 6 + [T_])
    same(out["opened"], [0, -1, -1, -1, -1, -1, -1])
    same(out["held"], [[T_, F_]] * 6 + [[F_, F_]])
    same(out["n_exits"], [0] * 6 + [1])
    # 0.8 * (4 - 0.5) - 0.2 = 2.6; settlement: no penalty
    close(out["reward"], [0] * 6 + [2.6])
    # 0.5 + 0.004995 * 104 * 0.999 = 0.5 + 0.51896052
    close(out["cash"], [0.5] * 6 + [1.01896052])
    close(out["equity"], [0.9995] * 6 + [1.01896052])

    p = quiet()
    bar(p, 5, 0, (100, 101.5, 99.5, 101))
    coefs, targets = actions(1, {2: [80]}, n_steps=5)  # 5 rows, the episode has 3 steps
    out = run(make_data(*p), default_params(trading_days=3, settlement_days=0), START, coefs, targets)
    assert len(out["reward"]) == 3
    same(out["done"], [F_, F_, T_])
    same(out["opened"], [-1, -1, 0])
    same(out["held"], [[F_], [F_], [F_]])
    same(out["n_exits"], [0, 0, 1])
    # 0.8 * (1 - 0.5) - 0.2 = 0.2; a trading day ending with nothing held -> 0.19
    close(out["exit_reward_sum"], [0, 0, 0.2])
    close(out["reward"], [-0.01, -0.01, 0.19])
    # 0.5 + 0.004995 * 101 * 0.999 = 0.5 + 0.503990505
    close(out["cash"], [1.0, 1.0, 1.003990505])
    close(out["equity"], [1.0, 1.0, 1.003990505])


def scenario_opened_today_not_checked(run):
    """The entry day's high (110) is above the target but a position is first checked the next
    day; with H = 1 the next day's close sells it."""
    p = quiet()
    bar(p, 3, 0, (100, 110, 99, 104))
    bar(p, 4, 0, (104, 106, 103, 105.5))  # target 105 reached the day after entry
    params = default_params(**NO_FRICTION)
    coefs, targets = actions(1, {0: [80]})
    out = run(make_data(*p), params, START, coefs, targets)
    same(out["held"], [[T_]] + [[F_]] * 6)
    same(out["n_exits"], [0, 1, 0, 0, 0, 0, 0])
    # 0.8 * 5 = 4.0
    close(out["reward"], [0, 3.99, -0.01, -0.01, -0.01, 0, 0])
    # shares 0.005: equity 0.5 + 0.005 * 104 = 1.02; cash 0.5 + 0.005 * 105 = 1.025
    close(out["equity"], [1.02] + [1.025] * 6)
    close(out["cash"], [0.5] + [1.025] * 6)

    p = quiet()
    bar(p, 3, 0, (100, 110, 99, 104))
    bar(p, 4, 0, (104, 104.5, 103, 104))
    out = run(make_data(*p), default_params(max_holding_days=1, **NO_FRICTION), START, coefs, targets)
    same(out["n_exits"], [0, 1, 0, 0, 0, 0, 0])
    # held 1 day -> close[4] = 104: 0.8 * 4 = 3.2; cash 0.5 + 0.005 * 104 = 1.02
    close(out["exit_reward_sum"], [0, 3.2, 0, 0, 0, 0, 0])
    close(out["cash"], [0.5] + [1.02] * 6)


# --------------------------------------------------------------------------------------------------
# Opening rules
# --------------------------------------------------------------------------------------------------


def scenario_coef_threshold(run):
    """Opens only when the best coef is strictly above the threshold (50 does not, 50.5 does);
    the exit reward scales with that coef; a higher threshold blocks it."""
    p = quiet(N=2)
    bar(p, 5, 1, (100, 106, 99.5, 105.5))  # stock 1 reaches its target 105 on day 5
    data = make_data(*p)
    coefs, targets = actions(2, {0: [50, 30], 1: [30, 50.5]})
    out = run(data, default_params(**NO_FRICTION), START, coefs, targets)
    same(out["opened"], [-1, 1, -1, -1, -1, -1, -1])
    same(out["held"], [[F_, F_], [F_, T_]] + [[F_, F_]] * 5)
    # 0.505 * 5 = 2.525; -0.01 when nothing is held on a trading day
    close(out["exit_reward_sum"], [0, 0, 2.525, 0, 0, 0, 0])
    close(out["reward"], [-0.01, 0, 2.515, -0.01, -0.01, 0, 0])
    # shares 0.5 / 100 = 0.005; cash 0.5 + 0.005 * 105 = 1.025
    close(out["cash"], [1.0, 0.5] + [1.025] * 5)
    close(out["equity"], [1.0, 1.0] + [1.025] * 5)

    out = run(data, default_params(coef_threshold=60.0, **NO_FRICTION), START, coefs, targets)
    same(out["opened"], [-1] * 7)
    close(out["reward"], [-0.01] * 5 + [0, 0])
    close(out["cash"], [1.0] * 7)


def scenario_free_slot(run):
    """K = 2 slots full: stock 2 (coef 90) does not open, even on the day a held stock exits
    (opening comes before the exits); it opens the next day in the freed slot. Two positions
    exit together at the end."""
    p = quiet(N=3)
    bar(p, 5, 0, (100, 106, 99.5, 105.5))  # stock 0 (entered day 3) hits 105 on day 5
    bar(p, 9, 1, (100, 102.5, 99.5, 102))
    bar(p, 9, 2, (100, 100.5, 97.5, 98))
    data = make_data(*p)
    coefs, targets = actions(3, {0: [90, 0, 0], 1: [95, 80, 0], 2: [95, 95, 90], 3: [0, 0, 90]})
    out = run(data, default_params(max_holding_days=10, **NO_FRICTION), START, coefs, targets)
    same(out["opened"], [0, 1, -1, 2, -1, -1, -1])
    same(out["held"], [[T_, F_, F_], [T_, T_, F_], [F_, T_, F_], [F_, T_, T_], [F_, T_, T_], [F_, T_, T_], [F_, F_, F_]])
    same(out["n_exits"], [0, 0, 1, 0, 0, 0, 2])
    # k = 2: 0.9 * 5 = 4.5; k = 6: 0.8 * 2 + 0.9 * (-2) = 1.6 - 1.8 = -0.2
    close(out["exit_reward_sum"], [0, 0, 4.5, 0, 0, 0, -0.2])
    close(out["reward"], [0, 0, 4.5, 0, 0, 0, -0.2])
    # k0: alloc 0.5 -> cash 0.5; k1: alloc min(0.5, 1.0 / 2) = 0.5 -> cash 0;
    # k2: + 0.005 * 105 = 0.525; k3: alloc min(0.525, 1.025 / 2 = 0.5125) -> cash 0.0125,
    # shares 0.005125; k6: 0.0125 + 0.005 * 102 + 0.005125 * 98 = 0.0125 + 0.51 + 0.50225
    close(out["cash"], [0.5, 0.0, 0.525, 0.0125, 0.0125, 0.0125, 1.02475])
    close(out["equity"], [1.0, 1.0, 1.025, 1.025, 1.025, 1.025, 1.02475])


def scenario_already_held(run):
    """The highest coef belongs to a held stock: the best non-held candidate is used (and only it:
    40 <= 50 opens nothing); equal coefs go to the first in investable order."""
    data = make_data(*quiet(N=3))
    coefs, targets = actions(3, {0: [90, 10, 20], 1: [95, 30, 40], 2: [95, 70, 70]})
    out = run(data, default_params(max_holding_days=10, **NO_FRICTION), START, coefs, targets)
    same(out["opened"], [0, -1, 1, -1, -1, -1, -1])
    same(out["held"], [[T_, F_, F_], [T_, F_, F_]] + [[T_, T_, F_]] * 4 + [[F_, F_, F_]])
    same(out["n_exits"], [0] * 6 + [2])
    # all trades flat at 100, no costs, hurdle 0: every reward 0
    close(out["reward"], [0] * 7)
    close(out["cash"], [0.5, 0.5] + [0.0] * 4 + [1.0])
    close(out["equity"], [1.0] * 7)


def scenario_investable_order(run):
    """Actions are indexed in the order of the investable columns (here 0 and 2); ``opened`` and
    ``held`` are indexed by column; the target of column 2 is the second entry (3 %)."""
    p = quiet(N=3)
    bar(p, 4, 2, (100, 103.5, 99.5, 103))  # 103.5 >= 103 (3 %), < 105 (5 %)
    data = make_data(*p, investable=[True, False, True])
    coefs, targets = actions(2, {0: [10, 80]})
    targets[:, 1] = 3.0
    out = run(data, default_params(**NO_FRICTION), START, coefs, targets)
    same(out["opened"], [2, -1, -1, -1, -1, -1, -1])
    same(out["held"], [[F_, F_, T_]] + [[F_, F_, F_]] * 6)
    # 0.8 * 3 = 2.4; cash 0.5 + 0.005 * 103 = 1.015
    close(out["reward"], [0, 2.39, -0.01, -0.01, -0.01, 0, 0])
    close(out["cash"], [0.5] + [1.015] * 6)


def scenario_order_not_filled(run):
    """The best candidate is invalid on the next day: no fill and nothing else is tried (stock 1,
    coef 80, stays out); the next day stock 0 is invalid at t, so stock 1 is the candidate."""
    p = quiet(N=2)
    bar(p, 3, 0, (100, 100, 100, 100))  # carried forward, not tradable
    for day in range(4, 10):
        bar(p, day, 1, (80, 81, 79, 80))
    valid = np.ones((10, 2), dtype=bool)
    valid[3, 0] = False
    data = make_data(*p, valid=valid)
    coefs, targets = actions(2, {0: [90, 80], 1: [90, 80], 2: [90, 0]})
    out = run(data, default_params(max_holding_days=10, **NO_FRICTION), START, coefs, targets)
    same(out["opened"], [-1, 1, 0, -1, -1, -1, -1])
    same(out["held"], [[F_, F_], [F_, T_]] + [[T_, T_]] * 4 + [[F_, F_]])
    close(out["reward"], [-0.01, 0, 0, 0, 0, 0, 0])
    # k1: 0.5 at 80 -> 0.00625 shares; k2: equity 0.5 + 0.00625 * 80 = 1.0 -> alloc 0.5, cash 0
    close(out["cash"], [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0])
    close(out["equity"], [1.0] * 7)


def scenario_features_not_ready(run):
    """A stock with a price but without full-look-back features (``feature_valid`` False, e.g. in its first
    days after listing) is no candidate and shows 0 in the validity channel: stock 0 (coef 90) is passed
    over for stock 1 (coef 80) while its features are not ready (t = 2, 3), and bought once they are (t = 4)."""
    p = quiet(N=2)
    ready = np.ones((10, 2), dtype=bool)
    ready[:4, 0] = False
    data = make_data(*p, feature_valid=ready)
    coefs, targets = actions(2, {0: [90, 80], 1: [90, 0], 2: [90, 0]})
    out = run(data, default_params(max_holding_days=10, **NO_FRICTION), START, coefs, targets)
    same(out["opened"], [1, -1, 0, -1, -1, -1, -1])
    close(out["obs0"][:, 0, -1], [0, 0, 0])  # days 0..2 of stock 0: a price, no features yet
    close(out["obs0"][:, 1, -1], [1, 1, 1])
    close(out["obs"][1][:, 0, -1], [0, 0, 1])  # day 4's window: days 2..4


def scenario_allocation(run):
    """alloc = min(cash, equity_prev / K) with equity_prev marked at close[t]: after a rise the
    cash is the limit, after a fall equity / K is."""
    params = default_params(max_holding_days=10, **NO_FRICTION)
    coefs, targets = actions(2, {0: [80, 0], 1: [0, 80]}, target=50.0)  # targets never reached
    p = quiet(N=2)
    bar(p, 3, 0, (100, 140, 99, 140))
    for day in range(4, 10):
        bar(p, day, 0, (140, 141, 139, 140))
    out = run(make_data(*p), params, START, coefs, targets)
    same(out["opened"], [0, 1, -1, -1, -1, -1, -1])
    # equity at close[3] = 0.5 + 0.005 * 140 = 1.2 -> alloc min(0.5, 0.6) = 0.5 -> cash 0
    close(out["cash"], [0.5] + [0.0] * 5 + [1.2])
    close(out["equity"], [1.2] * 7)
    # end: 0.8 * 40 + 0.8 * 0 = 32
    close(out["reward"], [0] * 6 + [32.0])

    p = quiet(N=2)
    bar(p, 3, 0, (100, 100.5, 79.5, 80))
    for day in range(4, 10):
        bar(p, day, 0, (80, 81, 79, 80))
    out = run(make_data(*p), params, START, coefs, targets)
    same(out["opened"], [0, 1, -1, -1, -1, -1, -1])
    # equity at close[3] = 0.5 + 0.005 * 80 = 0.9 -> alloc min(0.5, 0.45) = 0.45 -> cash 0.05;
    # end: cash 0.05 + 0.005 * 80 + 0.0045 * 100 = 0.9
    close(out["cash"], [0.5] + [0.05] * 5 + [0.9])
    close(out["equity"], [0.9] * 7)
    # end: 0.8 * (-20) + 0.8 * 0 = -16
    close(out["reward"], [0] * 6 + [-16.0])


# --------------------------------------------------------------------------------------------------
# Reward terms
# --------------------------------------------------------------------------------------------------


def scenario_costs(run):
    """cost_bps per side: in shares at entry, in proceeds at exit, and 2 * cost_bps / 100 in each
    exit reward (25 bps: c = 0.0025, 0.5 reward points per trade)."""
    p = quiet()
    bar(p, 4, 0, (100, 104.5, 99.5, 104))  # target 4 % = 104 reached on day 4
    params = default_params(cost_bps=25.0, hurdle_pct=0.0, inaction_penalty=0.0)
    coefs, targets = actions(1, {0: [100], 2: [100]}, target=4.0)
    out = run(make_data(*p), params, START, coefs, targets)
    same(out["opened"], [0, -1, 0, -1, -1, -1, -1])
    same(out["n_exits"], [0, 1, 0, 0, 0, 1, 0])  # second trade: max holding on day 8
    # 1.0 * 4 - 0.5 = 3.5; 1.0 * 0 - 0.5 = -0.5
    close(out["reward"], [0, 3.5, 0, 0, 0, -0.5, 0])
    # k0: shares 0.5 * 0.9975 / 100 = 0.0049875, equity 0.5 + 0.49875 = 0.99875
    # k1: 0.5 + 0.0049875 * 104 * 0.9975 = 0.5 + 0.51740325 = 1.01740325
    # k2: alloc 1.01740325 / 2 = 0.508701625 -> cash 0.508701625,
    #     shares 0.508701625 * 0.9975 / 100 = 0.005074298709375, equity 1.0161314959375
    # k5: + 0.5074298709375 * 0.9975 = 0.50616129626 -> 1.01486292126
    close(out["cash"], [0.5, 1.01740325, 0.508701625, 0.508701625, 0.508701625, 1.01486292126, 1.01486292126])
    close(
        out["equity"], [0.99875, 1.01740325, 1.0161314959375, 1.0161314959375, 1.0161314959375, 1.01486292126, 1.01486292126]
    )


def scenario_hurdle(run):
    """hurdle_pct is subtracted from the gain in percent before scaling by the coef."""
    p = quiet()
    bar(p, 4, 0, (100, 103.5, 99.5, 103))  # target 3 % = 103 reached on day 4
    bar(p, 8, 0, (100, 100.5, 97.5, 98))  # second trade: max holding on day 8
    params = default_params(cost_bps=0.0, hurdle_pct=1.5, inaction_penalty=0.0)
    coefs, targets = actions(1, {0: [60], 2: [60]}, target=3.0)
    out = run(make_data(*p), params, START, coefs, targets)
    # 0.6 * (3 - 1.5) = 0.9; 0.6 * (-2 - 1.5) = -2.1
    close(out["reward"], [0, 0.9, 0, 0, 0, -2.1, 0])
    # k1: 0.5 + 0.005 * 103 = 1.015; k2: alloc 0.5075 -> shares 0.005075;
    # k5: 0.5075 + 0.005075 * 98 = 0.5075 + 0.49735 = 1.00485
    close(out["cash"], [0.5, 1.015, 0.5075, 0.5075, 0.5075, 1.00485, 1.00485])


def scenario_inaction_penalty(run):
    """The penalty applies on trading days with nothing held after the exits, never on
    settlement days (D = 3, S = 2, H = 2)."""
    p = quiet()
    bar(p, 6, 0, (100, 102.5, 99.5, 102))  # entered day 4, held 2 days on day 6
    params = default_params(trading_days=3, settlement_days=2, max_holding_days=2, inaction_penalty=0.05, **NO_FRICTION)
    coefs, targets = actions(1, {1: [80]}, n_steps=5)
    out = run(make_data(*p), params, START, coefs, targets)
    same(out["done"], [F_, F_, F_, F_, T_])
    same(out["held"], [[F_], [T_], [T_], [F_], [F_]])
    # k0 idle trading day -0.05; k3 (settlement) exit 0.8 * 2 = 1.6; k4 idle settlement 0
    close(out["reward"], [-0.05, 0, 0, 1.6, 0])
    close(out["cash"], [1.0, 0.5, 0.5, 1.01, 1.01])


# --------------------------------------------------------------------------------------------------
# Observation
# --------------------------------------------------------------------------------------------------


def scenario_observation(run):
    """[W, N, F+1]: each column's features z-scored over its own window (population std + 1e-6,
    a constant window gives 0), then the validity channel; nothing after t is used."""
    T = 10
    feats = np.zeros((T, 2, 1))
    feats[:, 0, 0] = 10.0 * np.arange(T)  # 0, 10, 20, ...
    feats[2:, 1, 0] = 3.0  # 0, 0, 3, 3, 3, ...
    o, h, l, c = quiet(N=2)
    for arr in (o, h, l, c):
        arr[:2, 1] = 0.0  # column 1 lists on day 2
    data = make_data(o, h, l, c, features=feats)  # valid = close > 0
    coefs, targets = actions(2, {})
    out = run(data, default_params(), START, coefs, targets)
    assert out["obs0"].shape == (3, 2, 2)
    assert out["obs"].shape == (7, 3, 2, 2)
    # column 0, any window [a, a + 10, a + 20]: mean a + 10, std sqrt(200 / 3)
    z0 = 10.0 / (np.sqrt(200.0 / 3.0) + 1e-6)  # 1.2247447
    r2 = np.sqrt(2.0) + 1e-6
    # t = 2: column 1 window [0, 0, 3]: mean 1, std sqrt(2); valid [0, 0, 1]
    close(out["obs0"][:, 0, 0], [-z0, 0, z0])
    close(out["obs0"][:, 1, 0], [-1 / r2, -1 / r2, 2 / r2])
    close(out["obs0"][:, 0, 1], [1, 1, 1])
    close(out["obs0"][:, 1, 1], [0, 0, 1])
    # after step 0, day 3: column 1 window [0, 3, 3]: mean 2, std sqrt(2); valid [0, 1, 1]
    close(out["obs"][0, :, 0, 0], [-z0, 0, z0])
    close(out["obs"][0, :, 1, 0], [-2 / r2, 1 / r2, 1 / r2])
    close(out["obs"][0, :, 1, 1], [0, 1, 1])
    # day 4: column 1 window [3, 3, 3] -> 0 / (0 + 1e-6) = 0; valid [1, 1, 1]
    close(out["obs"][1, :, 1, 0], [0, 0, 0])
    close(out["obs"][1, :, 1, 1], [1, 1, 1])

    later = dict(data, features=feats.copy())
    later["features"][3:] = 123.0  # days after t = 2 must not matter
    close(run(later, default_params(), START, coefs, targets)["obs0"], out["obs0"])


SCENARIOS = [
    scenario_target_hit,
    scenario_target_gap_up,
    scenario_max_holding,
    scenario_delisting,
    scenario_settlement_and_end,
    scenario_opened_today_not_checked,
    scenario_coef_threshold,
    scenario_free_slot,
    scenario_already_held,
    scenario_investable_order,
    scenario_order_not_filled,
    scenario_features_not_ready,
    scenario_allocation,
    scenario_costs,
    scenario_hurdle,
    scenario_inaction_penalty,
    scenario_observation,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_reference(scenario):
    """Every hand-computed scenario passes on the NumPy reference."""
    scenario(run_episode)


# --------------------------------------------------------------------------------------------------
# Random episodes
# --------------------------------------------------------------------------------------------------


def random_data(rng, T=40, N=6):
    """A random universe: random-walk prices, column 3 lists on day 10 (features ready on day 14), column 4 delists after
    day 20 (prices carried forward), column 2 has a few untradable days, column 1 is not
    investable."""
    close_ = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.03, (T, N)), axis=0))
    open_ = np.vstack([close_[:1], close_[:-1]]) * np.exp(rng.normal(0, 0.01, (T, N)))
    high = np.maximum(open_, close_) * (1 + rng.uniform(0, 0.04, (T, N)))
    low = np.minimum(open_, close_) * (1 - rng.uniform(0, 0.04, (T, N)))
    valid = np.ones((T, N), dtype=bool)
    valid[:10, 3] = False
    for arr in (open_, high, low, close_):
        arr[:10, 3] = 0.0
    valid[21:, 4] = False
    for arr in (open_, high, low):
        arr[21:, 4] = close_[20, 4]
    close_[21:, 4] = close_[20, 4]
    gaps = rng.choice(np.arange(1, T), 5, replace=False)
    valid[gaps, 2] = False
    for g in gaps:
        for arr in (open_, high, low, close_):
            arr[g, 2] = close_[g - 1, 2]
    feats = rng.normal(0, 1, (T, N, 3))
    feature_valid = valid.copy()
    feature_valid[:14, 3] = False  # column 3's features need four days after listing
    return make_data(
        open_,
        high,
        low,
        close_,
        valid=valid,
        feature_valid=feature_valid,
        investable=[True, False, True, True, True, True],
        features=feats,
    )


@pytest.mark.parametrize(
    "params",
    [
        default_params(),
        default_params(
            trading_days=12, settlement_days=3, max_positions=3, max_holding_days=4, cost_bps=5.0, coef_threshold=30.0
        ),
        default_params(window=5, trading_days=8, settlement_days=0, max_positions=1),
    ],
    ids=["default", "wide", "no_settlement"],
)
def test_random_episodes_are_consistent(params):
    """Random play: the replay reproduces the episode, every position is closed by the end, the
    equity identity and the cash flow add up, and each reward matches its exits and penalty."""
    D, S, K = params["trading_days"], params["settlement_days"], params["max_positions"]
    c = params["cost_bps"] / 10_000
    for seed in range(8):
        rng = np.random.default_rng(seed)
        data = random_data(rng)
        T, N = data["close"].shape
        I = investable_columns(data)
        start = int(rng.integers(params["window"] - 1, T - 1 - D - S + 1))
        out = random_episode(data, params, start, rng)
        replay, log = run_episode_log(data, params, start, out["coefs"], out["targets"])
        for key, value in replay.items():
            close(value, out[key])

        n = D + S
        assert len(out["reward"]) == n
        same(out["done"], [False] * (n - 1) + [True])
        for key in ("reward", "cash", "equity", "exit_reward_sum", "obs", "obs0"):
            assert np.all(np.isfinite(out[key])), key
        assert np.all(out["cash"] >= -1e-12)
        assert not out["held"][-1].any()
        close(out["equity"][-1], out["cash"][-1])
        assert np.all(out["held"].sum(axis=1) <= K)
        assert np.all(out["opened"][D:] == -1)

        allocs, proceeds = [], []
        for k, (state, info) in enumerate(log):
            t, u = start + k, start + k + 1
            # equity identity: cash + held shares marked at close[u]
            marked = sum(s.shares * data["close"][u, s.col] for s in state.slots if s is not None)
            close(out["equity"][k], out["cash"][k] + marked)
            close(state.cash, out["cash"][k])
            # reward = exit rewards - penalty on trading days with nothing held
            idle = k < D and not out["held"][k].any()
            close(out["reward"][k], out["exit_reward_sum"][k] - params["inaction_penalty"] * idle)
            same(out["n_exits"][k], len(info["exits"]))
            if info["open"] is not None:
                j = info["open"]["col"]
                i = int(np.flatnonzero(I == j)[0])
                assert data["feature_valid"][t, j] and data["valid"][u, j]
                assert out["coefs"][k, i] > params["coef_threshold"]
                close(info["open"]["entry"], data["open"][u, j])
                allocs.append(info["open"]["alloc"])
            for e in info["exits"]:
                gain = (e["exit"] / e["entry"] - 1) * 100
                close(
                    e["reward"], e["coef"] / params["coef_max"] * (gain - params["hurdle_pct"]) - 2 * params["cost_bps"] / 100
                )
                close(e["proceeds"], e["shares"] * e["exit"] * (1 - c))
                if e["reason"] == "target":
                    j = e["col"]
                    assert data["low"][u, j] - 1e-9 <= e["exit"] <= data["high"][u, j] + 1e-9
                proceeds.append(e["proceeds"])
        assert len(allocs) == out["n_exits"].sum() == (out["opened"] >= 0).sum()
        # cash flow: start 1.0, minus every allocation, plus every exit's proceeds
        close(out["cash"][-1], 1.0 - sum(allocs) + sum(proceeds))
