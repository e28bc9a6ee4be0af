"""The store's buffer pool and reads."""
import numpy as np

from airmlx.store import BufferPool


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
