"""The store's buffer pool and reads."""
import numpy as np
import pytest
import torch
from safetensors import safe_open

from airmlx.store import BufferPool, ShardStore


def test_pool_reuses_the_smallest_big_enough_buffer_of_mixed_sizes():
    pool = BufferPool(keep=3)
    big, small = pool.acquire(1000), pool.acquire(100)
    pool.release(big)
    pool.release(small)
    got = pool.acquire(50)
    assert got is small
    assert pool.acquire(500) is big
    assert pool.acquire(10).nbytes == 10  # nothing free: a new one


def test_pool_keeps_at_most_keep_buffers():
    pool = BufferPool(keep=2)
    bufs = [pool.acquire(n) for n in (10, 20, 30)]
    for b in bufs:
        pool.release(b)
    assert sorted(b.nbytes for b in pool._free) == [20, 30]
    assert isinstance(pool.acquire(5), np.ndarray)


def test_slot_sized_buffers_serve_stages_of_any_smaller_size():
    pool = BufferPool(keep=2, slot_bytes=1000)
    a = pool.acquire(300)
    assert a.nbytes == 1000
    pool.release(a)
    assert pool.acquire(900) is a and pool.acquire(2000).nbytes == 2000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import airmlx

    from tiny import make_checkpoint
    root = tmp_path_factory.mktemp("store")
    make_checkpoint(root / "src", "mixtral", dtype=torch.bfloat16)
    return ShardStore(airmlx.shard_checkpoint(root / "src", root / "shards", progress=False))


def file_tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def as_torch(raw):
    t = torch.from_numpy(raw.data.copy())
    return t.view(torch.bfloat16) if raw.dtype == "BF16" else t


def check_stage(store, entry, data):
    want = file_tensors(store.folder / entry.file)
    assert sorted(data.tensors) == sorted(want) == sorted(entry.tensors)
    for name, raw in data.tensors.items():
        assert raw.shape == tuple(want[name].shape) and torch.equal(as_torch(raw), want[name])


@pytest.mark.parametrize("how", ["read_stage", "map_stage"])
def test_stage_reads_are_byte_exact_and_given_back(store, how):
    import gc
    for entry in store.manifest.stages:
        if entry.kind == "experts":
            continue
        before = store.bytes_read
        data = getattr(store, how)(entry.name)
        check_stage(store, entry, data)
        assert store.bytes_read - before == entry.nbytes and store.held_bytes == entry.nbytes
        store.release(data)
        data.tensors = None  # a mapping is unmapped with its last view
        gc.collect()
        assert store.held_bytes == 0


def test_expert_parts_read_only_their_bytes(store):
    entry = next(e for e in store.manifest.stages if e.kind == "experts")
    want = file_tensors(store.folder / entry.file)
    for part, (start, end) in entry.parts.items():
        before = store.bytes_read
        data = store.read_part(entry.name, int(part))
        assert store.bytes_read - before == end - start
        assert data.tensors and all(f".experts.{part}." in name for name in data.tensors)
        for name, raw in data.tensors.items():
            assert torch.equal(as_torch(raw), want[name])
