"""Both scripts over several devices (4 fake CPU devices in a subprocess): the arrays really are split, a run on
4 devices matches a run on 1 (same seed) to floating-point tolerance, a checkpoint saved on 4 devices resumes on
1 and back, multi-host (2 processes x 2 devices on this machine) matches too, and bad layouts give one-line errors.

Each script runs one reference on 1 device and one chain: 4 devices (inspected from inside) -> stop, resume on
1 device -> end; the chain must end where the reference ends."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore

from conftest import ROOT, assert_one_line_error, run_script, script_env
from test_erl_cli import TINY as ERL_TINY
from test_ppo_cli import TINY as PPO_TINY

FOUR = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
PPO_FLAGS = PPO_TINY + ["--chunk-updates", "2", "--num-seeds", "2"]  # 4 chunks; 4 devices = 2 seeds x 2 env devices
ERL_FLAGS = ERL_TINY + ["--num-seeds", "2"]  # pop 4, 4 generations of one chunk each, TD3 batch 16; 4 devices = 2 seeds x 2

# Runs the script in-process with --stop-after 1 and records the live (device) runner state handed to
# save_checkpoint after the first chunk; prints the sharding of a few arrays as JSON.
INSPECT = """
import json, sys, jax
import {module} as m
seen = []
save = m.save_checkpoint
m.save_checkpoint = lambda *call: (seen.append(call[1]), save(*call))  # (path, runner, extra[, args])
assert m.main(sys.argv[1:]) == 0
r = seen[0]
def layout(x):
    return dict(spec=[None if p is None else str(p) for p in x.sharding.spec],
                shards=sorted({{tuple(s.data.shape) for s in x.addressable_shards}}),
                devices=len({{s.device for s in x.addressable_shards}}), shape=list(x.shape))
