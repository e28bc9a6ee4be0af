"""The store's buffer pool and reads."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from airmlx.store import BufferPool, ShardStore, mapping_kib


def test_streamed_stages_share_slot_buffers():
    pool = BufferPool(keep=2, slot_bytes=1000)
    a = pool.acquire(300)
    assert a.nbytes == 1000 and a.pooled
    pool.release(a)
    assert pool.acquire(900) is a  # a smaller stage reuses the slot
    assert pool.acquire(10).nbytes == 1000  # nothing free: a new slot


def test_resident_and_oversized_buffers_are_never_kept():
    """Audit bug 6: buffers of resident stages (often the largest: embedding, head) stayed in the pool forever
    and were lent to streamed layers, counted nowhere."""
    pool = BufferPool(keep=2, slot_bytes=1000)
    resident = pool.acquire(5000, pooled=False)
    assert resident.nbytes == 5000 and not resident.pooled
    pool.release(resident)
    big = pool.acquire(2000)  # larger than a slot: its own size, not kept either
    pool.release(big)
    assert pool.pooled_bytes == 0
    slots = [pool.acquire(100) for _ in range(3)]
    for slot in slots:
        pool.release(slot)
    assert pool.pooled_bytes == 2 * 1000  # at most `keep` slots
    pool.clear()
    assert pool.pooled_bytes == 0


def test_fill_allocates_the_slots_with_the_given_allocator():
    made = []
    pool = BufferPool(lambda n: made.append(n) or (f"owner{len(made)}", np.empty(n, np.uint8)), keep=3, slot_bytes=64)
    pool.fill()
    assert made == [64, 64, 64] and pool.pooled_bytes == 3 * 64
    assert pool.acquire(10).owner in {"owner1", "owner2", "owner3"} and made == [64, 64, 64]


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



def test_an_expert_read_lays_its_tensors_out_in_the_order_asked(store):
    """A backend may ask for an expert's tensors in another order than the file's (torch: w1 then w3, so
    gate_up_proj is a view): each tensor is then packed at the next offset of the buffer, its bytes unchanged."""
    entry = next(e for e in store.manifest.stages if e.kind == "experts")
    want = file_tensors(store.folder / entry.file)
    as_filed = store.read_part(entry.name, 1)
    order = sorted(as_filed.tensors, key=lambda n: as_filed.tensors[n].offset, reverse=True)
    assert len(order) == 3 and order != sorted(order, key=lambda n: as_filed.tensors[n].offset)
    before = store.bytes_read
    data = store.read_part(entry.name, 1, order=order)
    assert store.bytes_read - before == as_filed.nbytes == data.nbytes
    at = 0
    for name in order:
        raw = data.tensors[name]
        assert raw.offset == at and torch.equal(as_torch(raw), want[name])
        assert np.shares_memory(raw.data, raw.owner) and raw.owner.nbytes == data.nbytes
        at += raw.nbytes
    with pytest.raises(ValueError, match="other tensors"):
        store.read_part(entry.name, 1, order=order[:2])


CHANGES = ["truncate", "replace_other", "replace_shorter", "rewrite_in_place", "delete"]


def change_file(path, how, other):
    import os
    import shutil
    if how == "truncate":  # `cp other/layer.001.safetensors here`: O_TRUNC on the same inode
        os.truncate(path, 100)
    elif how == "replace_other":  # re-sharding an updated checkpoint into the folder: tmp file + rename
        tmp = path.with_suffix(".new")
        shutil.copyfile(other, tmp)
        os.replace(tmp, path)
    elif how == "replace_shorter":
        tmp = path.with_suffix(".new")
        tmp.write_bytes(path.read_bytes()[:1000])
        os.replace(tmp, path)
    elif how == "rewrite_in_place":  # same size, same inode, new bytes
        data = bytearray(path.read_bytes())
        data[-8:] = b"\x01" * 8
        with open(path, "r+b") as f:
            f.write(data)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # filesystems with coarse clocks
    else:
        path.unlink()


CHANGED = """
import sys; sys.path.insert(0, {tests!r})
from pathlib import Path
import airmlx
from test_store import change_file
for how, shards in {cases!r}:
    with airmlx.AutoModel.from_pretrained(shards, backend={backend!r}, memory_budget="300KB") as m:
        first = m.generate([4, 5, 6], max_new_tokens=4)
        change_file(Path(shards) / "layer.001.safetensors", how, Path({other!r}) / "layer.001.safetensors")
        try:
            again = m.generate([4, 5, 6], max_new_tokens=4)
            print("RESULT", how, "same" if again == first else "DIFFERENT", flush=True)
        except airmlx.AirmlxError as e:
            print("RESULT", how, type(e).__name__, e, flush=True)
