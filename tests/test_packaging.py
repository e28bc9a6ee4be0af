"""The wheel installs airmlx and airmlx.backends, and no top-level `backends` package; the dependency floors
are ones the frameworks accept."""
import importlib.metadata
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_backends_under_airmlx(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True)
    # setuptools warns of a data folder that is not a listed package (it says it may drop it), on every install
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    (wheel,) = tmp_path.glob("airmlx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"airmlx", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("airmlx/backends/base.py", "airmlx/backends/torch_backend.py", "airmlx/backends/mlx_backend.py",
                   "airmlx/shard.py", "airmlx/schedule.py", "airmlx/demo_model/model.safetensors",
                   "airmlx/demo_model/tokenizer.json", "airmlx/demo_model/config.json",
                   "airmlx/texts/calibration.txt", "airmlx/texts/eval.txt"):
        assert module in names
    # a console script per face, named like mlx-lm's, for every module that runs with python -m
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    # (not bench_hosts: the launcher that python -m airmlx.bench --hosts starts runs it on every rank)
    faces = sorted(p.stem for p in (ROOT / "airmlx").glob("*.py")
                   if '__name__ == "__main__"' in p.read_text() and p.stem != "bench_hosts")
    assert faces == ["bench", "bench_moe", "bench_quant", "bench_server", "bench_spec", "chat", "demo", "doctor",
                     "generate", "harness", "score", "server", "shard"]
    for face in faces:
        assert f"airmlx.{face} = airmlx.{face}:main" in entry_points


def floor(requirement: Requirement) -> Version:
    return min(Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "=="))


def test_torch_floor_is_one_transformers_runs_with():
    """transformers turns torch off below its own floor (is_torch_available() is False, with a warning), so a
    lower floor of ours would install a torch the torch backend cannot use."""
    ours = next(r for r in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                               ["dependencies"]) if r.name == "torch")
    theirs = [Requirement(r) for r in importlib.metadata.requires("transformers") or []]
    needed = max(floor(r) for r in theirs if r.name == "torch" and r.marker and r.marker.evaluate({"extra": "torch"}))
    assert floor(ours) >= needed, f"pyproject.toml asks torch>={floor(ours)}; transformers needs torch>={needed}"
