"""Hand-computed scenarios for the phase-1 intraday env.

Each ``scenario_xxx(run)`` takes a runner with the signature of
``ppo_reference.run_episode(data, spec, params, start, end, actions) -> dict`` and asserts on its
outputs only (obs0, obs, reward, terminated, truncated, mask, balance, equity, dir, exit_price,
entry_price), so the same scenarios can be run on the JAX env through an adapter.

Unless a scenario says otherwise (see ``default_spec`` / ``default_params``): point value 50,
tick 0.25, commission 2 per side, 1 contract (pv = 50, comm = 2), slippage 1 tick (slip = 0.25),
ATR 2, stop 1 ATR, target 2 ATR, window 2, features[t, f] = 10 t + f (F = 2),
initial balance 50000, dd_limit 2000, lock offset +100, breach penalty 1, episode_bars 100,
no_entry_bars 1, flatten_at_close on, hourly bars.

The standard long: BUY at t = 1, bar 2 opens at 100 -> entry 100 + 0.25 = 100.25, balance
50000 - 2 = 49998, stop 100.25 - 2 = 98.25, target 100.25 + 4 = 104.25.
The standard short: SELL at t = 1, bar 2 opens at 100 -> entry 99.75, stop 101.75, target 95.75.
"""

import numpy as np
import pytest

from ppo_reference import default_params, default_spec, make_data_ohlc, random_legal_episode, run_episode

NAN = np.nan
FLAT = (100.0, 100.5, 99.5, 100.0)  # a quiet bar: touches neither standard stop nor target
POS = slice(-7, None)  # the 7 position features at the end of an observation


