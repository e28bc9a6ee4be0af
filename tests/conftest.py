import sys
from pathlib import Path

import pytest

import airmlx  # noqa: F401  (before torch: torch's OpenMP threads wait as they do for our users)

sys.path.insert(0, str(Path(__file__).parent))
from tiny import interrupt_at, make_checkpoint  # noqa: E402,F401  (interrupt_at: for the audit's scripts)


@pytest.fixture
def hf_modules(monkeypatch, tmp_path_factory):
    """transformers' folder for remote code, one per session: transformers imports the `transformers_modules`
    package from the first folder it is given, so a second folder's code would not be found."""
    from transformers import dynamic_module_utils
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.getbasetemp() / "hf_modules"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (folder, transformers reference model), built once per session."""
    made = {}

    def get(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"ckpt-{arch}")
            made[key] = (folder, make_checkpoint(folder, arch, **overrides))
        return made[key]

    return get


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Default shard folders and the hub cache go to a per-test place, never the user's cache."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
