"""The shape of the tree: no import cycles (lazy and __main__ imports included), a core that imports no
framework, both backends on one checked seam, one registry entry per architecture in every table."""
import ast
import inspect
from pathlib import Path

import pytest

import airmlx
from airmlx.archs import ARCHS
from airmlx.backends.base import Backend
from airmlx.manifest import Manifest
from airmlx.sharder import shard_checkpoint

from tiny import make_checkpoint

ROOT = Path(airmlx.__file__).parent.parent
PACKAGES = {"airmlx": ROOT / "airmlx", "airmlx.backends": ROOT / "backends"}
# the core: none of these may import mlx or torch, not even inside a function
CORE = ["archs", "corpus", "errors", "experts", "generation", "hub", "manifest", "model", "pipeline",
        "pipeline_link", "pipeline_model", "plan", "preflight", "quant", "schedule", "scoring", "session", "sharder",
        "stagefile", "store", "sweeps", "tensorfile", "units"]


def modules():
    """{module name: AST} for every module of airmlx and airmlx.backends."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = ast.parse(path.read_text())
    return out


def imports(name, tree):
    """Every module `name` imports, wherever the import statement stands."""
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {m: {i for i in imports(m, t) if i in mods and i != m and i not in PACKAGES} for m, t in mods.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_the_core_imports_no_framework():
    mods = modules()
    for name in CORE:
        used = {i.split(".")[0] for i in imports(f"airmlx.{name}", mods[f"airmlx.{name}"])}
        assert not used & {"mlx", "mlx_lm", "torch", "transformers"} or name == "model", (name, used)
    # the model may load the tokenizer (transformers), nothing else of a framework
    model_uses = {i for i in imports("airmlx.model", mods["airmlx.model"]) if i.split(".")[0] in ("mlx", "torch")}
    assert not model_uses


def test_every_architecture_has_one_entry_in_each_backend_table():
    from airmlx.backends.mlx_archs import MLX_ARCHS
    from airmlx.backends.torch_backend import TORCH_ARCHS
    assert set(MLX_ARCHS) == set(ARCHS) == set(TORCH_ARCHS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    make_checkpoint(root / "src", "llama")
    return shard_checkpoint(root / "src", root / "shards", progress=False)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_both_backends_satisfy_the_protocol_and_are_built_alike(shards, backend):
    from airmlx.auto import make_backend
    made = make_backend(backend, Manifest.load(shards), code_dir=shards)
    assert isinstance(made, Backend)
    params = list(inspect.signature(type(made).__init__).parameters)
    assert params == ["self", "manifest", "device", "dtype", "trust_remote_code", "code_dir"]
    for method in [m for m in dir(Backend) if not m.startswith("_") and callable(getattr(Backend, m))]:
        ours = inspect.signature(getattr(type(made), method))
        seam = inspect.signature(getattr(Backend, method))
        assert list(ours.parameters) == list(seam.parameters), (backend, method, ours, seam)


def test_importing_airmlx_first_makes_torchs_openmp_threads_wait_passively():
    """Spinning OpenMP threads took the cores our prefetch thread and the draft wanted: on a busy 2-core machine
    a 4-bit draft call took 40-650 ms instead of 7 ms. A value the user set is kept."""
    import os
    import subprocess
    import sys
    code = "import airmlx, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = [subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                          check=True).stdout.strip() for extra in ({}, {"OMP_WAIT_POLICY": "ACTIVE"})]
    assert out == ["PASSIVE", "ACTIVE"]