def close(actual, expected):
    """Float comparison used throughout (NaN == NaN)."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=1e-6, atol=1e-6
    )


def same(actual, expected):
    """Exact comparison for bool / int outputs."""
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


# --------------------------------------------------------------------------------------------------
# Take-profit
# --------------------------------------------------------------------------------------------------


def scenario_take_profit_long(run):
    """Long hits its target inside a later bar; the limit fills at the target, no slippage."""
    data = make_data_ohlc(
        [
            FLAT,
            FLAT,  # t=1: BUY
            (100, 101, 99.5, 100.5),  # entry 100.25, no level touched
            (101, 105, 100.5, 104.5),  # high 105 >= 104.25 -> exit at 104.25
            (104.5, 105, 104, 104.5),
            (104.5, 105, 104, 104.5),
        ]
    )
    out = run(data, default_spec(), default_params(), 1, 6, [1, 0, 0])
    same(out["terminated"], [False] * 3)
    same(out["truncated"], [False] * 3)
    same(out["dir"], [1, 0, 0])
    close(out["entry_price"], [100.25, NAN, NAN])
    close(out["exit_price"], [NAN, 104.25, NAN])
    # 49998 + (104.25 - 100.25) * 50 - 2 = 50196
    close(out["balance"], [49998, 50196, 50196])
    # step 0: 49998 + (100.5 - 100.25) * 50 = 50010.5
    close(out["equity"], [50010.5, 50196, 50196])
    # 10.5 / 2000 = 0.00525; (50196 - 50010.5) / 2000 = 0.09275
    close(out["reward"], [0.00525, 0.09275, 0.0])
    # at t=2 (close 100.5, atr 2): unreal 0.25/2, to stop 2.25/2, to target 3.75/2, bars 1/100,
    # (50010.5 - min(50010.5 - 2000, 50100)) / 2000 = 1, no session end -> 24/24
    close(out["obs"][0, POS], [1, 0.125, 1.125, 1.875, 0.01, 1.0, 1.0])
    close(out["obs"][1, POS], [0, 0, 0, 0, 0, 1.0, 1.0])


def scenario_take_profit_gapped_long(run):
    """Bar opens above the target: the limit fills at the open (better than the target, no slip)."""
    data = make_data_ohlc([FLAT, FLAT, (100, 101, 99.5, 100.5), (105, 106, 104.5, 105.5), FLAT])
    out = run(data, default_spec(), default_params(), 1, 5, [1, 0])
    close(out["exit_price"], [NAN, 105.0])
    # 49998 + (105 - 100.25) * 50 - 2 = 50233.5
    close(out["balance"], [49998, 50233.5])
    same(out["dir"], [1, 0])


def scenario_levels_rounded_to_tick_with_atr_of_decision_bar(run):
    """Stop/target use atr[t] (decision bar), are rounded to the tick half-to-even; the obs uses atr
    of the bar it is observed at."""
    rows = [FLAT, FLAT, (100, 101, 99.5, 100.5), (101, 104, 100.5, 103.5), FLAT]
    # atr[1] = 1.9: stop 100.25 - 1.9 = 98.35 -> 393.4 ticks -> 98.25;
    #               target 100.25 + 3.8 = 104.05 -> 416.2 ticks -> 104.0
    data = make_data_ohlc(rows, atr=[2, 1.9, 4, 4, 4])
    out = run(data, default_spec(), default_params(), 1, 5, [1, 0])
    # at t=2: atr 4, close 100.5: (100.5-100.25)/4, (100.5-98.25)/4, (104-100.5)/4
    close(out["obs"][0, POS][1:4], [0.0625, 0.5625, 0.875])
    # bar 3 high 104.0 == target 104.0 -> filled at 104.0: 49998 + 3.75 * 50 - 2 = 50183.5
    close(out["exit_price"], [NAN, 104.0])
    close(out["balance"], [49998, 50183.5])

    # atr[1] = 2.125: stop 100.25 - 2.125 = 98.125 = 392.5 ticks -> half-even 392 -> 98.0
    # (half-up would give 98.25); target 100.25 + 4.25 = 104.5 exactly
    data = make_data_ohlc(rows, atr=[2, 2.125, 4, 4, 4])
    out = run(data, default_spec(), default_params(), 1, 5, [1])
    # at t=2: to stop (100.5 - 98.0)/4 = 0.625, to target (104.5 - 100.5)/4 = 1.0
    close(out["obs"][0, POS][2:4], [0.625, 1.0])


# --------------------------------------------------------------------------------------------------
# Stops
# --------------------------------------------------------------------------------------------------


def scenario_stop_gapped_long(run):
    """Bar opens below the stop: fill at the open minus slippage."""
    data = make_data_ohlc([FLAT, FLAT, (100, 101, 99.5, 100.5), (97, 97.5, 96.5, 97), FLAT])
    out = run(data, default_spec(), default_params(), 1, 5, [1, 0, 0])
    # exit 97 - 0.25 = 96.75; 49998 + (96.75 - 100.25) * 50 - 2 = 49998 - 175 - 2 = 49821
    close(out["exit_price"], [NAN, 96.75, NAN])
    close(out["balance"], [49998, 49821, 49821])
    close(out["equity"], [50010.5, 49821, 49821])
    # (49821 - 50010.5) / 2000 = -0.09475
    close(out["reward"], [0.00525, -0.09475, 0.0])
    same(out["dir"], [1, 0, 0])


def scenario_stop_and_target_inside_one_bar(run):
    """Both levels inside one bar: the stop is assumed hit first (stop - slip)."""
    spec, params = default_spec(), default_params()
    # long, later bar: low 98 <= 98.25 and high 105 >= 104.25 -> exit 98.25 - 0.25 = 98.0
    data = make_data_ohlc([FLAT, FLAT, (100, 101, 99.5, 100.5), (100, 105, 98, 104), FLAT])
    out = run(data, spec, params, 1, 5, [1, 0])
    close(out["exit_price"], [NAN, 98.0])
    # 49998 + (98 - 100.25) * 50 - 2 = 49998 - 112.5 - 2 = 49883.5
    close(out["balance"], [49998, 49883.5])
    same(out["dir"], [1, 0])

    # long, the entry bar itself (a position just opened is checked in the same bar)
    data = make_data_ohlc([FLAT, FLAT, (100, 105, 98, 104), FLAT, FLAT])
    out = run(data, spec, params, 1, 5, [1, 0])
    close(out["entry_price"], [100.25, NAN])
    close(out["exit_price"], [98.0, NAN])
    close(out["balance"], [49883.5, 49883.5])
    close(out["equity"], [49883.5, 49883.5])
    # (49883.5 - 50000) / 2000 = -0.05825
    close(out["reward"], [-0.05825, 0.0])
    same(out["dir"], [0, 0])

    # short: high 102 >= 101.75 and low 95 <= 95.75 -> exit 101.75 + 0.25 = 102.0
    data = make_data_ohlc([FLAT, FLAT, FLAT, (100, 102, 95, 96), FLAT])
    out = run(data, spec, params, 1, 5, [2, 0])
    close(out["exit_price"], [NAN, 102.0])
    # 49998 + (102 - 99.75) * -1 * 50 - 2 = 49998 - 112.5 - 2 = 49883.5
    close(out["balance"], [49998, 49883.5])


# --------------------------------------------------------------------------------------------------
# Short trades
# --------------------------------------------------------------------------------------------------


def scenario_short_trade(run):
    """Short: entry = open - slip, stop above, target below, P&L with dir = -1."""
    spec, params = default_spec(), default_params()
    data = make_data_ohlc(
        [
            FLAT,
            FLAT,  # t=1: SELL
            (100, 100.5, 99, 99.5),  # entry 99.75, stop 101.75, target 95.75; none touched
            (96, 97, 95, 95.5),  # open 96 > 95.75, low 95 <= 95.75 -> exit at 95.75
            FLAT,
        ]
    )
    out = run(data, spec, params, 1, 5, [2, 0])
    close(out["entry_price"], [99.75, NAN])
    close(out["exit_price"], [NAN, 95.75])
    same(out["dir"], [-1, 0])
    # 49998 + (99.5 - 99.75) * -1 * 50 = 50010.5; 49998 + (95.75 - 99.75) * -1 * 50 - 2 = 50196
    close(out["equity"], [50010.5, 50196])
    close(out["balance"], [49998, 50196])
    close(out["reward"], [0.00525, 0.09275])
    # at t=2 (close 99.5): unreal (99.5-99.75)*-1/2, to stop (99.5-101.75)*-1/2,
    # to target (95.75-99.5)*-1/2
    close(out["obs"][0, POS], [-1, 0.125, 1.125, 1.875, 0.01, 1.0, 1.0])

    # target gapped: opens at 95 <= 95.75 -> exit 95; 49998 + 4.75 * 50 - 2 = 50233.5
    data = make_data_ohlc([FLAT, FLAT, (100, 100.5, 99, 99.5), (95, 95.5, 94.5, 95), FLAT])
    out = run(data, spec, params, 1, 5, [2, 0])
    close(out["exit_price"], [NAN, 95.0])
    close(out["balance"], [49998, 50233.5])

    # stop gapped: opens at 102.5 >= 101.75 -> exit 102.5 + 0.25 = 102.75;
    # 49998 + (102.75 - 99.75) * -1 * 50 - 2 = 49998 - 150 - 2 = 49846
    data = make_data_ohlc([FLAT, FLAT, (100, 100.5, 99, 99.5), (102.5, 103, 102, 102.5), FLAT])
    out = run(data, spec, params, 1, 5, [2, 0])
    close(out["exit_price"], [NAN, 102.75])
    close(out["balance"], [49998, 49846])


# --------------------------------------------------------------------------------------------------
# Session end
# --------------------------------------------------------------------------------------------------


def scenario_flatten_at_session_end(run):
    """A position still open on a session-end bar is closed at its close minus slippage."""
    rows = [FLAT, FLAT, (100, 101, 99.5, 100.5), (100.5, 101.5, 100, 101), FLAT, FLAT]
    session_end = [False, False, False, True, False, False]
    data = make_data_ohlc(rows, session_end=session_end)
    # bars_to_close[1] = 2 > no_entry_bars = 1 -> BUY legal
    out = run(data, default_spec(), default_params(), 1, 6, [1, 0, 0])
    same(out["mask"][0], [True, True, True])
    same(out["dir"], [1, 0, 0])
    # exit 101 - 0.25 = 100.75; 49998 + (100.75 - 100.25) * 50 - 2 = 50021
    close(out["exit_price"], [NAN, 100.75, NAN])
    close(out["balance"], [49998, 50021, 50021])
    close(out["equity"], [50010.5, 50021, 50021])
    # (50021 - 50010.5) / 2000 = 0.00525
    close(out["reward"], [0.00525, 0.00525, 0.0])
    # hours to close / 24: t=2 -> 1/24, t=3 -> 0, t=4 -> no later session end -> 24/24
    close(out["obs"][:, -1], [1 / 24, 0.0, 1.0])

    # flatten_at_close off: the position is carried through the session end
    out = run(data, default_spec(), default_params(flatten_at_close=False), 1, 6, [1, 0])
    same(out["dir"], [1, 1])
    close(out["exit_price"], [NAN, NAN])
    # 49998 + (101 - 100.25) * 50 = 50035.5
    close(out["equity"], [50010.5, 50035.5])
    close(out["balance"], [49998, 49998])


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def scenario_entry_masks(run):
    """Entries are masked outside RTH, within no_entry_bars of the session end and in a position;
    a masked entry is played as HOLD."""
    rows = [FLAT] * 5 + [(96, 97, 95, 95.5)] + [(95.5, 96, 95, 95.5)] * 4
    rth = [False, False] + [True] * 8
    session_end = [False] * 8 + [True, False]
    # bars_to_close = [8, 7, 6, 5, 4, 3, 2, 1, 0, 10]
    data = make_data_ohlc(rows, rth=rth, session_end=session_end)
    actions = [
        1,  # t=1: outside RTH -> HOLD
        2,  # t=2: SELL legal -> entry at open[3] - 0.25 = 99.75, stop 101.75, target 95.75
        1,  # t=3: in a position -> ignored (no flip, no new entry)
        2,  # t=4: in a position -> ignored; bar 5 low 95 <= 95.75 -> target exit 95.75
        0,  # t=5: flat, bars_to_close 3 > 1 -> entries legal
        0,  # t=6: bars_to_close 2 > 1 -> legal
        1,  # t=7: bars_to_close 1, not > 1 -> masked -> HOLD
        2,  # t=8: bars_to_close 0 -> masked -> HOLD; then t=9, 9 + 1 >= end -> truncated
    ]
    out = run(data, default_spec(), default_params(), 1, 10, actions)
    T_, F_ = True, False
    same(
        out["mask"],
        [[T_, F_, F_], [T_, T_, T_], [T_, F_, F_], [T_, F_, F_], [T_, T_, T_], [T_, T_, T_], [T_, F_, F_], [T_, F_, F_]],
    )
    same(out["dir"], [0, -1, -1, 0, 0, 0, 0, 0])
    close(out["entry_price"], [NAN, 99.75] + [NAN] * 6)
    close(out["exit_price"], [NAN] * 3 + [95.75] + [NAN] * 4)
    # 50000 - 2 = 49998; 49998 + (95.75 - 99.75) * -1 * 50 - 2 = 50196
    close(out["balance"], [50000, 49998, 49998] + [50196] * 5)
    # marked at close 100: 49998 + (100 - 99.75) * -1 * 50 = 49985.5
    close(out["equity"], [50000, 49985.5, 49985.5] + [50196] * 5)
    same(out["terminated"], [False] * 8)
    same(out["truncated"], [False] * 7 + [True])


# --------------------------------------------------------------------------------------------------
# Trailing drawdown
# --------------------------------------------------------------------------------------------------


def _dd_rows():
    """Bars for the drawdown scenarios: a long rallies to 106, falls back to 103.5, then 101."""
    return [
        FLAT,
        FLAT,
        (100, 106.5, 99.5, 106),  # equity 49998 + 5.75 * 50 = 50285.5 (the peak)
        (106, 106.5, 103, 103.5),  # equity 49998 + 3.25 * 50 = 50160.5
        (103.5, 104, 100.5, 101),  # equity 49998 + 0.75 * 50 = 50035.5
        FLAT,
        FLAT,
    ]


def scenario_trailing_drawdown_breach(run):
    """The threshold trails the peak (peak - dd_limit); equity at or below it liquidates at the
    close minus slippage, terminates and costs the breach penalty."""
    # dd_limit 100, lock far away (51000); stop 3 ATR = 94.25, target 10 ATR = 120.25 (never hit)
    params = default_params(dd_limit=100.0, dd_lock_offset=1000.0, sl_atr_mult=3.0, tp_atr_mult=10.0)
    data = make_data_ohlc(_dd_rows())
    out = run(data, default_spec(), params, 1, 7, [1, 0, 0, 0])
    assert len(out["reward"]) == 2  # stops at termination
    same(out["terminated"], [False, True])
    same(out["truncated"], [False, False])
    same(out["dir"], [1, 0])
    # step 1: threshold min(50285.5 - 100, 51000) = 50185.5 >= 50160.5 -> liquidate at
    # 103.5 - 0.25 = 103.25: 49998 + (103.25 - 100.25) * 50 - 2 = 50146
    close(out["exit_price"], [NAN, 103.25])
    close(out["balance"], [49998, 50146])
    close(out["equity"], [50285.5, 50146])
    # 285.5 / 100 = 2.855; (50146 - 50285.5) / 100 - 1 = -1.395 - 1 = -2.395
    close(out["reward"], [2.855, -2.395])
    # (equity - threshold) / dd_limit: (50285.5 - 50185.5)/100 = 1; (50146 - 50185.5)/100 = -0.395
    close(out["obs"][:, -2], [1.0, -0.395])
    close(out["obs"][1, POS][:5], [0, 0, 0, 0, 0])


def scenario_threshold_locks(run):
    """The threshold stops trailing at initial_balance + dd_lock_offset."""
    params = default_params(dd_limit=100.0, dd_lock_offset=50.0, sl_atr_mult=3.0, tp_atr_mult=10.0)
    data = make_data_ohlc(_dd_rows())
    out = run(data, default_spec(), params, 1, 7, [1, 0, 0, 0])
    # threshold = min(50285.5 - 100, 50000 + 50) = 50050: 50160.5 > 50050 survives (it would
    # have breached the unlocked 50185.5); 50035.5 <= 50050 breaches at step 2
    same(out["terminated"], [False, False, True])
    same(out["dir"], [1, 1, 0])
    # (50285.5 - 50050)/100 = 2.355; (50160.5 - 50050)/100 = 1.105; (50021 - 50050)/100 = -0.29
    close(out["obs"][:, -2], [2.355, 1.105, -0.29])
    # liquidation at 101 - 0.25 = 100.75: 49998 + 0.5 * 50 - 2 = 50021
    close(out["exit_price"], [NAN, NAN, 100.75])
    close(out["balance"], [49998, 49998, 50021])
    close(out["equity"], [50285.5, 50160.5, 50021])
    # 2.855; (50160.5 - 50285.5)/100 = -1.25; (50021 - 50160.5)/100 - 1 = -2.395
    close(out["reward"], [2.855, -1.25, -2.395])


def scenario_breach_from_start_and_when_flat(run):
    """Breach without any trailing; termination wins over truncation; a stop exit that leaves the
    (flat) balance at or below the threshold also terminates."""
    spec = default_spec()
    params = default_params(dd_limit=100.0, dd_lock_offset=0.0, sl_atr_mult=3.0, episode_bars=1)  # also the truncation step
    # threshold min(50000 - 100, 50000) = 49900; stop 94.25
    data = make_data_ohlc([FLAT, FLAT, (100, 100.5, 97, 97.75), FLAT])
    out = run(data, spec, params, 1, 4, [1, 0])
    # equity 49998 + (97.75 - 100.25) * 50 = 49873 <= 49900 -> liquidate at 97.5:
    # 49998 + (97.5 - 100.25) * 50 - 2 = 49998 - 137.5 - 2 = 49858.5
    same(out["terminated"], [True])
    same(out["truncated"], [False])
    close(out["exit_price"], [97.5])
    close(out["balance"], [49858.5])
    close(out["equity"], [49858.5])
    # (49858.5 - 50000) / 100 - 1 = -2.415
    close(out["reward"], [-2.415])

    # stop gapped through to 93 -> exit 92.75; flat balance 49998 + (92.75 - 100.25)*50 - 2
    # = 49621 <= 49900 -> terminated, no second exit; penalty 0.5 here
    params = default_params(dd_limit=100.0, dd_lock_offset=0.0, sl_atr_mult=3.0, breach_penalty=0.5)
    data = make_data_ohlc([FLAT, FLAT, FLAT, (93, 93.5, 92.5, 93), FLAT])
    out = run(data, spec, params, 1, 5, [1, 0, 0])
    same(out["terminated"], [False, True])
    same(out["dir"], [1, 0])
    close(out["exit_price"], [NAN, 92.75])
    close(out["balance"], [49998, 49621])
    # 49998 + (100 - 100.25) * 50 = 49985.5; (49621 - 49985.5)/100 - 0.5 = -3.645 - 0.5 = -4.145
    close(out["equity"], [49985.5, 49621])
    close(out["reward"], [-0.145, -4.145])

    # equity exactly at the threshold breaches ("at or below"): dd_limit 114.5 -> threshold
    # 50000 - 114.5 = 49885.5; close 98: 49998 + (98 - 100.25) * 50 = 49885.5 (all exact in binary)
    params = default_params(dd_limit=114.5, dd_lock_offset=0.0, sl_atr_mult=3.0)
    data = make_data_ohlc([FLAT, FLAT, (100, 100.5, 97.5, 98), FLAT])
    out = run(data, spec, params, 1, 4, [1, 0])
    same(out["terminated"], [True])
    # liquidation at 98 - 0.25 = 97.75: 49998 + (97.75 - 100.25) * 50 - 2 = 49871
    close(out["exit_price"], [97.75])
    close(out["balance"], [49871])
    # (49871 - 50000) / 114.5 - 1
    close(out["reward"], [-129 / 114.5 - 1])


# --------------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------------


def scenario_commission_per_side(run):
    """Commission per contract per side, charged at entry and at exit."""
    spec = default_spec(commission=2.5)
    params = default_params(contracts=2, slippage_ticks=0.0)  # pv = 100, comm = 5, no slippage
    data = make_data_ohlc([FLAT, FLAT, FLAT, (100, 101, 99.5, 100.5), FLAT], session_end=[False, False, False, True, False])
    out = run(data, spec, params, 1, 5, [1, 0])
    close(out["entry_price"], [100.0, NAN])
    # flattened at the session-end close 100.5 (no slippage)
    close(out["exit_price"], [NAN, 100.5])
    # 50000 - 5 = 49995; 49995 + 0.5 * 100 - 5 = 50040
    close(out["balance"], [49995, 50040])
    close(out["equity"], [49995, 50040])
    # -5 / 2000 = -0.0025; 45 / 2000 = 0.0225
    close(out["reward"], [-0.0025, 0.0225])


def scenario_slippage_against_trader(run):
    """Slippage (2 ticks = 0.5) on entries and stop exits, against the trader; none on targets."""
    spec = default_spec(commission=0.0)
    params = default_params(slippage_ticks=2.0)
    # long: entry 100 + 0.5 = 100.5, stop 98.5, target 104.5; bar 3 low 98 -> exit 98.5 - 0.5 = 98
    data = make_data_ohlc([FLAT, FLAT, FLAT, (100, 100.5, 98, 98.5), FLAT])
    out = run(data, spec, params, 1, 5, [1, 0])
    close(out["entry_price"], [100.5, NAN])
    close(out["exit_price"], [NAN, 98.0])
    # 50000 + (100 - 100.5) * 50 = 49975; 50000 + (98 - 100.5) * 50 = 49875
    close(out["equity"], [49975, 49875])
    close(out["balance"], [50000, 49875])

    # short: entry 99.5, stop 101.5; bar 3 high 102 -> exit 101.5 + 0.5 = 102
    data = make_data_ohlc([FLAT, FLAT, FLAT, (100, 102, 99.5, 101.5), FLAT])
    out = run(data, spec, params, 1, 5, [2, 0])
    close(out["entry_price"], [99.5, NAN])
    close(out["exit_price"], [NAN, 102.0])
    # 50000 + (100 - 99.5) * -1 * 50 = 49975; 50000 + (102 - 99.5) * -1 * 50 = 49875
    close(out["equity"], [49975, 49875])
    close(out["balance"], [50000, 49875])

    # long target: high 105 >= 104.5 -> exit exactly 104.5; 50000 + 4 * 50 = 50200
    data = make_data_ohlc([FLAT, FLAT, FLAT, (101, 105, 100.5, 104.5), FLAT])
    out = run(data, spec, params, 1, 5, [1, 0])
    close(out["exit_price"], [NAN, 104.5])
    close(out["balance"], [50000, 50200])


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def scenario_truncation_episode_bars(run):
    """Truncated after episode_bars steps; the position is not closed by truncation."""
    data = make_data_ohlc([FLAT] * 8)
    out = run(data, default_spec(), default_params(episode_bars=3), 1, 8, [1, 0, 0, 0, 0])
    assert len(out["reward"]) == 3
    same(out["truncated"], [False, False, True])
    same(out["terminated"], [False, False, False])
    same(out["dir"], [1, 1, 1])
    # bars_in_pos / episode_bars = 1/3, 2/3, 3/3
    close(out["obs"][:, -3], [1 / 3, 2 / 3, 1.0])
    # 49998 + (100 - 100.25) * 50 = 49985.5 each bar
    close(out["equity"], [49985.5] * 3)


def scenario_truncation_split_end(run):
    """Truncated when the next bar would be at or past the split end."""
    data = make_data_ohlc([FLAT] * 8)
    # end = 5: t goes 1 -> 2 -> 3 -> 4, and 4 + 1 >= 5
    out = run(data, default_spec(), default_params(), 1, 5, [0] * 6)
    same(out["truncated"], [False, False, True])
    same(out["terminated"], [False, False, False])
    # start = 3, end = 5: a single step
    out = run(data, default_spec(), default_params(), 3, 5, [0] * 6)
    same(out["truncated"], [True])


# --------------------------------------------------------------------------------------------------
# Observation layout
# --------------------------------------------------------------------------------------------------


def scenario_observation_layout(run):
    """Window slice oldest first, row-major, then the 7 position features."""
    T = 8
    features = np.stack([np.arange(T), 100 + np.arange(T), 200 + np.arange(T)], axis=1)  # F = 3
    rows = [FLAT] * 3 + [(100, 101, 99.5, 100.75)] + [FLAT] * 4
    session_end = [False] * 6 + [True, False]
    data = make_data_ohlc(rows, features=features, session_end=session_end, bar_hours=0.5)
    # threshold = min(peak - 2000, 50000 - 1990 = 48010)
    params = default_params(window=3, dd_lock_offset=-1990.0)
    out = run(data, default_spec(), params, 2, 8, [1, 0])
    assert out["obs0"].shape == (3 * 3 + 7,)
    assert out["obs"].shape == (2, 3 * 3 + 7)
    # reset at t=2: rows 0, 1, 2; flat; (50000 - min(48000, 48010)) / 2000 = 1;
    # hours to close (6 - 2) * 0.5 = 2 -> 2/24
    close(out["obs0"], [0, 100, 200, 1, 101, 201, 2, 102, 202, 0, 0, 0, 0, 0, 1.0, 2 / 24])
    # after BUY at t=2: t=3, rows 1, 2, 3; entry 100.25, stop 98.25, target 104.25, close 100.75:
    # unreal 0.5/2, to stop 2.5/2, to target 3.5/2, bars 1/100,
    # equity 49998 + 0.5 * 50 = 50023, threshold min(48023, 48010) = 48010 -> 2013/2000 = 1.0065,
    # hours (6 - 3) * 0.5 = 1.5 -> 1.5/24
    close(out["obs"][0], [1, 101, 201, 2, 102, 202, 3, 103, 203, 1, 0.25, 1.25, 1.75, 0.01, 1.0065, 1.5 / 24])
    # t=4: close 100, bars 2/100, equity 49985.5 -> (49985.5 - 48010)/2000 = 0.98775
    close(out["obs"][1], [2, 102, 202, 3, 103, 203, 4, 104, 204, 1, -0.125, 0.875, 2.125, 0.02, 0.98775, 1.0 / 24])


# --------------------------------------------------------------------------------------------------
# Phase 2: break-even, trailing stop, masks of the management actions
# --------------------------------------------------------------------------------------------------
# Phase 2 actions: 3 MOVE_SL_TO_BE, 4 ENABLE_TRAIL, 5 DISABLE_TRAIL; the observation gains two flags
# at its end (break-even: the stop is at or beyond the entry; trailing on).
P2 = dict(phase=2)
T_, F_ = True, False
FLAT_MASK = [T_, T_, T_, F_, F_, F_]
FLAGS = slice(-2, None)


def mirror(rows):
    """The short mirror of long bars: prices reflected around 100 (high and low swap)."""
    return [(200 - o, 200 - lo, 200 - h, 200 - c) for o, h, lo, c in rows]


def scenario_break_even_then_retrace_exits_at_entry(run):
    """MOVE_SL_TO_BE with open profit moves the stop to the entry; a retrace then fills it at the
    entry minus slippage, so the trade loses only its costs. Without the move the trade survives."""
    rows = [
        FLAT,
        FLAT,
        (100, 102, 99.75, 101.5),  # entry 100.25, stop 98.25, target 104.25; close 101.5: profit
        (101.5, 102, 100.5, 101.75),  # stop at 100.25 not touched
        (101.75, 102, 99.5, 100),  # low 99.5 <= 100.25 -> exit 100.25 - 0.25 = 100.0
        FLAT,
    ]
    data = make_data_ohlc(rows)
    out = run(data, default_spec(), default_params(**P2), 1, 6, [1, 3, 0, 0])
    same(out["mask"], [FLAT_MASK, [T_, F_, F_, T_, T_, F_], [T_, F_, F_, F_, T_, F_], FLAT_MASK])
    close(out["sl"], [98.25, 100.25, 0, 0])
    same(out["dir"], [1, 1, 0, 0])
    close(out["exit_price"], [NAN, NAN, 100.0, NAN])
    # 49998 + (100.0 - 100.25) * 50 - 2 = 49983.5: the round trip costs 2 x 2 commission + 2 x 12.5 slippage
    close(out["balance"], [49998, 49998, 49983.5, 49983.5])
    # 49998 + 1.25 * 50 = 50060.5; 49998 + 1.5 * 50 = 50073
    close(out["equity"], [50060.5, 50073, 49983.5, 49983.5])
    close(out["reward"], [0.03025, 0.00625, -0.04475, 0.0])
    close(out["obs"][:, FLAGS], [[0, 0], [1, 0], [0, 0], [0, 0]])
    # at t=3 the distance to the stop is (101.75 - 100.25) / 2
    close(out["obs"][1, -9:-2][2], 0.75)
    assert out["obs"].shape[1] == 2 * 2 + 9

    out = run(data, default_spec(), default_params(**P2), 1, 6, [1, 0, 0, 0])
    same(out["dir"], [1, 1, 1, 1])
    close(out["sl"], [98.25] * 4)

    # the short mirror: entry 99.75, stop 101.75 -> 99.75 and out at 99.75 + 0.25 = 100.0
    out = run(make_data_ohlc(mirror(rows)), default_spec(), default_params(**P2), 1, 6, [2, 3, 0, 0])
    close(out["sl"], [101.75, 99.75, 0, 0])
    close(out["exit_price"], [NAN, NAN, 100.0, NAN])
    close(out["balance"], [49998, 49998, 49983.5, 49983.5])


def scenario_break_even_illegal_without_open_profit(run):
    """MOVE_SL_TO_BE needs close[t] strictly beyond the entry; masked, it is played as HOLD."""
    rows = [
        FLAT,
        FLAT,
        (100, 100.5, 99.5, 99.75),  # short entry 99.75, stop 101.75; close 99.75: no profit
        (99.75, 100.25, 99.5, 100),  # close 100: a loss
        (100, 100.25, 99.25, 99.5),  # close 99.5: profit
        (99.5, 99.75, 99.25, 99.5),  # high 99.75 >= stop 99.75 -> exit 99.75 + 0.25 = 100.0
        FLAT,
    ]
    out = run(make_data_ohlc(rows), default_spec(), default_params(**P2), 1, 7, [2, 3, 3, 3, 0])
    same(out["mask"][:, 3], [F_, F_, F_, T_, F_])
    # the stop moved at t=4 is filled in bar 5 (the stop at 101.75 would not have been)
    close(out["sl"], [101.75, 101.75, 101.75, 0, 0])
    same(out["dir"], [-1, -1, -1, 0, 0])
    close(out["exit_price"], [NAN, NAN, NAN, 100.0, NAN])
    # 49998 + (100 - 99.75) * -1 * 50 - 2 = 49983.5
    close(out["balance"], [49998] * 3 + [49983.5] * 2)


def _trail_rows():
    """A long that runs to 103 then retraces; bar 4's ATR doubles (the trail must not loosen)."""
    return [
        FLAT,
        FLAT,
        (100, 101, 99.5, 100.5),  # entry 100.25, stop 98.25; best 101
        (100.5, 103, 100, 102.5),  # best 103
        (102.5, 102.75, 101.5, 101.75),
        (101.75, 102, 100.5, 101),  # low 100.5: hits a stop at 101, not one at 99
        FLAT,
        FLAT,
    ]