"""


@pytest.fixture(scope="module")
def changed_under_a_model(tmp_path_factory, request):
    """{(backend,): a future of the finished process} for this run's selected cases of the test below: a process
    per backend, started ahead, runs a model of its own for each case, changes one of its stage files, and runs
    it again."""
    import subprocess

    import airmlx

    from tiny import make_checkpoint, selected_params, started_ahead
    root = tmp_path_factory.mktemp("changed")
    make_checkpoint(root / "src", "llama")
    make_checkpoint(root / "other", "llama", seed=7)
    other = airmlx.shard_checkpoint(root / "other", root / "other-shards", progress=False)
    cases = {}
    for p in selected_params(request, __file__, ("test_a_stage_file_changed_under_a_running_model_is_a_clear_error",)):
        folder = airmlx.shard_checkpoint(root / "src", root / f"{p['backend']}-{p['how']}", progress=False)
        cases.setdefault(p["backend"], []).append((p["how"], str(folder)))

    def run(backend):
        script = CHANGED.format(tests=str(Path(__file__).parent), cases=cases[backend], backend=backend,
                                other=str(other))
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    with started_ahead([(backend,) for backend in cases], run) as done:
        yield done


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("how", CHANGES)
def test_a_stage_file_changed_under_a_running_model_is_a_clear_error(changed_under_a_model, backend, how):
    """Audit bug 10: a truncated stage killed a torch-CPU process (SIGBUS), a shorter one raised a raw
    ValueError, a replaced one silently mixed weights. Now: CorruptShardError naming the file, every time, in
    a process that survives all the changes (run apart, so a SIGBUS would show as a signal)."""
    done = changed_under_a_model[backend,].result()
    results = dict(line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("RESULT "))
    assert how in results, (done.returncode, done.stdout[-1000:], done.stderr[-2000:])
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    result = results[how]
    assert result.startswith("CorruptShardError stage layer.001") and "layer.001.safetensors" in result, result
    assert "python -m airmlx.shard --repair" in result or "reload the model" in result


def test_populating_a_mapping_leaves_the_compute_thread_running(tmp_path, store, monkeypatch):
    """Regression: mmap(MAP_POPULATE) ran inside CPython's mmap(), which holds the GIL, so the compute thread
    stood still for as long as the prefetch thread took to read a cold stage (no overlap of I/O and compute)."""
    import mmap
    import threading
    import time

    import airmlx.store as store_module
    from airmlx.store import evict, populate
    path = tmp_path / "stage"
    path.write_bytes(bytes(96 << 20))
    ratios = []
    for _ in range(3):
        evict([path])
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mapped, dtype=np.uint8)
        took = []

        def run(buf=buf, mapped=mapped):
            t0 = time.perf_counter()
            populate(buf, mapped)
            took.append(time.perf_counter() - t0)

        thread = threading.Thread(target=run)
        longest, last = 0.0, time.perf_counter()
        thread.start()
        while thread.is_alive():  # the compute thread: how long did it ever wait for the GIL?
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        thread.join()
        ratios.append(longest / took[0])
        del buf, mapped, run  # unmapped with the last reference
    assert min(ratios) < 0.5, ratios
    called = []
    monkeypatch.setattr(store_module, "populate", lambda buf, mapped: called.append(buf.size))
    entry = store.manifest.stages[0]
    store.map_stage(entry.name).tensors = None
    assert called == [entry.nbytes]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kept mappings: Linux (MADV_DONTNEED)")
def test_a_streamed_stages_mapping_is_kept_between_uses_without_its_pages(tmp_path, store):
    """Mapping, viewing and unmapping every stage at every sweep cost the 2-core bench machine about 0.25 ms of
    CPU per stage beside compute. The mapping and its views are now made once: release() drops the pages (the
    memory count with them; so does dropping a use never released), the next use maps them again, and a file
    changed in between is still an error."""
    import airmlx
    from airmlx.errors import CorruptShardError

    from tiny import make_checkpoint
    entry = next(e for e in store.manifest.stages if e.kind == "layer")
    first = store.map_stage(entry.name)
    name, raw = next(iter(first.tensors.items()))
    start = raw.data.ctypes.data - store.data_start(entry.name) - store.tensor_infos(entry.name)[name].start
    assert mapping_kib(start, "Rss:") > 0
    store.release(first)
    assert store.held_bytes == 0 and mapping_kib(start, "Rss:") == 0  # mapped still, its pages dropped
    again = store.map_stage(entry.name)
    assert again.tensors[name] is raw and store.held_bytes == entry.nbytes  # the same views, the pages back
    assert mapping_kib(start, "Rss:") > 0
    check_stage(store, entry, again)
    store.release(again)
    store.release(again)  # once only
    assert store.held_bytes == 0
    store.map_stage(entry.name)  # a use dropped without release(): its pages and count go with it
    assert store.held_bytes == 0 and mapping_kib(start, "Rss:") == 0

    make_checkpoint(tmp_path / "src", "llama")
    own = ShardStore(airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False))
    layer = next(e for e in own.manifest.stages if e.kind == "layer")
    own.release(own.map_stage(layer.name))
    os.utime(own.path(layer.name), ns=(0, 0))  # rewritten in place, as far as the store can tell
    with pytest.raises(CorruptShardError, match="changed while the model was open"):
        own.map_stage(layer.name)
    own.close()


def pmd_mapped_kib(addr: int) -> int:
    """FilePmdMapped of the mapping starting at addr (/proc/self/smaps), in KiB."""
    return mapping_kib(addr, "FilePmdMapped:")


def mapping_pmd_kib(path, fill) -> int:
    """FilePmdMapped (KiB) of a fresh read-only mapping of `path` once fill(buf, mapping) has populated it."""
    import mmap
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mapped, dtype=np.uint8)
    fill(buf, mapped)
    got = pmd_mapped_kib(buf.ctypes.data)
    del buf
    mapped.close()
    return got


def madvise(*advice):
    """fill for mapping_pmd_kib: madvise the whole mapping with each advice in turn (as asked by hand)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lambda buf, mapped: [libc.madvise(buf.ctypes.data, buf.size, a) for a in advice]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge page mappings of files: Linux")
