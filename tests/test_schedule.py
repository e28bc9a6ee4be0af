"""Budget parsing, the planner's decisions and its error, and the prefetcher's order."""
import pytest

import airmlx
from airmlx.errors import BudgetError
from airmlx.plan import StageCost, make_plan
from airmlx.schedule import Prefetcher
from airmlx.units import parse_bytes

from tiny import interrupt_at

SIZES = {name: StageCost(n, n, n) for name, n in
         {"embed": 10, **{f"layer.{i:03d}": 100 for i in range(8)}, "head": 20}.items()}


@pytest.mark.parametrize("text, want", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500),
                                        (123, 123), ("77", 77)])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad, says", [("lots", "not a size"), ("4XB", "not a size"), (True, "not a size"),
                                       ("-1GB", "more than 0 bytes"), (0, "more than 0 bytes"), (-5, "more than 0 bytes")])
def test_parse_bytes_rejects(bad, says):
    with pytest.raises(BudgetError, match=says):
        parse_bytes(bad)


def test_everything_fits():
    plan = make_plan(SIZES, 10_000)
    assert plan.streamed == [] and plan.prefetch_depth == 0 and plan.streamed_bytes_per_step == 0


def test_below_largest_stage_is_an_error_naming_the_minimum():
    with pytest.raises(BudgetError, match="at least 100"):
        make_plan(SIZES, 99)


def test_tight_budget_streams_all_layers_with_one_prefetch_slot():
    plan = make_plan(SIZES, 230)
    assert plan.prefetch_depth == 1 and plan.resident == ["embed", "head"]
    assert plan.streamed_bytes_per_step == 800
    assert plan.total_bytes == 30 + 2 * 100 <= 230


def test_a_budget_between_one_and_two_stages_streams_without_prefetch():
    plan = make_plan(SIZES, 150)
    assert plan.prefetch_depth == 0 and plan.total_bytes <= 150


def test_resident_layers_are_spread_and_budget_kept():
    plan = make_plan(SIZES, 530)
    layers = [s for s in plan.resident if s.startswith("layer")]
    assert plan.prefetch_depth == 1 and layers == ["layer.001", "layer.004", "layer.006"]
    assert plan.total_bytes <= 530


def test_the_plan_reading_fewest_bytes_wins():
    """Head and embedding resident or streamed, prefetch or not: whatever reads least per step, a plan without
    prefetch counting 1.25 times its bytes (its reads wait for compute)."""
    from airmlx.plan import streaming_plan
    big_ends = {**SIZES, "embed": StageCost(300, 300, 300), "head": StageCost(300, 300, 300)}
    for budget in (700, 750, 900, 1200, 1350):  # the model holds 1400
        plan = make_plan(big_ends, budget)
        options = [p for kept in ([], ["head"], ["embed"], ["head", "embed"]) for depth in (0, 1, 2)
                   if (p := streaming_plan(big_ends, budget, kept, depth)) is not None]
        cost = lambda p: p.streamed_bytes_per_step * (1 if p.prefetch_depth else 1.25)
        assert cost(plan) == min(cost(p) for p in options) and plan.total_bytes <= budget
    assert make_plan(big_ends, 750).prefetch_depth == 0  # prefetching would cost 1300 bytes a step, not 800
    assert make_plan(SIZES, 930).streamed == []  # everything fits: nothing streams


def test_the_plan_budgets_loaded_bytes_not_file_bytes():
    """Audit bug 1: stages that grow when loaded (dequantised 4-bit, fp16 upcast on the CPU) took 2-7x the
    budget because the plan counted their file bytes."""
    grown = {name: StageCost(c.read, 4 * c.read, 5 * c.read) for name, c in SIZES.items()}
    plan = make_plan(grown, 2000)
    assert plan.total_bytes <= 2000
    assert plan.resident_bytes == sum(grown[s].held for s in plan.resident)
    assert plan.in_flight_bytes == plan.prefetch_depth * 100 + 500
    with pytest.raises(BudgetError, match="at least 500"):
        make_plan(grown, 499)


