"""The STATISTICS section of both trainers (the reports' summary and verdict; the same block in each): the probabilistic
and deflated Sharpe ratios against hand arithmetic and the 2014 paper's example, IQM and P(improvement) against brute
force, the coverage of the stratified bootstrap CI, degenerate inputs (one seed, constant returns) and the verdict rules.
Pure NumPy, no training."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

import ppo_trader as pt


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_psr_against_hand_arithmetic():
    # returns 0, 0, 0, 4 (%): mean 1, deviations -1, -1, -1, 3
    #   variance (ddof 0) (1 + 1 + 1 + 9) / 4 = 3, SR = 1 / sqrt(3)
    #   third moment (-1 - 1 - 1 + 27) / 4 = 6, skew = 6 / 3^1.5 = 2 / sqrt(3), so skew x SR = 2 / 3
    #   fourth moment (1 + 1 + 1 + 81) / 4 = 21, kurt = 21 / 9 = 7 / 3, so (kurt - 1) / 4 x SR^2 = (4/3) / 4 / 3 = 1 / 9
    #   variance term 1 - 2/3 + 1/9 = 4/9, its root 2/3; sqrt(n - 1) = sqrt(3)
    #   against 0: z = (1 / sqrt(3)) sqrt(3) / (2/3) = 3/2, PSR = Phi(1.5)
    #   against SR* = 1 / (2 sqrt(3)): z = (1 / (2 sqrt(3))) sqrt(3) / (2/3) = 3/4, PSR = Phi(0.75)
    returns = np.array([0.0, 0.0, 0.0, 0.04])
    assert pt.period_sharpe(returns) == pytest.approx(1 / math.sqrt(3))
    assert pt.probabilistic_sharpe_ratio(returns) == pytest.approx(normal_cdf(1.5))
    assert pt.probabilistic_sharpe_ratio(returns, 1 / (2 * math.sqrt(3))) == pytest.approx(normal_cdf(0.75))
    # a benchmark equal to the Sharpe ratio itself: z = 0, PSR = 1/2; the mirror series loses: Phi(-1.5)
    assert pt.probabilistic_sharpe_ratio(returns, 1 / math.sqrt(3)) == pytest.approx(0.5)
    assert pt.probabilistic_sharpe_ratio(-returns) == pytest.approx(normal_cdf(-1.5))


def test_expected_max_sharpe_and_dsr_of_the_2014_paper():
    # Bailey and Lopez de Prado 2014, numerical example: N = 100 trials whose annualised Sharpe ratios have variance 1/2,
    # 250 days a year, so the daily variance is 0.5 / 250; the paper finds SR0 = 0.1132 a day. Two trial Sharpe ratios
    # a -+ d have a variance (ddof 1) of (2d)^2 / 2 = 2 d^2, so d = sqrt(0.5 / 250 / 2).
    d = math.sqrt(0.5 / 250 / 2)
    trials = [0.05 - d, 0.05 + d]
    assert np.var(trials, ddof=1) == pytest.approx(0.5 / 250)
    assert pt.expected_max_sharpe(trials, 100) == pytest.approx(0.1132, abs=5e-5)
    # the paper's DSR 0.9004: SR = 2.5 / sqrt(250), T = 1250 days, skew -3, kurt 10, through the PSR formula
    sharpe, sr0 = 2.5 / math.sqrt(250), pt.expected_max_sharpe(trials, 100)
    z = (sharpe - sr0) * math.sqrt(1250 - 1) / math.sqrt(1 + 3 * sharpe + (10 - 1) / 4 * sharpe**2)
    assert normal_cdf(z) == pytest.approx(0.9004, abs=5e-5)


def test_dsr_is_the_psr_against_sr0_and_one_trial_deflates_nothing():
    returns = np.array([0.0, 0.0, 0.0, 0.04])
    # N = 1: SR0 = 0 (the formula's Phi^-1(0) is -inf), so the DSR is the PSR against 0: Phi(1.5), by the arithmetic
    # of the PSR test
    assert pt.expected_max_sharpe([0.3], 1) == 0.0
    assert pt.deflated_sharpe_ratio(returns, [0.3], 1) == pytest.approx(normal_cdf(1.5))
    # N = 2, trial Sharpe ratios 0 and 0.2: sqrt(V) = sqrt(0.02); Phi^-1(1 - 1/2) = 0, so
    # SR0 = sqrt(0.02) gamma Phi^-1(1 - 1/(2e))
    sr0 = math.sqrt(0.02) * np.euler_gamma * stats.norm.ppf(1 - 1 / (2 * math.e))
    assert pt.expected_max_sharpe([0.0, 0.2], 2) == pytest.approx(sr0)
    # z = (SR - SR0) sqrt(3) / (2/3) with SR = 1 / sqrt(3) (the hand arithmetic above)
    expected = normal_cdf((1 / math.sqrt(3) - sr0) * math.sqrt(3) / (2 / 3))
    assert pt.deflated_sharpe_ratio(returns, [0.0, 0.2], 2) == pytest.approx(expected)
    # more trials, more deflation; several trials with one known Sharpe ratio: V unknown, no DSR
    assert pt.deflated_sharpe_ratio(returns, [0.0, 0.2], 50) < pt.deflated_sharpe_ratio(returns, [0.0, 0.2], 2)
    assert pt.deflated_sharpe_ratio(returns, [0.3], 8) is None
    assert pt.deflated_sharpe_ratio(returns, [0.3, None], 8) is None


def test_iqm_against_brute_force():
    rng = np.random.default_rng(3)
    for n in range(1, 14):
        values = rng.normal(size=n)
        cut = n // 4  # rliable's IQM (scipy.stats.trim_mean(x, 0.25)) cuts int(n / 4) runs at each end
        brute = np.sort(values)[cut : n - cut].mean()
        assert pt.interquartile_mean(values) == pytest.approx(brute), n
    assert pt.interquartile_mean(np.arange(8.0)) == pytest.approx(np.mean([2, 3, 4, 5]))


def brute_improvement(runs_x, runs_y) -> float:
    """P(X > Y) averaged over tasks by comparing every pair of runs of each task, ties 1/2."""
    per_task = []
    for x, y in zip(runs_x, runs_y):
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x, y)]
        per_task.append(np.mean(wins))
    return float(np.mean(per_task))


def test_probability_of_improvement_against_brute_force_and_mann_whitney():
    rng = np.random.default_rng(4)
    for _ in range(20):
        tasks = rng.integers(1, 4)
        runs_x = rng.integers(0, 5, size=(tasks, rng.integers(1, 7))).astype(float)  # small integers: many ties
        runs_y = rng.integers(0, 5, size=(tasks, rng.integers(1, 9))).astype(float)
        assert pt.probability_of_improvement(runs_x, runs_y)["value"] == pytest.approx(brute_improvement(runs_x, runs_y))
        u_statistic = stats.mannwhitneyu(runs_x[0], runs_y[0]).statistic  # U of the first sample, ties 1/2
        assert pt.task_improvement(runs_x[0], runs_y[0]) == pytest.approx(u_statistic / (runs_x.shape[1] * runs_y.shape[1]))
    # identical runs: 1/2 (rliable's special case falls out of the formula)
    same = rng.normal(size=(2, 5))
    assert pt.probability_of_improvement(same, same)["value"] == pytest.approx(0.5)


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    # 300 experiments, each 2 folds x 10 seeds from N(0, 1) and N(1, 1): the pooled mean's true value is 0.5. A 95%
    # interval covering with probability p gives a coverage with binomial sd sqrt(p (1 - p) / 300) = 0.013 at p = 0.95;
    # the percentile interval from 20 runs covers a bit less than 95% (about 0.93: it uses z and the ddof-0 spread where
    # Student's t and ddof 1 would be exact; 0.91 with this seed), so [0.88, 0.99] is 3 sd or more from 0.93 and 0.95.
    # The seed is fixed, so the count is the same on every run.
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(300):
        runs = rng.normal(size=(2, 10)) + np.array([[0.0], [1.0]])
        result = pt.estimate_with_ci(runs, np.mean)
        low, high = result["ci"]
        assert low <= result["value"] <= high
        covered += low <= 0.5 <= high
    assert 0.88 <= covered / 300 <= 0.99, covered
    # P(improvement) of a run from N(1, 1) over one from N(0, 1) is Phi(1 / sqrt(2)) = 0.760: its interval covers it too
    covered = 0
    for _ in range(100):
        improvement = pt.probability_of_improvement(rng.normal(size=(1, 10)) + 1, rng.normal(size=(1, 20)))
        covered += improvement["ci"][0] <= normal_cdf(1 / math.sqrt(2)) <= improvement["ci"][1]
    assert 0.8 <= covered / 100 <= 1.0, covered  # 0.89 with this seed; binomial sd at 0.93: 0.026, the band 5 sd below


def test_degenerate_inputs_give_finite_numbers_or_null_never_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN arithmetic on the way either
        one_seed = pt.run_summary({"total_return": np.array([[0.1]]), "sharpe": np.array([[0.5]])})
        assert one_seed["total_return"]["mean"] == {"value": 0.1, "ci": None}
        assert one_seed["total_return"]["std"] == {"value": None, "ci": None}
        assert one_seed["sharpe"]["iqm"]["value"] == 0.5
        constant = pt.run_summary({"total_return": np.full((2, 4), 0.03)})
        for statistic in ("mean", "median", "iqm"):
            assert constant["total_return"][statistic]["value"] == pytest.approx(0.03)
            assert constant["total_return"][statistic]["ci"] == pytest.approx([0.03, 0.03])
        assert constant["total_return"]["std"]["value"] == 0.0
        assert pt.probability_of_improvement(np.full((1, 4), 1.0), np.full((1, 4), 1.0)) == {"value": 0.5, "ci": [0.5, 0.5]}
        assert pt.probability_of_improvement([[1.0]], [[0.0]]) == {"value": 1.0, "ci": None}
        for flat in (np.zeros(30), np.full(30, 0.01), np.array([0.02]), np.array([])):
            assert pt.period_sharpe(flat) is None
            assert pt.probabilistic_sharpe_ratio(flat) is None
        # 0.5, 0.5, 0.5, 1.5: SR = 0.75 / 0.433 = sqrt(3), skew = 2 / sqrt(3), kurt = skew^2 + 1 = 7/3 (two values), so
        # the variance term 1 - 2 + (4/3) / 4 x 3 is 0: no PSR (Phi of +inf would read as certainty)
        assert pt.probabilistic_sharpe_ratio(np.array([0.5, 0.5, 0.5, 1.5]) / 100) is None
        assert pt.probabilistic_sharpe_ratio([0.01, -0.01]) == pytest.approx(0.5)  # SR 0, term 1: Phi(0)
        sharpe = pt.sharpe_summary([np.zeros(30), np.full(30, 0.01)], [None, None], 2)
        assert sharpe["probabilistic_sharpe"] is None and sharpe["deflated_sharpe"] is None
        text = pt.verdict({"random": pt.probability_of_improvement([[1.0]], [[0.0]])}, None, 1, 1)
        assert text.startswith("no evidence of an edge over random") and "n/a" in text and "no CI" in text
    json.dumps([one_seed, constant, sharpe, text], allow_nan=False)  # strict JSON: would raise on NaN or inf


def summary_and_verdict(rng, trained_mean: float, period_mean: float, num_seeds: int = 10) -> str:
    """The verdict for runs of the trained policy (total return N(trained_mean, 0.1) per seed) against 100 random
    runs (N(0, 0.1)) and a buy-and-hold run of 0.05, the trained policy's per-session returns N(period_mean, 0.01)."""
    trained = rng.normal(trained_mean, 0.1, size=(1, num_seeds))
    improvements = {
        "random": pt.probability_of_improvement(trained, rng.normal(0.0, 0.1, size=(1, 100))),
        "buy-and-hold": pt.probability_of_improvement(trained, np.full((1, num_seeds), 0.05)),
    }
    period_returns = [rng.normal(period_mean, 0.01, size=250) for _ in range(num_seeds)]
    sharpe = pt.sharpe_summary(period_returns, [pt.period_sharpe(r) for r in period_returns], num_seeds)
    return pt.verdict(improvements, sharpe["deflated_sharpe"], num_seeds, num_seeds)


