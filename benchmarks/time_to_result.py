"""Time to a result: the wall-clock until the best-by-validation policy's greedy test-split return reaches a share of
the signal oracle's, ppo_trader against stable-baselines3 PPO, on the PPO learning test's planted-signal data.

Both trainers get the same PPO and network sizes (ppo_trader's defaults: 64 envs x 128 steps, 4 epochs x 4
minibatches, separate 2x128 tanh actor and critic, observation normalisation, the learning rate annealed to 0 over the
budget) and the learning test's recipe (window 8, 2,000,000 env steps per seed). Both are checked at the same cadence,
every 81,920 env steps (ppo_trader: every chunk of 10 updates; SB3: every 10 rollouts), with the same rules: each
seed's greedy policy plays ppo_trader's validation backtest, the best so far is kept, and the kept policy's greedy
test-split return (ppo_trader's test backtest, the yardstick of the learning test) is compared with the oracle's. SB3
trains on tests/ppo_reference.py (the NumPy reference of the same env rules) wrapped as a gymnasium env; its
weights and VecNormalize statistics are copied into ppo_trader's network for the backtests, so both play the same
backtest code. The clock counts what a user waits for (set-up, compilation, training and validation) and stops
while the test-split check runs (a user would not run it at every check).

    python benchmarks/time_to_result.py              # run from benchmarks/run.py; standalone: this section only
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import data_prep as dp  # noqa: E402
import erl_trader as et  # noqa: E402
import ppo_trader as pt  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

PPO_SHARE = 0.8  # the PPO learning test's bar: 80% of the oracle's test return
ERL_SHARE = 0.7  # the ERL learning test's goal
BASE_SEED = 1  # the learning test's run seeds start at 1
RESULTS = ROOT / "benchmarks" / "results"
CHECK_EVERY_UPDATES = 10  # one ppo_trader chunk: 10 updates x 64 envs x 128 steps = 81,920 env steps


class Clock:
    """Wall-clock that can be paused (while the test-split check runs)."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause_for(self, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        self.paused += time.perf_counter() - started
        return result


def ppo_problem(workdir: Path, total_timesteps: int) -> dict:
    """The PPO learning test's data (synthetic intraday bars, data seed 0, signal strength 2), its recipe's Args, the
    validation and test backtests and the oracle's test return (the learning test's, via results.ppo_oracle)."""
    from results import ppo_oracle

    data = workdir / "syn.npz"
    assert dp.main(["synthetic-intraday", "--out", str(data), "--days", "60", "--seed", "0", "--signal-strength", "2"]) == 0
    args = pt.Args(
        data=str(data),
        window=8,
        total_timesteps=total_timesteps,
        chunk_updates=CHECK_EVERY_UPDATES,
        eval_every=1,
        seed=BASE_SEED,
    )
    datasets, info = pt.load_data(args)
    env_params = pt.env_params_from_args(args)
    return dict(
        args=args,
        datasets=datasets,
        info=info,
        env_params=env_params,
        val_bt=pt.make_backtest(env_params, datasets["val"]),
        test_bt=pt.make_backtest(env_params, datasets["test"]),
        oracle_test=ppo_oracle(data, args.window),
    )


def split_return(backtest, policy, policy_args) -> float:
    """A policy's final equity change on market 0 of a backtest split (the learning test's yardstick)."""
    return float(pt.play_one(backtest, policy, policy_args, 0, jax.random.PRNGKey(0))["equity"][-1])


class BestByValidation:
    """One seed's model selection at every check: `validate(policy_args)` -> validation return; the best so far is kept
    and `test_share(policy_args)` (the clock paused) gives its share of the oracle's test return. Records (elapsed
    seconds, env steps, kept policy's share) per check."""

    def __init__(self, clock: Clock, validate, test_share, goal: float):
        self.clock, self.validate, self.test_share, self.goal = clock, validate, test_share, goal
        self.best_val, self.share, self.checks = -np.inf, None, []

    def check(self, policy_args, env_steps: int) -> None:
        val = self.validate(policy_args)
        if val > self.best_val:
            self.best_val = val
            self.share = self.clock.pause_for(self.test_share, policy_args)
        self.checks.append((self.clock.elapsed(), env_steps, self.share))

    def reached(self) -> bool:
        return first_reached(self.checks, self.goal) is not None