def test_no_prefetch_uses_budget_for_residents():
    plan = make_plan(SIZES, 630, prefetching=False)
    assert plan.prefetch_depth == 0 and plan.resident_bytes == 530 and plan.total_bytes == 630


class FakeStore:
    def __init__(self):
        self.reads, self.released, self.hints = [], [], []

    def read_stage(self, name):
        self.reads.append(name)
        return name

    def read_ahead(self, names):
        self.hints.append((len(self.reads), names))

    def release(self, data):
        self.released.append(data)


def test_prefetcher_cycles_across_steps_within_its_slots():
    store = FakeStore()
    pf = Prefetcher(store, ["a", "b", "c"], depth=1, read=store.read_stage)
    for name in ["a", "b", "c", "a", "b", "c", "a"]:
        assert pf.take(name) == name
        pf.done()
    pf.close()
    assert store.reads[:7] == ["a", "b", "c", "a", "b", "c", "a"]
    assert len(store.reads) <= 7 + 2  # never more than depth + 1 ahead
    assert store.hints == []  # it reads ahead itself: hints would only make the kernel read in small folios


def test_hints_go_to_stages_a_huge_page_mapping_does_not_read_better():
    from types import SimpleNamespace

    from airmlx.schedule import hinted_stages
    from airmlx.store import HUGE_MAPPINGS, HUGE_PAGE
    store = SimpleNamespace(stages={"a": SimpleNamespace(nbytes=HUGE_PAGE - 1), "b": SimpleNamespace(nbytes=HUGE_PAGE)})
    assert hinted_stages(store, ["a", "b"], mapped=False) == {"a", "b"}  # buffered reads: every stage
    assert hinted_stages(store, ["a", "b"], mapped=True) == ({"a"} if HUGE_MAPPINGS else {"a", "b"})


def test_a_sweep_without_prefetch_hints_the_stage_after_the_one_it_reads(checkpoints, tmp_path, monkeypatch):
    """With no room for a prefetch slot, the OS reads stage i + 1 into its page cache while stage i runs: the
    hints hold nothing of the process's, and the output is the same."""
    folder, _ = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as whole:
        want = whole.generate([4, 5, 6], max_new_tokens=4)
        budget = whole.minimum_budget  # one stage in flight, nothing ahead
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=budget) as model:
        assert model.plan.prefetch_depth == 0 and len(model.plan.streamed) > 2
        events = []
        read, read_ahead = model.scheduler.read, model.store.read_ahead
        monkeypatch.setattr(model.scheduler, "read", lambda name: events.append(("read", name)) or read(name))
        monkeypatch.setattr(model.store, "read_ahead", lambda names: events.append(("hint", *names)) or
                            read_ahead(names))
        assert model.generate([4, 5, 6], max_new_tokens=4) == want
        streamed = model.plan.streamed
        one_sweep = [e for name, after in zip(streamed, streamed[1:] + streamed[:1])
                     for e in (("read", name), ("hint", after))]
        assert events == one_sweep * 4
        assert model.store.readahead.hinted_bytes == model.plan.streamed_bytes_per_step * 4
        stats = model.memory_stats()
        assert stats["peak"] <= budget + stats["kv_cache_peak"] + stats["activation_bound"]