def scenario_trailing_stop_ratchets_and_exits_on_retrace(run):
    """With trailing on, the stop moves to best - trail_atr_mult x atr[t] (rounded to the tick) when
    tighter, never looser (a wider ATR leaves it where it is); the retrace then fills it."""
    params = default_params(phase=2, trail_atr_mult=1.0, tp_atr_mult=10.0)  # target 120.25: never hit
    data = make_data_ohlc(_trail_rows(), atr=[2, 2, 2, 2, 4, 2, 2, 2])
    out = run(data, default_spec(), params, 1, 8, [1, 4, 0, 0, 0])
    # t=2: best 101 -> 101 - 2 = 99 > 98.25; t=3: best 103 -> 101; t=4: 103 - 4 = 99 < 101 -> stays 101
    close(out["sl"], [98.25, 99, 101, 0, 0])
    same(out["dir"], [1, 1, 1, 0, 0])
    close(out["exit_price"], [NAN, NAN, NAN, 100.75, NAN])
    # 49998 + (100.75 - 100.25) * 50 - 2 = 50021
    close(out["balance"], [49998, 49998, 49998, 50021, 50021])
    same(out["mask"], [FLAT_MASK, [T_, F_, F_, T_, T_, F_], [T_, F_, F_, T_, F_, T_], [T_, F_, F_, F_, F_, T_], FLAT_MASK])
    close(out["obs"][:, FLAGS], [[0, 0], [0, 1], [1, 1], [0, 0], [0, 0]])

    # DISABLE_TRAIL at t=3 keeps the stop at 99 (no ratchet): bar 5's low 100.5 does not reach it
    out = run(data, default_spec(), params, 1, 8, [1, 4, 5, 0, 0])
    close(out["sl"], [98.25, 99, 99, 99, 99])
    same(out["dir"], [1, 1, 1, 1, 1])
    close(out["obs"][:, FLAGS], [[0, 0], [0, 1], [0, 0], [0, 0], [0, 0]])

    # the short mirror: entry 99.75, stop 101.75; best 99 -> 101; best 97 -> 99; 97 + 4 = 101 -> stays 99;
    # bar 5's high 99.5 fills it at 99 + 0.25 = 99.25: 49998 + (99.25 - 99.75) * -1 * 50 - 2 = 50021
    out = run(
        make_data_ohlc(mirror(_trail_rows()), atr=[2, 2, 2, 2, 4, 2, 2, 2]), default_spec(), params, 1, 8, [2, 4, 0, 0, 0]
    )
    close(out["sl"], [101.75, 101, 99, 0, 0])
    close(out["exit_price"], [NAN, NAN, NAN, 99.25, NAN])
    close(out["balance"], [49998, 49998, 49998, 50021, 50021])


