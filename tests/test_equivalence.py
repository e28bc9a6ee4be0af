"""Streamed output is token-identical to transformers' own generate on the same fp32 weights."""
import gc
import sys

import numpy as np
import pytest
import torch

from tiny import (
    ARCHS,
    BACKENDS,
    BATCH,
    NEW_TOKENS,
    PROMPT,
    assert_last_logits_match,
    load,
    make_checkpoint,
    reference_generate,
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [None, "tight"])
def test_greedy_matches_transformers(checkpoints, tmp_path, arch, backend, budget):
    folder, ref = checkpoints(arch)
    want = reference_generate(ref, PROMPT)
    with load(folder, tmp_path, backend, budget) as model:
        if budget == "tight":
            assert model.plan.streamed and len(model.plan.resident) < len(model.plan.stage_bytes)
        got = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS)
        assert got.tolist() == want
        assert len(want[0]) == len(PROMPT[0]) + NEW_TOKENS

        assert_last_logits_match(model, ref, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_equals_one_by_one(checkpoints, tmp_path, arch, backend):
    folder, ref = checkpoints(arch)
    with load(folder, tmp_path, backend, "tight") as model:
        batched = model.generate(BATCH, max_new_tokens=NEW_TOKENS)
        alone = [model.generate(row, max_new_tokens=NEW_TOKENS) for row in BATCH]
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in alone]
    assert [row[-NEW_TOKENS:] for row in batched] == [row[-NEW_TOKENS:] for row in reference_generate(ref, BATCH)]


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_and_torch_agree(checkpoints, tmp_path, arch):
    folder, _ = checkpoints(arch)
    outs = []
    for backend in BACKENDS:
        with load(folder, tmp_path, backend) as model:
            seq = np.array(PROMPT)
            outs.append(model.step(seq, np.ones_like(seq), model.new_cache(1, [0])))
    assert np.abs(outs[0] - outs[1]).max() / np.abs(outs[0]).max() < 1e-4


def test_logits_of_left_padded_rows_agree_across_backends_and_with_transformers(checkpoints, tmp_path):
    """Regression (QA): a padding position's logits were zeros on torch and leftovers on MLX (up to 3.3 apart);
    they are zeros on both, and every real position's match transformers'."""
    folder, ref = checkpoints("llama")
    rows = [[5, 17, 33, 2, 9, 60, 7], [0, 0, 0, 0, 3, 4, 5]]
    mask = [[1] * 7, [0, 0, 0, 0, 1, 1, 1]]
    with torch.no_grad():
        want = [ref(torch.tensor([r[7 - sum(m):]])).logits[0].numpy() for r, m in zip(rows, mask)]
    got = []
    for backend in BACKENDS:
        with load(folder, tmp_path / backend, backend) as model:
            got.append(model.logits(rows, attention_mask=mask))
    for out in got:
        assert not out[1, :4].any()
        for row, (w, m) in enumerate(zip(want, mask)):
            assert np.abs(out[row, 7 - sum(m):] - w).max() < 1e-4 * np.abs(w).max()
    assert np.array_equal(got[0][1, :4], got[1][1, :4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_checkpoint_streams(tmp_path, backend):
    """bf16 weights pass through the sharder untouched and run on both backends."""
    ref = make_checkpoint(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    ref = ref.to(torch.bfloat16)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        want = ref(ids).logits[:, -1].float().numpy()
    with load(tmp_path / "bf16", tmp_path, backend, "tight") as model:
        got = model.step(ids.numpy(), np.ones_like(ids.numpy()), model.new_cache(1, [0]))
    # bf16 arithmetic differs between frameworks in accumulation order; compare loosely but meaningfully
    assert np.abs(got - want).max() / np.abs(want).max() < 0.05
    assert got.argmax() == want.argmax()


def test_torch_loads_a_streamed_stage_again_as_views_only(checkpoints, tmp_path):
    """From its second load on, a stage whose parameters are views of its mapping under plain renames is bound
    again without transformers' conversion or the shape checks: the same logits as the first, full load."""
    folder, _ = checkpoints("llama")
    seq = np.array(PROMPT)
    with load(folder, tmp_path, "torch", "tight") as model:
        backend = model.scheduler.backend
        first = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
        assert model.plan.streamed and set(model.plan.streamed) <= set(backend._bound)

        def no_conversion(tensors):
            raise AssertionError("a bound stage was converted again")
        backend.convert = no_conversion
        live = backend._live
        again = model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
        assert backend._live == live  # views: nothing made
        if sys.platform.startswith("linux"):  # the store keeps its mappings: the parameters are made once too
            made = lambda: {id(p) for _, _, m in backend._bound.values() for _, p in m.values() if p is not None}
            model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))  # the same views seen again: kept
            kept = made()
            model.step(seq, np.ones_like(seq), model.new_cache(1, [0]))
            assert kept and made() == kept
            assert str(model.shard_dir) in open("/proc/self/maps").read()
    assert np.array_equal(first, again)
    if sys.platform.startswith("linux"):  # closed: no mapping of a shard file outlives the model
        gc.collect()
        assert str(model.shard_dir) not in open("/proc/self/maps").read()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_streaming_in_the_stored_dtype_asked_for_gives_the_same_logits(tmp_path, dtype):
    """MLX's astype to the dtype a tensor already has is the tensor itself, a view of the read buffer: with
    dtype= naming the stored dtype, streamed stages computed on buffers the prefetcher was refilling (SmolLM2's
    GGUF at dtype='float32' under 100 MB: its float32 norms, NaN logits)."""
    import airmlx
    stored = getattr(torch, dtype)
    make_checkpoint(tmp_path / "src", "llama", dtype=stored, num_hidden_layers=8, hidden_size=256,
                    intermediate_size=512)
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    prompt = np.array([[5, 9, 14, 3, 7, 22]])
    got = {}
    for asked in (None, dtype):
        with airmlx.AutoModel.from_pretrained(shards, backend="mlx", dtype=asked, memory_budget="1GB") as whole:
            budget = whole.plan.resident_bytes // 2
        with airmlx.AutoModel.from_pretrained(shards, backend="mlx", dtype=asked, memory_budget=budget) as m:
            assert m.plan.prefetch_depth >= 1 and len(m.plan.streamed) >= 4
            got[asked] = m.logits(prompt)
    np.testing.assert_array_equal(got[dtype], got[None])
