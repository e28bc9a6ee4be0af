"""Calibrated 4-bit (GPTQ-style rounding, airmlx/calibrate.py) and the group-size option: MLX's layout, so
both backends run it unchanged; the rounding lowers the layer-output error it is meant to lower."""
import numpy as np
import pytest

import airmlx
from airmlx import quant
from airmlx.calibrate import calibration_ids, gptq
from airmlx.errors import CheckpointError, OptionError
from airmlx.manifest import Manifest

from tiny import minimum_budget

PROMPT = [5, 17, 33, 2, 9, 60, 7, 41, 12]


def correlated_inputs(cols, n=4096, seed=0):
    """Inputs like a layer's: correlated channels, a few of them large."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = rng.standard_normal((n, cols)) @ mix + 0.1 * rng.standard_normal((n, cols))
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64)])
def test_gptq_lowers_the_output_error_of_plain_rounding(bits, group_size):
    rng = np.random.default_rng(1)
    w = (0.05 * rng.standard_normal((96, 256))).astype(np.float32)
    x = correlated_inputs(256)
    h = x.T @ x

    def output_error(wq, scales, biases):
        q = quant.dequantize(wq, scales, biases, group_size, bits).astype(np.float64)
        return np.linalg.norm(x @ (w - q).T)

    plain = quant.quantize(w.astype(np.float16), group_size, bits)
    calibrated = gptq(w, h, group_size, bits, "float16")
    for ours, theirs in zip(calibrated, plain):  # the same layout: shapes and dtypes
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert output_error(*calibrated) < 0.6 * output_error(*plain)


def test_gptq_without_information_is_plain_rounding():
    """With H = identity (uncorrelated, equal inputs) there is no error to move: plain rounding comes back."""
    w = (0.05 * np.random.default_rng(2).standard_normal((32, 128))).astype(np.float32)
    plain = quant.quantize(w.astype(np.float16), 64, 4)
    calibrated = gptq(w, np.eye(128), 64, 4, "float16", damp=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(calibrated, plain))


@pytest.mark.parametrize("compression,group_size", [("4bit-g32", 32), ("4bit-gptq", 64),
                                                     ({"bits": 4, "group_size": 32, "method": "gptq"}, 32)])
def test_options_shard_and_run_on_both_backends(checkpoints, tmp_path, compression, group_size):
    folder, _ = checkpoints("llama", intermediate_size=128)
    out = airmlx.shard_checkpoint(folder, tmp_path / "q", compression=compression, progress=False)
    q = Manifest.load(out).config["quantization"]
    assert (q["bits"], q["group_size"]) == (4, group_size)
    assert q.get("method") == ("gptq" if "gptq" in str(compression) else None)
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        want, ref = m.generate(PROMPT, max_new_tokens=12), m.logits([PROMPT])
    with airmlx.AutoModel.from_pretrained(out, backend="torch", memory_budget=int(1.5 * minimum_budget(out, "torch"))) as m:
        assert m.plan.streamed
        assert m.generate(PROMPT, max_new_tokens=12) == want
        assert np.abs(m.logits([PROMPT]) - ref).max() < 1e-4 * np.abs(ref).max()


def test_compression_spellings():
    assert quant.compression_config("4bit") == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert quant.compression_config("8bit-g128") == {"group_size": 128, "bits": 8, "mode": "affine"}
    assert quant.compression_config("4bit-g32-gptq") == {"group_size": 32, "bits": 4, "mode": "affine",
                                                         "method": "gptq"}
    assert quant.compression_name({"bits": 4, "group_size": 64, "method": "gptq"}) == "4bit-gptq"
    for bad in ("3bit", "4bit-g48", "4bit-awq", {"bits": 4, "group": 32}, {"bits": 16}):
        with pytest.raises(OptionError, match="is unknown"):
            quant.compression_config(bad)


def test_calibration_refuses_routed_experts(checkpoints, tmp_path, capsys):
    """Regression (QA): the refusal came after the shard folder was made (an empty folder holding a lock file was
    left behind) and after the line saying which matrices stay unquantised."""
    folder, _ = checkpoints("mixtral")
    with pytest.raises(OptionError, match="dense models"):
        airmlx.shard_checkpoint(folder, tmp_path / "q", compression="4bit-gptq", progress=False)
    assert not (tmp_path / "q").exists() and "unquantised" not in capsys.readouterr().err


def test_calibration_rows_fit_a_small_table_of_learned_positions(checkpoints, tmp_path):
    """Regression (review): the calibration rows were 512 tokens whatever the model, so GPTQ on a GPT-2 with
    fewer positions ran past its table (refused: the position check)."""
    folder, _ = checkpoints("gpt2", max_position_embeddings=64, n_inner=None)
    out = airmlx.shard_checkpoint(folder, tmp_path / "q", compression="4bit-gptq", progress=False)
    assert Manifest.load(out).config["quantization"]["method"] == "gptq"
    with airmlx.AutoModel.from_pretrained(out, backend="torch") as m:
        want = m.generate(PROMPT, max_new_tokens=8)
    with airmlx.AutoModel.from_pretrained(out, backend="mlx") as m:
        assert m.generate(PROMPT, max_new_tokens=8) == want


def test_a_tokenizer_that_encodes_nothing_is_a_clear_error():
    """Regression (QA): a tokenizer that yields no tokens for the calibration text raised an IndexError deep in
    the torch backend."""
    with pytest.raises(CheckpointError, match="no tokens.*plain rounding"):
        calibration_ids(lambda text, verbose: {"input_ids": []}, seq_len=16)
    assert calibration_ids(lambda text, verbose: {"input_ids": [3] * 40}, seq_len=16, max_rows=2).shape == (2, 16)
