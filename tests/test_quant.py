"""airmlx.quant must agree bit-for-bit with mx.quantize / mx.dequantize."""

import numpy as np
import pytest

from airmlx.quant import dequantize, quantize

mx = pytest.importorskip("mlx.core")

DTYPES = ("float32", "float16", "bfloat16")


def make_weights(bits, shape=(64, 256), seed=0):
    """Random rows plus the rows where MLX's edge-case rules decide the result."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    rows, cols = shape
    w[1] = 0.0
    w[2] = 0.3  # constant row: max == min
    w[3] = 3e-8 * rng.standard_normal(cols)  # range below MLX's eps floor
    w[16] = 1e-8 * rng.standard_normal(cols)  # ... and edge / eps rounds to 0
    w[4] = -np.abs(w[4])  # negative only
    w[5] = np.abs(w[5])  # positive only
    w[6, ::37] = 1e4  # outliers
    w[7, 5::41] = -2e3
    w[8] = rng.choice([-1.0, 1.0], cols)  # |min| == |max|
    w[9] = 2.5  # constant, exactly representable
    # Rows whose codes land on .5 ties: each group spans [0, n_bins], so the
    # scale is exactly -1 and (w - bias) / scale is a half-integer.
    n_bins = (1 << bits) - 1
    ties = rng.integers(0, 2 * n_bins + 1, (4, cols)) / 2
    ties[:, ::32], ties[:, 1::32] = 0, n_bins
    w[10:14] = ties
    w[14:16] = -ties[:2]
    return w


def as_inputs(w32, dtype):
    """(mlx array, numpy array holding the same values, dtype kwarg for airmlx)."""
    w_mx = mx.array(w32).astype(getattr(mx, dtype))
    return w_mx, to_numpy(w_mx), ("bfloat16" if dtype == "bfloat16" else None)


def to_numpy(a):
    """Exact bits of an mlx array; bfloat16 comes back as raw uint16."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def assert_same_bits(ours, theirs):
    theirs = to_numpy(theirs)
    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8))


def check_against_mlx(w32, dtype, group_size, bits):
    w_mx, w_np, kind = as_inputs(w32, dtype)
    wq_mx, s_mx, b_mx = mx.quantize(w_mx, group_size, bits, mode="affine")
    wq, scales, biases = quantize(w_np, group_size=group_size, bits=bits, dtype=kind)
    assert_same_bits(wq, wq_mx)
    assert_same_bits(scales, s_mx)
    assert_same_bits(biases, b_mx)
    w_hat_mx = mx.dequantize(wq_mx, s_mx, b_mx, group_size, bits, mode="affine")
    w_hat = dequantize(wq, scales, biases, group_size=group_size, bits=bits, dtype=kind)
    assert_same_bits(w_hat, w_hat_mx)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_mlx(dtype, group_size, bits):
    check_against_mlx(make_weights(bits), dtype, group_size, bits)


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_mlx_other_bits(dtype, bits):
    check_against_mlx(make_weights(bits, seed=1), dtype, 64, bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_mlx_3d_and_wide_range(dtype):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((3, 8, 128)) * np.exp(rng.uniform(-8, 8, (3, 8, 1))))
    check_against_mlx(w.astype(np.float32), dtype, 32, 4)


def test_ties_round_to_even():
    """Sanity check that the tie rows really exercise half-to-even rounding."""
    w = np.zeros((1, 32), np.float32)
    w[0, 1], w[0, 2], w[0, 3] = 15, 6.5, 7.5  # scale -1, bias 15: codes 8.5, 7.5
    wq, scales, biases = quantize(w, group_size=32, bits=4)
    assert scales[0, 0] == -1 and biases[0, 0] == 15
    assert (int(wq[0, 0]) >> 8) & 0xFF == 0x88  # both ties round to code 8
    check_against_mlx(w, "float32", 32, 4)


def test_dequantize_of_random_codes_matches_mlx():
    rng = np.random.default_rng(3)
    wq = rng.integers(0, 2**32, (16, 16), dtype=np.uint32)
    for dtype in DTYPES:
        s_mx = mx.array(rng.standard_normal((16, 2)).astype(np.float32)).astype(getattr(mx, dtype))
        b_mx = mx.array(rng.standard_normal((16, 2)).astype(np.float32)).astype(getattr(mx, dtype))
        kind = "bfloat16" if dtype == "bfloat16" else None
        ours = dequantize(wq, to_numpy(s_mx), to_numpy(b_mx), group_size=32, bits=8, dtype=kind)
        assert_same_bits(ours, mx.dequantize(mx.array(wq), s_mx, b_mx, 32, 8))


@pytest.mark.parametrize("bits", [1, 7, 16])
def test_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match=rf"bits={bits}\b.*\(2, 3, 4, 5, 6, 8\)"):
        quantize(np.zeros((2, 64), np.float32), group_size=64, bits=bits)
    with pytest.raises(ValueError, match=rf"bits={bits}\b"):
        dequantize(np.zeros((2, 8), np.uint32), np.zeros((2, 1), np.float32),
                   np.zeros((2, 1), np.float32), group_size=64, bits=bits)


@pytest.mark.parametrize("group_size", [16, 48, 256])
def test_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size}\b.*\(32, 64, 128\)"):
        quantize(np.zeros((2, 512), np.float32), group_size=group_size)


def test_rejects_last_dim_not_divisible():
    with pytest.raises(ValueError, match=r"\(2, 96\).*group_size=64"):
        quantize(np.zeros((2, 96), np.float32), group_size=64)


def test_rejects_bad_dtypes():
    with pytest.raises(ValueError, match="uint16"):
        quantize(np.zeros((2, 64), np.float32), dtype="bfloat16")
    with pytest.raises(ValueError, match="float64"):
        quantize(np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError, match="does not match"):
        quantize(np.zeros((2, 64), np.float32), dtype="float16")


def test_dequantize_rejects_mismatched_shapes():
    wq, scales, biases = quantize(np.ones((2, 128), np.float32), group_size=64, bits=4)
    with pytest.raises(ValueError, match="expected"):
        dequantize(wq, scales, biases, group_size=32, bits=4)
    with pytest.raises(ValueError, match="expected"):
        dequantize(wq[:, :7], scales, biases, group_size=64, bits=4)