def ppo_selection(problem: dict, network, clock: Clock, seed_index: int) -> BestByValidation:
    """ppo_trader's selection rule (greedy validation return, the random key of --seed + k) for (params, norm)."""
    p = problem

    def validate(policy_args) -> float:
        return pt.validation_return(p["args"], network, *policy_args, p["env_params"], p["val_bt"], seed_index)

    def test_share(policy_args) -> float:
        return split_return(p["test_bt"], pt.greedy_policy(network), policy_args) / p["oracle_test"]

    return BestByValidation(clock, validate, test_share, PPO_SHARE)


def first_reached(checks: list, goal: float) -> Optional[tuple]:
    """(seconds, env steps) of the first check whose kept policy reached `goal` of the oracle, or None."""
    return next(((seconds, steps) for seconds, steps, share in checks if share is not None and share >= goal), None)


def ppo_trader_run(problem: dict, num_seeds: int) -> list:
    """ppo_trader's seeds BASE_SEED.. in one compiled program (as `ppo_trader.py --num-seeds N` runs them), stopped when
    every seed's kept policy has reached PPO_SHARE or at the budget; returns each seed's BestByValidation."""
    clock = Clock()
    args = dataclasses.replace(problem["args"], num_seeds=num_seeds)
    mesh = pt.make_mesh(args)
    train_data = problem["datasets"]["train"]
    init, train_chunk, num_updates, network = pt.make_train(args, problem["env_params"], train_data, mesh)
    init = jax.jit(init)
    rngs = [jax.random.PRNGKey(args.seed + k) for k in range(num_seeds)]
    runner = jax.tree.map(lambda *x: jax.numpy.stack(x), *[init(key, None, train_data) for key in rngs])
    compiled = pt.compile_chunk(train_chunk, runner, train_data, mesh)
    seeds = [ppo_selection(problem, network, clock, k) for k in range(num_seeds)]
    steps_per_chunk = args.chunk_updates * args.num_envs * args.num_steps
    for chunk in range(num_updates // args.chunk_updates):
        runner, metrics = compiled(runner, train_data)
        jax.block_until_ready(metrics)
        for seed, (params, norm) in zip(seeds, pt.seed_policies(runner)):
            if not seed.reached():
                seed.check((params, norm), (chunk + 1) * steps_per_chunk)
        if all(seed.reached() for seed in seeds):
            break
    return seeds


def sb3_policy_params(model) -> dict:
    """An SB3 MlpPolicy (separate 2-layer pi and vf nets) as ppo_trader's ActorCritic parameters."""
    weights = {name: value.detach().cpu().numpy() for name, value in model.policy.state_dict().items()}

    def dense(name: str) -> dict:
        return {"kernel": weights[f"{name}.weight"].T, "bias": weights[f"{name}.bias"]}

    return {
        "params": {
            "actor_hidden_0": dense("mlp_extractor.policy_net.0"),
            "actor_hidden_1": dense("mlp_extractor.policy_net.2"),
            "policy_head": dense("action_net"),
            "critic_hidden_0": dense("mlp_extractor.value_net.0"),
            "critic_hidden_1": dense("mlp_extractor.value_net.2"),
            "value_head": dense("value_net"),
        }
    }


def sb3_ppo_kwargs(args: "pt.Args", torch, seed: int, anneal: bool) -> dict:
    """stable-baselines3 PPO's arguments for ppo_trader's sizes (`args`): rollout, minibatches, epochs, losses and the
    two separate 2-layer tanh MLPs; the learning rate annealed to 0 over the budget when `anneal`."""
    lr = args.learning_rate
    return dict(
        n_steps=args.num_steps,
        batch_size=args.num_envs * args.num_steps // args.num_minibatches,
        n_epochs=args.update_epochs,
        learning_rate=(lambda remaining: lr * remaining) if anneal else lr,
        gamma=args.gamma,
        gae_lambda=args.gae_lambda,
        clip_range=args.clip_coef,
        clip_range_vf=args.clip_coef,
        ent_coef=args.ent_coef,
        vf_coef=args.vf_coef,
        max_grad_norm=args.max_grad_norm,
        policy_kwargs=dict(net_arch=dict(pi=[args.hidden] * 2, vf=[args.hidden] * 2), activation_fn=torch.nn.Tanh),
        device="cpu",
        seed=seed,
        verbose=0,
    )


def sb3_ppo_run(problem: dict, peers: dict, seed_index: int) -> BestByValidation:
    """One stable-baselines3 PPO run with ppo_trader's sizes and schedule on the NumPy reference env, checked every
    81,920 env steps like ppo_trader; stops when its kept policy reaches PPO_SHARE or at the budget."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from run import ref_gym_env

    clock = Clock()
    args = problem["args"]
    torch = peers["torch"]
    network = pt.make_network(args)
    seed = ppo_selection(problem, network, clock, seed_index)
    env_class = ref_gym_env(peers, args, problem["env_params"], problem["datasets"]["train"], problem["info"])
    venv = VecNormalize(DummyVecEnv([env_class] * args.num_envs), norm_obs=True, norm_reward=False)
    check_every = CHECK_EVERY_UPDATES * args.num_envs * args.num_steps

    def check(model) -> None:
        rms = venv.obs_rms
        norm = pt.ObsNorm(
            mean=jax.numpy.asarray(rms.mean, np.float32),
            var=jax.numpy.asarray(rms.var, np.float32),
            count=jax.numpy.float32(rms.count),
        )
        params = sb3_policy_params(model)
        if not seed.checks:  # the copy is SB3's policy: the same action probabilities on normalised observations
            obs = np.asarray(norm(jax.random.normal(jax.random.PRNGKey(0), (32, norm.mean.shape[0])) * 3 + norm.mean))
            probs = model.policy.get_distribution(torch.as_tensor(obs)).distribution.probs.detach().numpy()
            np.testing.assert_allclose(jax.nn.softmax(network.apply(params, obs)[0]), probs, atol=1e-4)
        seed.check((params, norm), model.num_timesteps)

    class Check(BaseCallback):
        def _on_rollout_start(self) -> None:  # after the previous rollout's training step
            if self.num_timesteps and self.num_timesteps % check_every == 0:
                check(self.model)

        def _on_step(self) -> bool:
            return not seed.reached()

    model = PPO("MlpPolicy", venv, **sb3_ppo_kwargs(args, torch, args.seed + seed_index, anneal=args.anneal_lr))
    per_update = args.num_envs * args.num_steps  # ppo_trader's budget: whole chunks of updates
    model.learn(
        math.ceil(args.total_timesteps / per_update / args.chunk_updates) * args.chunk_updates * per_update, callback=Check()
    )
    if not seed.reached():
        check(model)  # the end of the budget
    return seed


def seconds_text(value: Optional[float]) -> str:
    return "not reached" if value is None else f"{value:,.0f} s"


def run_summary(seeds: list) -> dict:
    """Per seed: first (seconds, env steps) at its goal, or None; the best share its kept policy had; the seconds spent."""
    return dict(
        reached=[first_reached(seed.checks, seed.goal) for seed in seeds],
        best_share=[max((s for _, _, s in seed.checks if s is not None), default=None) for seed in seeds],
        spent=[seed.checks[-1][0] if seed.checks else None for seed in seeds],
        spent_steps=[seed.checks[-1][1] if seed.checks else None for seed in seeds],
    )


def ppo_section(peers: Optional[dict], num_seeds: int = 4, total_timesteps: int = 2_000_000) -> tuple[list, dict]:
    """Runs ppo_trader (1 seed, then `num_seeds` in one program) and, with the peers, SB3 PPO (`num_seeds` runs back
    to back); returns (markdown lines, the figures)."""
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as workdir:
        problem = ppo_problem(Path(workdir), total_timesteps)
        log(f"time to result: oracle test return {problem['oracle_test']:+,.0f}")
        ours_one = run_summary(ppo_trader_run(problem, 1))
        log(f"ppo_trader 1 seed: {ours_one}")
        ours_many = run_summary(ppo_trader_run(problem, num_seeds))
        log(f"ppo_trader {num_seeds} seeds in one program: {ours_many}")
        theirs = None
        if peers:
            runs = []
            for k in range(num_seeds):
                runs.append(sb3_ppo_run(problem, peers, k))
                log(f"SB3 PPO seed {k}: {run_summary(runs[-1:])}")
            theirs = run_summary(runs)
    figures = dict(
        oracle_test=problem["oracle_test"], ppo_trader_1=ours_one, ppo_trader_n=ours_many, sb3=theirs, num_seeds=num_seeds
    )
    return ppo_markdown(figures), figures


def seconds_per_result(summary: dict, program_seconds: Optional[float] = None) -> Optional[float]:
    """Wall-clock per seed that reached the share: the runs' total time (`program_seconds` for seeds trained in one
    program, else the sum of the runs back to back) over the number of seeds that reached it; None if none did."""
    reached = sum(r is not None for r in summary["reached"])
    total = program_seconds if program_seconds is not None else sum(summary["spent"])
    return total / reached if reached else None


def summary_rows(label: str, summary: dict) -> list:
    """Markdown rows of a run_summary, one per seed (seed numbers from BASE_SEED)."""
    out = []
    columns = zip(summary["reached"], summary["best_share"], summary["spent"], summary["spent_steps"])
    for k, (reached, best, spent, spent_steps) in enumerate(columns):
        steps = "-" if reached is None else f"{reached[1]:,}"
        out.append(
            f"| {label} | {BASE_SEED + k} | {seconds_text(reached and reached[0])} | {steps} | "
            f"{'-' if best is None else f'{best:.2f}'} | {spent:,.0f} s ({spent_steps:,}) |"
        )
    return out


def ppo_markdown(fig: dict) -> list:
    """The section's markdown: per-run rows and the ratios the targets name."""
    n = fig["num_seeds"]

    md = [
        "## Time to a result (PPO, 80% of the oracle)",
        "",
        f"The PPO learning test's planted-signal data (synthetic intraday, data seed 0); oracle test return "
        f"{fig['oracle_test']:+,.0f}. " + __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "| trainer | seed | time to 80% | env steps | best share | time spent (env steps) |",
        "|---|---|---|---|---|---|",
    ]
    md += summary_rows("ppo_trader, 1 seed", fig["ppo_trader_1"])
    md += summary_rows(f"ppo_trader, {n} seeds in one program", fig["ppo_trader_n"])
    if fig["sb3"]:
        md += summary_rows("stable-baselines3 PPO, runs back to back", fig["sb3"])
    ours_1, ours_n = fig["ppo_trader_1"]["reached"][0], fig["ppo_trader_n"]
    ours_per_result = seconds_per_result(ours_n, max(ours_n["spent"]))
    reached_n = sum(r is not None for r in ours_n["reached"])
    md += [
        "",
        f"- ppo_trader, seed {BASE_SEED} alone: {seconds_text(ours_1 and ours_1[0])} to 80%. {n} seeds in one program: "
        f"{reached_n} of {n} reached 80% in {max(ours_n['spent']):,.0f} s, "
        + ("-" if ours_per_result is None else f"{ours_per_result:,.0f} s per seed that reached it")
        + ".",
    ]
    if fig["sb3"]:
        sb3 = fig["sb3"]
        sb3_1 = sb3["reached"][0] and sb3["reached"][0][0]
        sb3_per_result = seconds_per_result(sb3)
        md += [
            f"- SB3 PPO, seed {BASE_SEED}: {seconds_text(sb3_1)} to 80%. {n} runs back to back: "
            f"{sum(r is not None for r in sb3['reached'])} of {n} reached 80% in {sum(sb3['spent']):,.0f} s, "
            + ("-" if sb3_per_result is None else f"{sb3_per_result:,.0f} s per seed that reached it")
            + "."
        ]
        if ours_1 and sb3_1:
            md += [f"- Ratio, seed {BASE_SEED} alone (target >= 10x): {sb3_1 / ours_1[0]:.1f}x."]
        if ours_per_result and sb3_per_result:
            md += [
                f"- Ratio of the wall-clock per seed that reached 80%, {n} seeds in one program against {n} runs back "
                f"to back (target >= 20x): {sb3_per_result / ours_per_result:.1f}x."
            ]
    return md + [""]


