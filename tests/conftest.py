"""Shared test helpers: the repository root on sys.path and a subprocess runner for the scripts."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def script_env(env=None) -> dict:
    """The environment of the scripts' subprocesses: CPU, a shared compilation cache, plus `env`."""
    # a persistent compilation cache shared by the subprocesses: the same tiny configs compile once per machine
    cache = dict(
        JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / "jax_test_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return dict(os.environ, JAX_PLATFORMS="cpu", **cache, **(env or {}))


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Runs `python <args>` from the repository root; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=script_env(env), capture_output=True, text=True, timeout=timeout
    )


# both scripts: the policy files of seed k in seed<k>/
RUN_OUTPUTS = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.msgpack",
    "seed0/best.msgpack",
    "seed0/final.msgpack",
    "report.json",
    "trades.csv",
    "equity.png",
    "summary.png",
)


def tiny_run_dir(tmp_path_factory, script: str, flags: list) -> tuple:
    """Runs `script` with tiny flags into a fresh folder; returns (run folder, CompletedProcess)."""
    out = tmp_path_factory.mktemp("runs")
    r = run_script(script, *flags, "--out-dir", out, "--run-name", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny", r


def synthetic_verdict(tmp_path: Path, generator: list, script: str, flags: list) -> str:
    """The verdict of `script` trained with `flags` on the synthetic data data_prep's `generator` arguments write
    (its first market's sentence for ppo_trader, which gives one per market), after checking it came from 5 runs."""
    import json

    import data_prep

    data = tmp_path / "syn.npz"
    assert data_prep.main([generator[0], "--out", str(data), *generator[1:]]) == 0
    r = run_script(script, "--data", data, *flags, "--out-dir", tmp_path, "--run-name", "verdict")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "verdict" / "report.json").read_text())
    verdict, summary = report["verdict"], report["summary"]
    if isinstance(verdict, dict):  # per market
        market = next(iter(verdict))
        verdict, summary = verdict[market], summary[market]
    assert summary[next(iter(summary))]["runs"] == 5, summary
    print(f"{generator}: {verdict}")
    return verdict


def assert_run_outputs(run_dir: Path, outputs: tuple = RUN_OUTPUTS) -> list:
    """Every file a training run writes (`outputs`, relative to the run folder) is there; returns the metrics.jsonl rows."""
    import json

    for f in outputs:
        assert (run_dir / f).is_file(), f
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(r, needle: str) -> None:
    """Exit status 2 and a single stderr line that names `needle` and says how to fix it."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Fix:" in lines[0], r.stderr


def assert_divergence_stops_and_keeps_the_last_good_checkpoint(
    script: str, flags: list, out: Path, huge_lr: dict, final_policy: str = "final.msgpack", names: str = ""
) -> None:
    """A run that diverges stops at the first non-finite chunk with one line naming the last good checkpoint
    (exit 1), leaves that checkpoint as it was and writes no final policy or report. Divergence is forced by
    raising the learning rates (`huge_lr`: config keys -> values) of a stopped run's config before resuming it,
    and of a fresh run from its first chunk (whose checkpoint is then the state before training). `final_policy`: the
    final policy file, relative to the run folder; `names`: text the error line must hold."""
    import json

    import jax
    import numpy as np
    from flax.serialization import msgpack_restore

    part = run_script(script, *flags, "--out-dir", out, "--run-name", "div", "--stop-after", "1")
    assert part.returncode == 0, part.stderr[-2000:]
    run_dir, ckpt = out / "div", out / "div" / "checkpoint.msgpack"
    good = ckpt.read_bytes()
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(cfg, **huge_lr)))
    r = run_script(script, "--resume", run_dir)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: NaN/inf") and "chunk 2" in last and str(ckpt) in last, r.stderr[
        -2000:
    ]
    assert names in last, last
    assert ckpt.read_bytes() == good
    assert not (run_dir / final_policy).exists() and not (run_dir / "report.json").exists()

    flag_args = [x for k, v in huge_lr.items() for x in ("--" + k.replace("_", "-"), str(v))]
    r = run_script(script, *flags, *flag_args, "--out-dir", out, "--run-name", "div0")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: NaN/inf") and "chunk 1" in last and names in last, r.stderr[-2000:]
    payload = msgpack_restore((out / "div0" / "checkpoint.msgpack").read_bytes())
    assert json.loads(payload["extra"])["chunk"] == 0
    floats = [x for x in map(np.asarray, jax.tree.leaves(payload["runner"])) if x.dtype.kind == "f"]
    assert floats and all(np.isfinite(x).all() for x in floats)


def report_of(run_dir: Path) -> dict:
    """A run folder's report.json."""
    import json

    return json.loads((run_dir / "report.json").read_text())


def policy_params(path: Path) -> dict:
    """The parameters stored in a policy file."""
    from flax.serialization import msgpack_restore

    return msgpack_restore(path.read_bytes())["params"]


def assert_trees_close(a, b, what: str, atol: float = 1e-5) -> None:
    """Two parameter trees with the same leaves, equal to float32 summation-order tolerance."""
    import jax
    import numpy as np

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), what
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol, err_msg=what)


def assert_results_table_matches(trainer: str, report: dict) -> None:
    """benchmarks/results.py's markdown of a report (`report_lines`) has a row per summarised policy with its number
    of runs, its median total return and P(improvement) over random as the report holds them, and the verdict."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import results

    lines = results.report_lines(trainer, report)
    per_market = report["summary"].items() if trainer == "ppo" else [(None, report["summary"])]
    for market, summary in per_market:
        block = lines[lines.index(f"{market}:"):] if market else lines  # the market's own tables
        block = block[next(i for i, line in enumerate(block) if line.startswith("|---")) + 1:]  # from its summary's rows
        for name, policy in summary.items():
            row = next(line for line in block if line.startswith(f"| {name} |")).split(" | ")
            assert row[1] == str(policy["runs"]), row
            assert row[2].startswith(results.percent(policy["total_return"]["median"]["value"])), row
            improvement = policy["probability_of_improvement"].get("random")
            assert row[5] == (results.estimate_text(improvement, results.decimal) if improvement else "-"), row
        verdict = report["verdict"][market] if market else report["verdict"]
        assert f"Verdict{f' ({market})' if market else ''}: {verdict}" in block, block