def test_a_streamed_stage_gives_its_prefetch_slot_back_once_the_next_is_loaded(checkpoints, tmp_path, monkeypatch):
    """The prefetch thread's next read (its Python: mapping a stage, making views) runs while the next stage
    computes in the framework's kernels, not while it loads (where the two threads took turns at the GIL): a
    streamed stage's slot goes back after the next stage's load and before its compute, and the sweep's last
    one when the sweep ends, never earlier, so no more stages are ever in flight; the output is the same."""
    folder, _ = checkpoints("llama", num_hidden_layers=8)  # enough layers that streaming prefetches
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as whole:
        want = whole.generate([4, 5, 6], max_new_tokens=4)
    budget = "380KB"
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget=budget) as model:
        assert model.plan.prefetch_depth >= 1 and len(model.plan.streamed) > 2
        model.generate([4, 5, 6], max_new_tokens=1)  # the resident stages are loaded once, here
        events = []
        load, run, done = model.backend.load_stage, model.backend.run_stage, Prefetcher.done
        monkeypatch.setattr(model.backend, "load_stage", lambda entry, t: events.append(("load", entry.name)) or
                            load(entry, t))
        monkeypatch.setattr(model.backend, "run_stage", lambda *a: events.append(("run",)) or run(*a))
        monkeypatch.setattr(Prefetcher, "done", lambda self: events.append(("slot",)) or done(self))
        assert model.generate([4, 5, 6], max_new_tokens=4) == want
        one_sweep, owed = [], False
        for entry in model.scheduler.entries:
            streamed = entry.name in model.plan.streamed
            one_sweep += [("load", entry.name)] * streamed + [("slot",)] * owed + [("run",)]
            owed = streamed
        one_sweep += [("slot",)] * owed
        assert events == one_sweep * 4
        stats = model.memory_stats()
        assert stats["peak"] <= stats["budget"] + stats["kv_cache_peak"] + stats["activation_bound"]


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="hints need posix_fadvise here")
def test_a_hint_brings_a_file_into_the_page_cache(tmp_path):
    import os
    import time

    from airmlx.readahead import ReadAhead
    from airmlx.store import evict
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (4 << 12))  # 4 MiB
        f.flush()
        os.fsync(f.fileno())  # only clean pages leave the page cache
    evict([path])
    before = cached_fraction(path)
    hints = ReadAhead()
    hints.hint([(path, path.stat().st_size)])
    deadline = time.monotonic() + 10
    while cached_fraction(path) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    hints.close()
    assert before < 0.5 and cached_fraction(path) == 1 and hints.hinted_bytes == path.stat().st_size


def cached_fraction(path) -> float:
    """The share of a file's pages in the page cache (mincore over a mapping of it, which reads nothing)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    vec = (ctypes.c_ubyte * pages)()
    try:
        assert libc.mincore(addr, size, vec) == 0
    finally:
        libc.munmap(addr, size)
    return sum(v & 1 for v in vec) / pages


def test_interrupted_sweep_restarts_prefetch(checkpoints, tmp_path):
    folder, _ = checkpoints("llama")
    shards = airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False)
    model = airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="260KB")
    want = model.generate([4, 5, 6], max_new_tokens=4)
    restore = interrupt_at(model.backend, 3)
    with pytest.raises(KeyboardInterrupt):
        model.generate([4, 5, 6], max_new_tokens=4)
    restore()
    assert model.generate([4, 5, 6], max_new_tokens=4) == want
    model.close()


def test_default_budget_leaves_room_for_kv_cache_and_activations():
    from airmlx.plan import default_budget, reserve_bytes
    llama70b = dict(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192,
                    intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072)
    kv = 80 * 2 * 8 * 128 * 4096 * 2  # 4096 tokens of bf16 keys and values
    assert kv < reserve_bytes(llama70b) < kv + 4 * 10**9
    # the KV cache at its real dtype: float32 (fp16 upcast on a CPU) takes twice the room
    assert reserve_bytes(llama70b, itemsize=4) - reserve_bytes(llama70b, itemsize=2) >= kv
    assert default_budget(64 * 10**9, llama70b) == int(0.8 * 64 * 10**9) - reserve_bytes(llama70b)
    assert default_budget(10**6, llama70b) == 0  # then make_plan says what the minimum is
    with pytest.raises(BudgetError, match="at least"):
        make_plan(SIZES, default_budget(10**6, llama70b))
