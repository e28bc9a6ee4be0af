"""The notebooks in notebooks/ run top to bottom (so they never rot), in a temporary HF_HOME."""
import json
import time
from pathlib import Path

import nbclient  # the test extra: pip install -e ".[test]"
import nbformat
import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
DEMO_MODEL = Path(__file__).parents[1] / "airmlx" / "demo_model"


def run(name, tmp_path, monkeypatch):
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.fail(f"{DEMO_MODEL} has no model; train it with scripts/train_demo_model.py")
    # the kernel inherits the environment: shards go to a temporary cache, never the user's
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    text += "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return nb, text, images, seconds


def test_quickstart_runs(tmp_path, monkeypatch):
    nb, text, images, seconds = run("quickstart.ipynb", tmp_path, monkeypatch)
    assert "stages resident" in text  # the plan
    assert "second turn: fed" in text
    assert "profile:" in text and "-bound" in text
    assert len(images) == 1  # the profile plot
    assert list((tmp_path / "hf_home" / "airmlx").iterdir())  # the shards went to the temporary cache
    assert seconds < 120


def test_bigger_than_memory_runs(tmp_path, monkeypatch):
    nb, text, images, seconds = run("bigger_than_memory.ipynb", tmp_path, monkeypatch)
    assert "x smaller than the model" in text and "streamed" in text and "identical: True" in text
    assert len(images) == 1
    assert seconds < 120


@pytest.mark.parametrize("name", ["quickstart.ipynb", "bigger_than_memory.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