# ---- ERL: erl_trader against stable-baselines3 TD3 ----
def erl_problem(workdir: Path, generations: int) -> dict:
    """The ERL learning test's data (synthetic daily, data seed 0) and recipe, the validation and test backtests, and
    the oracle's test return (tests/test_erl_learning.py's rule_returns)."""
    from test_erl_learning import DATA, FLAGS, rule_returns

    data = workdir / "syn.npz"
    assert dp.main(["synthetic-daily", "--out", str(data), *DATA, "--seed", "0"]) == 0
    # a check every chunk (the recipe validates every 2 generations); a smaller budget only checks the plumbing
    flags = [*FLAGS, "--chunk-generations", "2"]
    flags[flags.index("--generations") + 1] = str(generations)
    args = et.parse_args(["--data", str(data), *flags])
    datasets, info = et.load_data(args)
    env_params = et.env_params_from_args(args)
    return dict(
        args=args,
        datasets=datasets,
        info=info,
        env_params=env_params,
        val_bt=et.make_backtest(env_params, et.split_days(info, "val")),
        test_bt=et.make_backtest(env_params, et.split_days(info, "test")),
        oracle_test=rule_returns(data, FLAGS)["oracle"]["test"],
    )


def erl_selection(problem: dict, policy, clock: Clock) -> BestByValidation:
    """erl_trader's selection rule (the validation split's total return, the random key of --seed) for a backtest
    `policy` whose policy_args are parameters."""
    p = problem

    def split_total(backtest, split: str, params, key) -> float:
        return float(np.asarray(backtest(policy, params, key, p["datasets"][split])["equity"])[-1] - 1.0)

    def validate(params) -> float:
        return split_total(p["val_bt"], "val", params, jax.random.PRNGKey(p["args"].seed))

    def test_share(params) -> float:
        return split_total(p["test_bt"], "test", params, jax.random.PRNGKey(0)) / p["oracle_test"]

    return BestByValidation(clock, validate, test_share, ERL_SHARE)