print("LAYOUT " + json.dumps({{name: layout(x) for name, x in {arrays}.items()}}))
"""


def restore(path: str, key: str):
    return msgpack_restore(open(path, "rb").read())[key]


def assert_close(a, b, what: str, atol: float = 1e-5, skip: str = "\0") -> None:
    """Same structure; integers equal; floats equal up to float32 reduction-order noise (leaves whose path holds
    `skip` are not compared)."""
    pa, pb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(pa) == len(pb), what
    for (path, x), y in zip(pa, pb):
        x, y = np.asarray(x), np.asarray(y)
        name = f"{what}{jax.tree_util.keystr(path)}"
        if skip in name:
            continue
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def metric_rows(run_dir, drop=("sps", "elapsed")):
    return [
        {k: v for k, v in json.loads(x).items() if k not in drop} for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def assert_rows_close(rows_a, rows_b) -> None:
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert sorted(ra) == sorted(rb)
        assert_close(ra, rb, f"chunk {ra.get('chunk', ra.get('generation'))}")  # nested per-market metrics too


def inspect_run(module: str, arrays: str, argv: list) -> tuple[dict, subprocess.CompletedProcess]:
    r = run_script("-c", INSPECT.format(module=module, arrays=arrays), *argv, env=FOUR)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("LAYOUT ")][-1]
    return json.loads(line[len("LAYOUT ") :]), r


def chain(script: str, module: str, arrays: str, flags: list, out) -> tuple[dict, list]:
    """Reference on 1 device; chain 4 devices -> stop after the first chunk -> resume on 1 device to the end."""
    ref = run_script(script, *flags, "--devices", "1", "--out-dir", out, "--run-name", "ref", env=FOUR)
    assert ref.returncode == 0, ref.stderr[-3000:]
    layout, first = inspect_run(module, arrays, [*flags, "--stop-after", "1", "--out-dir", str(out), "--run-name", "chain"])
    assert "stopped after chunk 1" in first.stdout
    second = run_script(script, "--resume", out / "chain", "--devices", "1", env=FOUR)
    assert second.returncode == 0, second.stderr[-3000:]
    return layout, [ref, first, second]


# ---- PPO ----
PPO_ARRAYS = ("dict(env_t=r.env_state.t, last_obs=r.last_obs, "
              "kernel=r.train_state.params['params']['actor_hidden_0']['kernel'], rng=r.rng)")


@pytest.fixture(scope="module")
def ppo_chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_sharding")
    return out, *chain("ppo_trader.py", "ppo_trader", PPO_ARRAYS, PPO_FLAGS, out)


def test_ppo_arrays_are_split_over_seeds_and_envs(ppo_chain):
    _, layout, (ref, first, second) = ppo_chain
    assert (
        "devices 1 (1 seed x 1 env" in ref.stdout
        and "devices 4 (2 seed x 2 env" in first.stdout
        and "devices 1 (1 seed x 1 env" in second.stdout
    )
    # envs: [seeds 2, envs 8] -> 4 blocks of [1 seed, 4 envs], one per device
    assert layout["env_t"] == dict(spec=["seed", "env"], shards=[[1, 4]], devices=4, shape=[2, 8])
    assert layout["last_obs"]["spec"][:2] == ["seed", "env"] and layout["last_obs"]["shards"][0][:2] == [1, 4]
    # parameters and RNG: split by seed, a copy on each of the seed's env devices
    assert layout["kernel"]["spec"] == ["seed"] and layout["kernel"]["shards"][0][0] == 1 and layout["kernel"]["devices"] == 4
    assert layout["rng"]["spec"] == ["seed"] and layout["rng"]["shards"] == [[1, 2]]


def test_ppo_four_devices_match_one_and_checkpoints_move_between_device_counts(ppo_chain):
    out = ppo_chain[0]
    # every chunk of the chain (4, then 1 device) reports what the 1-device run reports
    assert_rows_close(metric_rows(out / "chain"), metric_rows(out / "ref"))
    assert_close(
        restore(out / "chain" / "checkpoint.msgpack", "runner"),
        restore(out / "ref" / "checkpoint.msgpack", "runner"),
        "checkpoint",
    )
    for seed in ("seed0", "seed1"):  # each seed's own final policy
        chain_final, ref_final = (restore(out / run / seed / "final.msgpack", "params") for run in ("chain", "ref"))
        assert_close(chain_final, ref_final, seed)
    config = json.loads((out / "chain" / "config.json").read_text())
    assert config["devices"] is None  # the layout is how a run ran, not part of the run: a resume picks its own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_ppo_two_processes_match_one_device_and_only_process_0_writes(ppo_chain, tmp_path):
    out = ppo_chain[0]
    port = free_port()
    env = dict(FOUR, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = []
    for pid in (1, 0):
        cmd = [
            "ppo_trader.py",
            *PPO_FLAGS,
            "--out-dir",
            tmp_path / f"p{pid}",
            "--run-name",
            "mh",
            "--coordinator-address",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, *map(str, cmd)],
                cwd=ROOT,
                env=script_env(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(
        f"process {pid}: {se[-2000:]}" for pid, (_, se) in zip((1, 0), results)
    )
    assert "devices 4 (2 seed x 2 env, 2 process(es))" in results[1][0]
    assert list((tmp_path / "p1" / "mh").iterdir()) == []  # process 1 wrote nothing
    assert_close(
        restore(tmp_path / "p0" / "mh" / "checkpoint.msgpack", "runner"),
        restore(out / "ref" / "checkpoint.msgpack", "runner"),
        "multi-host",
    )
    assert_rows_close(metric_rows(tmp_path / "p0" / "mh"), metric_rows(out / "ref"))


# ---- ERL ----
ERL_ARRAYS = (
    "dict(pop=r.pop['params']['stock_head']['kernel'], critic=r.learner.critic['params']['Dense_0']['kernel'], "
    "replay=r.replay.reward, rng=r.rng, generation=r.gen, replay_size=r.replay.size)"
)


@pytest.fixture(scope="module")
def erl_chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("erl_sharding")
    return out, *chain("erl_trader.py", "erl_trader", ERL_ARRAYS, ERL_FLAGS, out)


def test_erl_population_is_split_over_seeds_and_devices_and_the_rest_by_seed(erl_chain):
    _, layout, (ref, first, second) = erl_chain
    one_device = "devices 1 (1 seed x 1 pop, 4 actors each"
    assert (
        one_device in ref.stdout and "devices 4 (2 seed x 2 pop, 2 actors each" in first.stdout and one_device in second.stdout
    )
    # the population [seeds 2, pop 4, ...] -> 4 blocks of [1 seed, 2 actors, ...], one per device
    pop = layout["pop"]
    assert pop["spec"] == ["seed", "d"] and pop["shape"][:2] == [2, 4] and pop["shards"] == [[1, 2] + pop["shape"][2:]]
    assert pop["devices"] == 4
    for name in ("critic", "replay", "rng"):  # learner, replay memory and RNG: split by seed, copied over its 2 devices
        assert layout[name]["spec"] == ["seed"] and layout[name]["shards"] == [[1] + layout[name]["shape"][1:]], name
        assert layout[name]["devices"] == 4, name
    for name in ("generation", "replay_size"):  # counters every seed shares: one copy per device
        assert layout[name] == dict(spec=[], shards=[[]], devices=4, shape=[]), name


def test_erl_four_devices_match_one_and_checkpoints_move_between_device_counts(erl_chain):
    out = erl_chain[0]
    assert_rows_close(metric_rows(out / "chain"), metric_rows(out / "ref"))
    # the attention's key bias has an exactly zero true gradient (softmax ignores a shift shared by all keys), so
    # Adam turns float32 summation-order noise in it into steps of ~1e-5..1e-4 that differ by device count: not compared
    key_bias = "['key']['bias']"
    chain, ref = (restore(out / name / "checkpoint.msgpack", "runner") for name in ("chain", "ref"))
    assert_close(chain, ref, "checkpoint", atol=1e-4, skip=key_bias)
    for seed in ("seed0", "seed1"):  # each seed's own final policy
        chain, ref = (restore(out / name / seed / "final.msgpack", "params") for name in ("chain", "ref"))
        assert_close(chain, ref, seed, atol=1e-4, skip=key_bias)


# ---- BAD LAYOUTS ----
@pytest.mark.parametrize(
    "script,argv,needle",
    [
        ("erl_trader.py", ["--pop-size", "6", "--num-elites", "1", "--num-seeds", "1"], "--pop-size 6"),
        ("erl_trader.py", ["--devices", "8"], "--devices 8"),
        ("ppo_trader.py", ["--num-envs", "6", "--num-steps", "8", "--num-minibatches", "1"], "--num-envs 6"),
        ("ppo_trader.py", ["--coordinator-address", "localhost:1234"], "--num-processes"),
    ],
)
def test_layouts_that_do_not_divide_give_one_line(script, argv, needle):
    assert_one_line_error(run_script(script, *argv, env=FOUR), needle)