def test_verdict_says_edge_only_for_a_clear_edge():
    rng = np.random.default_rng(6)
    clear = summary_and_verdict(rng, trained_mean=1.0, period_mean=0.004)  # per-session Sharpe about 0.4: DSR near 1
    assert clear.startswith("edge over random: P(improvement) 1.00 [1.00, 1.00]; edge over buy-and-hold"), clear
    for _ in range(20):  # no signal: the trained policy is another random policy
        noise = summary_and_verdict(rng, trained_mean=0.0, period_mean=0.0)
        assert "no evidence of an edge over random" in noise and "no evidence of an edge over buy-and-hold" in noise, noise
    # beating random without a deflated Sharpe above 0.95 (a zero-mean equity curve) is no evidence either
    lucky = summary_and_verdict(rng, trained_mean=1.0, period_mean=0.0)
    assert lucky.startswith("no evidence of an edge over random: P(improvement) 1.00"), lucky
    # three unanimous seeds are fewer than an edge needs, whatever the numbers
    few = summary_and_verdict(rng, trained_mean=1.0, period_mean=0.004, num_seeds=3)
    assert few.startswith("no evidence of an edge over random") and "fewer than the 5" in few, few


def test_both_trainers_carry_the_same_statistics():
    """erl_trader.py holds the same STATISTICS block as ppo_trader.py (each file stays standalone), so both reports
    compute the same numbers from the same runs; the tests above check it once."""
    from conftest import ROOT

    def section(script: str) -> str:
        text = (ROOT / script).read_text()
        return text[text.index("# ---- STATISTICS ----") : text.index("# ---- BACKTEST ----")]

    assert section("erl_trader.py") == section("ppo_trader.py")