def erl_trader_run(problem: dict) -> BestByValidation:
    """erl_trader's learning-test recipe, one seed (--seed 1), as `erl_trader.py` runs it: every 2 generations the
    champion and the TD3 actor are validated and the best is kept; stops when the kept policy reaches ERL_SHARE or
    after the recipe's 24 generations."""
    clock = Clock()
    args, p = problem["args"], problem
    mesh = et.make_mesh(args)
    inv = tuple(p["info"]["inv"])
    actor = et.Actor(args, inv)
    init, chunk, *_ = et.make_erl(args, p["env_params"], p["datasets"]["train"], len(inv), inv, mesh)
    runner = et.stack_seeds([init(jax.random.PRNGKey(args.seed))])
    runner = et.place(runner, et.runner_shardings(runner, mesh))
    train_data = et.place(p["datasets"]["train"], NamedSharding(mesh, PartitionSpec()))
    compiled = et.compile_chunk(chunk, runner, train_data, mesh)
    seed = erl_selection(problem, et.actor_policy(actor), clock)
    steps_per_chunk = et.transitions_per_generation(args) * args.chunk_generations
    for chunk_index in range(args.generations // args.chunk_generations):
        runner, metrics = compiled(runner, train_data)
        jax.block_until_ready(metrics)
        champions, learners = et.seed_policies(runner)
        for params in (champions[0], learners[0]):
            seed.check(params, (chunk_index + 1) * steps_per_chunk)
        if seed.reached():
            break
    return seed


def reference_daily_data(data: "et.MarketData") -> dict:
    """erl_trader's MarketData (one split's bounds) as tests/erl_reference.py's data dict."""
    import erl_reference as ref

    arrays = {name: np.asarray(getattr(data, name), np.float64) for name in ("open", "high", "low", "close", "features")}
    investable = np.zeros(arrays["close"].shape[1], bool)
    investable[np.asarray(data.inv)] = True
    return ref.make_data(
        arrays["open"],
        arrays["high"],
        arrays["low"],
        arrays["close"],
        valid=np.asarray(data.valid),
        investable=investable,
        features=arrays["features"],
        feature_valid=np.asarray(data.feature_valid),
    )


def reference_daily_env(peers: dict, problem: dict):
    """tests/erl_reference.py (the NumPy reference of erl_trader's env rules) as a gymnasium env on the training split:
    the actor's observation flattened, actions in [-1, 1]^(n x 2) mapped as erl_trader maps [0, 1] (coefficient,
    sale target), episodes of trading + settlement days from a random first decision day, as in training."""
    import erl_reference as ref

    gym, env_params, train = peers["gymnasium"], problem["env_params"], problem["datasets"]["train"]
    data = reference_daily_data(train)
    params = {name: getattr(env_params, name) for name in ref.default_params()}
    n_inv, window = len(problem["info"]["inv"]), env_params.window
    obs_dim = int(np.prod(np.asarray(et.get_obs(jax.numpy.int32(window - 1), env_params, train)).shape))
    episode_days = env_params.trading_days + env_params.settlement_days
    first, end = int(train.lo), int(train.hi) - episode_days  # erl_trader's sample_start: randint(lo, hi - episode)

    class ReferenceDailyEnv(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (n_inv * 2,), np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.state = ref.reset_state(data, params, int(self.np_random.integers(first, end)))
            return self.obs(), {}

        def obs(self) -> np.ndarray:
            return ref.observation(data, self.state.t, window).astype(np.float32).reshape(-1)

        def step(self, action):
            unit = (np.asarray(action, np.float64).reshape(n_inv, 2) + 1.0) / 2.0
            coef = unit[:, 0] * env_params.coef_max
            target = env_params.target_min + unit[:, 1] * (env_params.target_max - env_params.target_min)
            self.state, reward, done, _ = ref.step_state(self.state, coef, target, data, params)
            return self.obs(), float(reward), bool(done), False, {}

    return ReferenceDailyEnv


def td3_actor_policy(n_inv: int):
    """A backtest policy playing an SB3 TD3 actor (Linear-ReLU-Linear-ReLU-Linear-tanh on the flattened
    observation); policy_args = its [(kernel, bias)] layers."""

    def policy(layers, key, obs, t):
        x = obs.reshape(-1)
        for kernel, bias in layers[:-1]:
            x = jax.nn.relu(x @ kernel + bias)
        kernel, bias = layers[-1]
        return (jax.numpy.tanh(x @ kernel + bias).reshape(n_inv, 2) + 1.0) / 2.0

    return policy


def td3_layers(model) -> list:
    """The SB3 TD3 actor's layers as [(kernel, bias)] (float32 numpy)."""
    weights = {name: value.detach().cpu().numpy() for name, value in model.actor.mu.state_dict().items()}
    indices = sorted({int(name.split(".")[0]) for name in weights})
    return [(weights[f"{i}.weight"].T, weights[f"{i}.bias"]) for i in indices]


def td3_run(problem: dict, peers: dict, cap_seconds: float, **td3_kwargs) -> BestByValidation:
    """stable-baselines3 TD3 (its defaults unless `td3_kwargs`; Gaussian action noise 0.1) on the reference env,
    checked every erl_trader check's worth of env steps with erl_trader's backtests; stops at ERL_SHARE or the cap."""
    from stable_baselines3 import TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise

    clock = Clock()
    args, n_inv = problem["args"], len(problem["info"]["inv"])
    policy = td3_actor_policy(n_inv)
    seed = erl_selection(problem, policy, clock)
    env = reference_daily_env(peers, problem)()
    check_every = et.transitions_per_generation(args) * args.chunk_generations
    noise = NormalActionNoise(np.zeros(2 * n_inv), 0.1 * np.ones(2 * n_inv))
    model = TD3("MlpPolicy", env, action_noise=noise, device="cpu", seed=args.seed, verbose=0, **td3_kwargs)

    def check() -> None:
        layers = td3_layers(model)
        if not seed.checks:  # the copy is SB3's actor
            obs, _ = env.reset(seed=0)
            expected = model.actor(peers["torch"].as_tensor(obs[None])).detach().numpy().reshape(n_inv, 2)
            np.testing.assert_allclose(policy(layers, None, obs, None) * 2.0 - 1.0, expected, atol=1e-4)
        seed.check(layers, model.num_timesteps)

    class Check(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % check_every == 0:
                check()
            return not seed.reached() and clock.elapsed() < cap_seconds

    model.learn(10**9, callback=Check())
    if not seed.reached():
        check()  # at the cap
    return seed


def erl_section(peers: Optional[dict], cap_seconds: float = 600.0, generations: int = 24) -> tuple[list, dict]:
    """Runs erl_trader (the learning test's recipe, seed 1) and, with the peers, SB3 TD3 under a time cap (its
    defaults, and its gradient steps once per episode instead of per env step); returns (markdown lines, figures)."""
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    td3_settings = {"defaults (learning_starts 100, train_freq 1)": {},
                    "train_freq 25 (an episode), gradient_steps 25": dict(train_freq=25, gradient_steps=25)}
    with tempfile.TemporaryDirectory() as workdir:
        problem = erl_problem(Path(workdir), generations)
        log(f"time to result (ERL): oracle test return {problem['oracle_test']:+.3f}")
        ours = run_summary([erl_trader_run(problem)])
        log(f"erl_trader: {ours}")
        theirs = {}
        for label, kwargs in (td3_settings.items() if peers else ()):
            theirs[label] = run_summary([td3_run(problem, peers, cap_seconds, **kwargs)])
            log(f"SB3 TD3 {label}: {theirs[label]}")
    figures = dict(oracle_test=problem["oracle_test"], erl_trader=ours, td3=theirs, cap_seconds=cap_seconds)
    return erl_markdown(figures), figures


def erl_markdown(fig: dict) -> list:
    md = [
        "## Time to a result (ERL, 70% of the oracle)",
        "",
        f"The ERL learning test's planted-signal data (synthetic daily, 10 stocks, data seed 0); oracle test return "
        f"{fig['oracle_test']:+.1%}. erl_trader: the learning test's recipe (pop 8, 24 generations, 256 TD3 updates a "
        "generation, critic warm-up 4), seed 1; every 2 generations its champion and TD3 actor play the validation "
        "split and the best is kept. SB3 TD3 (torch CPU, MlpPolicy 400-300, Gaussian action noise 0.1) trains on "
        "tests/erl_reference.py (the NumPy reference of the same env rules) wrapped as a gymnasium env (the actor's "
        "observation flattened), is checked at the same cadence in env steps, and its actor is played by "
        f"erl_trader's backtests; it stops at 70% or after {fig['cap_seconds'] / 60:g} minutes.",
        "",
        "| trainer | seed | time to 70% | env steps | best share | time spent (env steps) |",
        "|---|---|---|---|---|---|",
    ]
    md += summary_rows("erl_trader", fig["erl_trader"])
    for label, summary in fig["td3"].items():
        md += summary_rows(f"stable-baselines3 TD3, {label}", summary)
    return md + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-peers", action="store_true", help="the JAX trainers only")
    ap.add_argument("--sections", nargs="+", choices=("ppo", "erl"), default=["ppo", "erl"])
    ap.add_argument("--num-seeds", type=int, default=4, help="PPO: seeds in one program, and SB3 runs back to back")
    ap.add_argument("--total-timesteps", type=int, default=2_000_000, help="PPO budget per seed (small: a plumbing check)")
    ap.add_argument("--erl-generations", type=int, default=24, help="ERL budget (small: a plumbing check)")
    ap.add_argument("--td3-cap-minutes", type=float, default=10.0, help="wall-clock cap of each TD3 run")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/time-to-result-<device>.md)")
    ap.add_argument("--render", default=None, help="rewrite the markdown from a run's saved figures (.json) only")
    cli = ap.parse_args()
    os.chdir(ROOT)
    from run import device_name, load_peers

    slug, desc = device_name()
    out = Path(cli.out or RESULTS / f"time-to-result-{slug}.md")
    if cli.render:
        saved = json.loads(Path(cli.render).read_text())
        header, figures = saved["header"], saved["figures"]
    else:
        peers = None if cli.no_peers else load_peers()
        started, figures = time.time(), {}
        if "ppo" in cli.sections:
            figures["ppo"] = ppo_section(peers, cli.num_seeds, cli.total_timesteps)[1]
        if "erl" in cli.sections:
            figures["erl"] = erl_section(peers, 60.0 * cli.td3_cap_minutes, cli.erl_generations)[1]
        versions = f"jax {jax.__version__}" + ("".join(f", {k} {v}" for k, v in peers["versions"].items()) if peers else "")
        command = "python benchmarks/time_to_result.py " + " ".join(sys.argv[1:])
        header = [
            f"# Time to a result: {desc}",
            "",
            f"`{command.strip()}` on {time.strftime('%Y-%m-%d %H:%M')}, {(time.time() - started) / 60:.0f} min; {versions}.",
            "",
        ]
        out.with_suffix(".json").write_text(json.dumps(dict(header=header, figures=figures), indent=1))
    md = ppo_markdown(figures["ppo"]) if "ppo" in figures else []
    md += erl_markdown(figures["erl"]) if "erl" in figures else []
    out.write_text("\n".join(header + md) + "\n")
    print("\n".join(md) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