def scenario_trailing_level_rounded_and_gap(run):
    """The trail level is rounded to the tick (half to even); a trail enabled above the market fills
    at the next open (a stop gapped through)."""
    params = default_params(phase=2, trail_atr_mult=0.5, tp_atr_mult=10.0)
    rows = [FLAT, FLAT, (100, 103, 99.5, 100.5), (100.5, 101, 100, 100.75), FLAT]
    # best 103; atr[2] = 2.25 -> 103 - 1.125 = 101.875 = 407.5 ticks -> half-even 408 -> 102.0 above the
    # market: bar 3 opens at 100.5 <= 102 -> fill at 100.5 - 0.25 = 100.25
    data = make_data_ohlc(rows, atr=[2, 2, 2.25, 2, 2])
    out = run(data, default_spec(), params, 1, 5, [1, 4, 0])
    close(out["sl"], [98.25, 0, 0])
    close(out["exit_price"], [NAN, 100.25, NAN])
    close(out["balance"], [49998, 49996, 49996])


def scenario_management_masks_in_every_state(run):
    """The new actions' masks: all illegal when flat (in or out of RTH); ENABLE_TRAIL / DISABLE_TRAIL
    by the trailing flag, also outside RTH; MOVE_SL_TO_BE with open profit and the stop short of the
    entry. Masked actions are played as HOLD (the stop does not move)."""
    rows = [
        FLAT,
        FLAT,
        FLAT,
        FLAT,  # entry 100.25, stop 98.25; close 100: no profit
        (100, 101, 99.5, 101),  # close 101: profit
        (101, 101.5, 100.5, 101),  # best 101.5
        (101, 101.5, 100.5, 101),
        (101, 101.5, 100.5, 101),
        (101, 101.5, 100.5, 101),
        (101, 101.5, 100.5, 101),
    ]
    rth = [F_, F_, T_, T_, T_, T_, T_, T_, F_, F_]
    data = make_data_ohlc(rows, rth=rth)
    actions = [
        4,  # t=1 flat, outside RTH: ENABLE_TRAIL masked -> HOLD
        1,  # t=2 BUY
        3,  # t=3 no profit: MOVE_SL_TO_BE masked -> HOLD
        5,  # t=4 trailing off: DISABLE_TRAIL masked -> HOLD
        4,  # t=5 ENABLE_TRAIL: 101.5 - 2 = 99.5
        3,  # t=6 MOVE_SL_TO_BE: stop 100.25 (tighter than the trail's 99.5)
        5,  # t=7 DISABLE_TRAIL (stop stays at the entry)
        0,
    ]  # t=8 outside RTH, in a position; truncated at the split end
    out = run(data, default_spec(), default_params(**P2), 1, 10, actions)
    same(
        out["mask"],
        [
            [T_, F_, F_, F_, F_, F_],
            FLAT_MASK,
            [T_, F_, F_, F_, T_, F_],
            [T_, F_, F_, T_, T_, F_],
            [T_, F_, F_, T_, T_, F_],
            [T_, F_, F_, T_, F_, T_],
            [T_, F_, F_, F_, F_, T_],
            [T_, F_, F_, F_, T_, F_],
        ],
    )
    close(out["sl"], [0, 98.25, 98.25, 98.25, 99.5, 100.25, 100.25, 100.25])
    same(out["dir"], [0] + [1] * 7)
    close(out["obs"][:, FLAGS], [[0, 0], [0, 0], [0, 0], [0, 0], [0, 1], [1, 1], [1, 0], [1, 0]])
    same(out["truncated"], [F_] * 7 + [T_])


