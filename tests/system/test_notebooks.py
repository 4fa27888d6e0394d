"""The notebooks run end to end on the embedded tiny model (BLIPDIFF_NOTEBOOK_MODEL=tiny), offline, in one kernel."""

import os

import jax
import nbformat
import pytest
from nbclient import NotebookClient
from support.paths import ROOT

NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def test_there_is_a_notebook_per_use():
    for name in ("zero_shot.ipynb", "stylization_controlnet.ipynb", "editing.ipynb", "finetuning.ipynb"):
        assert name in NAMES


@pytest.fixture(scope="module")
def kernel():
    """One kernel for the notebooks of this file (each starts with `%reset -f`: names do not carry over, imported
    modules do): a kernel per notebook cost ~6 s of imports each. It shares the test run's compilation cache
    (conftest), so programs the notebooks have in common compile once per run."""
    from jupyter_client.manager import KernelManager

    # conftest's environment already holds the cache's minimum compile time; its directory is a config only
    env = dict(os.environ, BLIPDIFF_NOTEBOOK_MODEL="tiny", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=NOTEBOOKS, env=env)
    try:
        yield manager
    finally:
        manager.shutdown_kernel(now=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_is_committed_without_outputs(name, kernel):
    path = os.path.join(NOTEBOOKS, name)
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code"), "committed with stale outputs"
    assert "colab.research.google.com" in notebook.cells[0].source
    notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))  # a fresh namespace in the shared kernel
    client = NotebookClient(notebook, km=kernel, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # images were shown
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "CpuDevice" in printed or "cuda" in printed.lower() or "tpu" in printed.lower()  # jax.devices() shown
