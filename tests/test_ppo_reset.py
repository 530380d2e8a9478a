"""ppo_trader.reset: markets drawn by their weights, session starts uniform over the split's starts."""

import jax
import jax.numpy as jnp
import numpy as np

import ppo_trader as pt


def test_reset_draws_markets_by_weight_and_starts_uniformly():
    M, T = 3, 400
    z = jnp.zeros((M, T))
    n_starts = np.array([5, 1, 40])
    starts = np.full((M, 40), -1, np.int32)
    for m, n in enumerate(n_starts):
        starts[m, :n] = 10 + 7 * np.arange(n) + m  # padding (-1) must never be drawn
    data = pt.MarketData(
        open=z,
        high=z,
        low=z,
        close=z + 1.0,
        atr=z + 1.0,
        rth=z > -1,
        session_end=z > 0,
        bars_to_close=jnp.zeros((M, T), jnp.int32),
        hours_to_close=z,
        features=jnp.zeros((M, T, 2)),
        starts=jnp.asarray(starts),
        n_starts=jnp.asarray(n_starts, jnp.int32),
        lo=jnp.zeros(M, jnp.int32),
        hi=jnp.full(M, T, jnp.int32),
        point_value=jnp.ones(M),
        tick_size=jnp.ones(M),
        commission=jnp.zeros(M),
        market_weights=jnp.array([0.25, 0.0, 0.75]),
    )
    params = pt.EnvParams(window=4)
    n = 40_000
    _, state = jax.jit(jax.vmap(pt.reset, in_axes=(0, None, None)))(jax.random.split(jax.random.PRNGKey(0), n), params, data)
    market, t = np.asarray(state.market), np.asarray(state.t)
    freq = np.bincount(market, minlength=M) / n
    np.testing.assert_allclose(freq, [0.25, 0.0, 0.75], atol=0.01)  # the zero-weight market is never drawn
    for m in (0, 2):
        counts = np.array([(t[market == m] == s).sum() for s in starts[m, : n_starts[m]]])
        assert counts.sum() == (market == m).sum()  # every draw is a real start of its market
        expected = counts.sum() / n_starts[m]
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    assert np.all(np.asarray(state.steps) == 0) and np.all(np.asarray(state.dir) == 0)
