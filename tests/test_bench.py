"""python -m airmlx.bench on checkpoints its reference framework cannot load itself."""
import json

import pytest
import torch
from mlx_lm import convert

from airmlx.bench import main, reference_loads

from tiny import make_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_checkpoint(root / "hf", "llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
    convert(str(root / "hf"), str(root / "mlx3"), quantize=True, q_bits=3, q_group_size=64)
    return root


def test_which_checkpoints_the_reference_frameworks_load(folders, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert reference_loads("torch", folders / "hf") and reference_loads("mlx", folders / "hf")
    assert not reference_loads("torch", folders / "mlx3") and reference_loads("mlx", folders / "mlx3")
    assert not reference_loads("torch", gguf) and not reference_loads("mlx", gguf)


def test_an_mlx_community_checkpoint_on_torch_is_timed_against_airmlx_holding_it_resident(folders, tmp_path, capsys):
    """Regressions: the bench opened a model at the size of its files to read its minimum budget, which a model
    held wider than its files (3-bit weights, dequantised on torch) is below: a BudgetError; and transformers
    cannot load mlx-lm's quantisation, so the bench ended in its traceback after timing the streamed steps.
    airmlx with every stage resident now stands in for the reference, and the row says so."""
    out = tmp_path / "bench.json"
    assert main(["--model", str(folders / "mlx3"), "--backend", "torch", "--steps", "1", "--work-dir",
                 str(tmp_path / "work"), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["resident_reference"] == "airmlx" and row["resident_step_s"] > 0 and row["streamed_bytes_per_step"] > 0
    assert "airmlx, every stage resident: transformers cannot load this checkpoint" in capsys.readouterr().out