PHASE2_SCENARIOS = [
    scenario_break_even_then_retrace_exits_at_entry,
    scenario_break_even_illegal_without_open_profit,
    scenario_trailing_stop_ratchets_and_exits_on_retrace,
    scenario_trailing_level_rounded_and_gap,
    scenario_management_masks_in_every_state,
]


SCENARIOS = [
    scenario_take_profit_long,
    scenario_take_profit_gapped_long,
    scenario_levels_rounded_to_tick_with_atr_of_decision_bar,
    scenario_stop_gapped_long,
    scenario_stop_and_target_inside_one_bar,
    scenario_short_trade,
    scenario_flatten_at_session_end,
    scenario_entry_masks,
    scenario_trailing_drawdown_breach,
    scenario_threshold_locks,
    scenario_breach_from_start_and_when_flat,
    scenario_commission_per_side,
    scenario_slippage_against_trader,
    scenario_truncation_episode_bars,
    scenario_truncation_split_end,
    scenario_observation_layout,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_reference(scenario):
    """Every hand-computed scenario passes on the NumPy reference."""
    scenario(run_episode)


@pytest.mark.parametrize("scenario", PHASE2_SCENARIOS, ids=lambda f: f.__name__)
def test_reference_phase2(scenario):
    """Every hand-computed phase 2 scenario passes on the NumPy reference."""
    scenario(run_episode)


def test_random_legal_episode_is_consistent():
    """Random legal play: every action legal, replaying the actions reproduces the episode, and
    rewards add up to the equity change (plus penalties)."""
    rng = np.random.default_rng(0)
    T = 300
    steps = rng.normal(0, 1.0, T).cumsum()
    close_ = np.round((2000 + steps) / 0.25) * 0.25
    open_ = np.concatenate([[close_[0]], close_[:-1]])
    high = np.maximum(open_, close_) + 0.25 * rng.integers(0, 8, T)
    low = np.minimum(open_, close_) - 0.25 * rng.integers(0, 8, T)
    hour = np.arange(T) % 24
    data = make_data_ohlc(
        np.stack([open_, high, low, close_], 1), atr=1.5, rth=(hour >= 9) & (hour < 17), session_end=hour == 16
    )
    spec = default_spec()
    params = default_params(dd_limit=500.0, episode_bars=200)
    for seed in range(5):
        out = random_legal_episode(data, spec, params, 10, T, 250, np.random.default_rng(seed))
        n = len(out["actions"])
        assert n > 0
        assert out["mask"][np.arange(n), out["actions"]].all()
        assert out["terminated"][-1] or out["truncated"][-1]
        replay = run_episode(data, spec, params, 10, T, out["actions"])
        for key, value in replay.items():
            close(value, out[key])
        penalties = params["breach_penalty"] * out["terminated"].sum()
        close(
            out["reward"].sum() * params["dd_limit"] + penalties * params["dd_limit"],
            out["equity"][-1] - params["initial_balance"],
        )