def test_a_cold_mapping_is_read_into_huge_pages_where_the_system_can(tmp_path):
    """A warm streamed sweep maps, computes on and unmaps every stage again: with 2 MB folios mapped whole that
    costs a 512th of the page-table work. Where a mapping asked for huge pages by hand gets them (transparent
    huge pages on, a file system with large folios), populate() gets them too; without the request, not."""
    from airmlx.store import MADV_HUGEPAGE, MADV_POPULATE_READ, evict, populate
    path = tmp_path / "stage"
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())

    def cold_mapping(fill):
        evict([path])
        return mapping_pmd_kib(path, fill)

    by_hand = cold_mapping(madvise(MADV_HUGEPAGE, MADV_POPULATE_READ))
    if by_hand == 0:
        pytest.skip("this system maps files with small pages only (transparent huge pages off, or small folios)")
    assert cold_mapping(populate) >= by_hand // 2
    assert cold_mapping(madvise(MADV_POPULATE_READ)) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge page mappings of files: Linux")
def test_a_stage_read_into_small_folios_is_read_again_into_huge_pages_once(tmp_path, monkeypatch):
    """A stage file that another reader brought into the page cache (read(): small folios) cannot be mapped as
    huge pages, and every warm sweep pays for it (1.6-2 x on the 617.7 MB bench model). The store's first
    mapping of the stage tells (no part of it mapped as a huge page), drops the file from the page cache once and
    reads it again into huge pages; later mappings keep them and drop nothing."""
    import airmlx
    from airmlx import store as store_module
    from airmlx.store import MADV_HUGEPAGE, MADV_POPULATE_READ, evict

    from tiny import make_checkpoint
    make_checkpoint(tmp_path / "src", "llama", vocab_size=4096, hidden_size=512, intermediate_size=1024,
                    num_attention_heads=8, num_key_value_heads=4)
    folder = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    store = ShardStore(folder)
    path = store.path("embed")
    assert path.stat().st_size >= 4 << 20
    by_hand = lambda: mapping_pmd_kib(path, madvise(MADV_HUGEPAGE, MADV_POPULATE_READ))  # the folios as they are

    def read_in_small_pieces():
        evict([path])
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass

    evict([path])
    huge = by_hand()
    read_in_small_pieces()
    if huge == 0 or by_hand() != 0:
        pytest.skip("this system maps files with small pages only, or reads them into huge folios already")
    read_in_small_pieces()
    evicted = []
    monkeypatch.setattr(store_module, "evict", lambda paths: evicted.append(list(paths)) or evict(paths))

    def mapped_kib():
        data = store.map_stage("embed")
        name, raw = next(iter(data.tensors.items()))
        start = raw.data.ctypes.data - store.data_start("embed") - store.tensor_infos("embed")[name].start
        got = pmd_mapped_kib(start)
        data.tensors = None
        return got

    assert mapped_kib() >= huge // 2 and evicted == [[path]]
    assert mapped_kib() >= huge // 2 and evicted == [[path]]  # once: the folios are huge now
    store.close()


def test_the_store_stops_reading_again_where_files_never_map_as_huge_pages(tmp_path, monkeypatch):
    """Where even a fresh read leaves a stage in small folios (no huge pages for files on this system), the
    store reads one stage again, once, and then stops asking: never a second read of every stage."""
    import airmlx
    from airmlx import store as store_module

    from tiny import make_checkpoint
    make_checkpoint(tmp_path / "src", "llama")
    store = ShardStore(airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False))
    store._check_folios = True
    monkeypatch.setattr(ShardStore, "_small_folios", staticmethod(lambda *args: True))
    evicted = []
    monkeypatch.setattr(store_module, "evict", lambda paths: evicted.append(list(paths)))
    for name in list(store.stages) * 2:
        store.map_stage(name).tensors = None
    assert evicted == [[store.path(next(iter(store.stages)))]]
    store.close()
