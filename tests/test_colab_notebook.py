"""notebooks/colab.ipynb end to end on the CPU: its sizes cell replaced by tiny flags, every other cell as committed."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, script_env
from test_erl_cli import TINY as ERL_TINY
from test_ppo_cli import TINY as PPO_TINY

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def parameters_cell(notebook) -> int:
    """Index of the one cell tagged `parameters` (the sizes and switches)."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, tagged
    return tagged[0]


def tiny_parameters(out_dir: Path) -> str:
    """The sizes cell for a CPU: tiny runs, no TensorBoard, the project already here (no clone)."""
    values = dict(
        REPO_URL="",
        OUT_DIR=str(out_dir),
        PPO_FLAGS=" ".join(PPO_TINY),
        ERL_FLAGS=" ".join(ERL_TINY),
        MY_CSV="",
        DATA_PREP_FLAGS="--market EURUSD --rth none --rollover 17:00 --src-tz UTC",
        MY_DATA_PPO_FLAGS=" ".join(PPO_TINY),
        SHOW_TENSORBOARD=False,
        SAVE_TO_DRIVE=False,
    )
    return "\n".join(f"{name} = {value!r}" for name, value in values.items())


def kernel_in_this_python(folder: Path) -> str:
    """A kernel spec that starts this interpreter (the test's virtual environment), whatever `python` is on PATH."""
    spec = folder / "kernels" / "trading-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(dict(argv=argv, display_name="test", language="python")))
    return "trading-test"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run on the CPU with tiny sizes; returns (executed notebook, its output folder)."""
    out_dir, jupyter = tmp_path_factory.mktemp("colab_runs"), tmp_path_factory.mktemp("jupyter")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells[parameters_cell(notebook)].source = tiny_parameters(out_dir)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dict(script_env(), JUPYTER_PATH=str(jupyter)).items():
            patch.setenv(name, value)
        client = NotebookClient(
            notebook, kernel_name=kernel_in_this_python(jupyter), timeout=900, resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()
    return notebook, out_dir


def test_notebook_trains_reports_and_saves(executed):
    notebook, out_dir = executed
    runs = sorted(p.name.split("_2")[0] for p in out_dir.iterdir() if p.is_dir())
    assert runs == ["colab_erl", "colab_my_data", "colab_ppo"], runs
    for run in (p for p in out_dir.iterdir() if p.is_dir()):
        assert (run / "report.json").stat().st_size > 0 and (run / "equity.png").stat().st_size > 0, run
    assert len(list(out_dir.glob("colab_runs_*.zip"))) == 1 and len(list(out_dir.glob("my_data_*.npz"))) == 1
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3  # each run's equity plot shown inline
    tables = [output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})]
    assert len(tables) == 3 and all("total_return" in table and "random" in table for table in tables)
    printed = "".join(output.get("text", "") for output in outputs)
    assert "jax " in printed and "CPU runtime" in printed and "kept as installed: " in printed
