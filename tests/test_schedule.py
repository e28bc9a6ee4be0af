"""Budget parsing, the planner's decisions and its error, and the prefetcher's order."""
import pytest

import airmlx
from airmlx.errors import BudgetError
from airmlx.schedule import Prefetcher, make_plan
from airmlx.units import parse_bytes

from tiny import interrupt_at

SIZES = {"embed": 10, **{f"layer.{i:03d}": 100 for i in range(8)}, "head": 20}


@pytest.mark.parametrize("text, want", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500),
                                        (123, 123), ("77", 77)])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["lots", "-1GB", "4XB", 0, -5, True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(BudgetError, match="not a size"):
        parse_bytes(bad)


def test_everything_fits():
    plan = make_plan(SIZES, 10_000)
    assert plan.streamed == [] and plan.prefetch_depth == 0 and plan.streamed_bytes_per_step == 0


def test_below_largest_stage_is_an_error_naming_the_minimum():
    with pytest.raises(BudgetError, match="at least 100"):
        make_plan(SIZES, 99)


def test_tight_budget_streams_all_layers_with_one_prefetch_slot():
    plan = make_plan(SIZES, 150)
    assert plan.prefetch_depth == 1 and plan.resident == ["embed", "head"]
    assert plan.streamed_bytes_per_step == 800
    assert plan.resident_bytes + plan.prefetch_depth * 100 <= 150


def test_resident_layers_are_spread_and_budget_kept():
    plan = make_plan(SIZES, 630)
    layers = [s for s in plan.resident if s.startswith("layer")]
    assert plan.prefetch_depth == 2 and len(layers) == 4
    assert layers == ["layer.001", "layer.003", "layer.005", "layer.007"]
    assert plan.resident_bytes + plan.prefetch_depth * 100 <= 630


def test_no_prefetch_uses_budget_for_residents():
    plan = make_plan(SIZES, 630, prefetching=False)
    assert plan.prefetch_depth == 0 and plan.resident_bytes == 630


class FakeStore:
    def __init__(self):
        self.reads, self.released = [], []

    def read_stage(self, name):
        self.reads.append(name)
        return name

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
    from airmlx.schedule import default_budget, reserve_bytes
    llama70b = dict(num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, hidden_size=8192,
                    intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072)
    kv = 80 * 2 * 8 * 128 * 4096 * 2  # 4096 tokens of bf16 keys and values
    assert kv < reserve_bytes(llama70b) < kv + 2 * 10**9
    assert default_budget(64 * 10**9, llama70b) == int(0.8 * 64 * 10**9) - reserve_bytes(llama70b)
    assert default_budget(10**6, llama70b) == 0  # then make_plan says what the minimum is
    with pytest.raises(BudgetError, match="at least"):
        make_plan(SIZES, default_budget(10**6, llama70b))


class FakeBackend:
    """Records what the scheduler asks of a backend; a stage's output counts the stages run so far."""
    name, zero_copy = "fake", False

    def __init__(self, store):
        self.store, self.events, self.live, self.most_held = store, [], set(), 0

    def load_stage(self, entry, tensors):
        assert tensors, entry.name
        self.events.append(("load", entry.name))
        self.live.add(entry.name)
        return entry.name

    def run_stage(self, stage, x, ctx):
        assert stage in self.live
        self.events.append(("run", stage))
        self.most_held = max(self.most_held, self.store.held_bytes)
        return (x or 0) + 1

    def free_stage(self, stage):
        self.events.append(("free", stage))
        self.live.discard(stage)


@pytest.mark.parametrize("prefetching", [True, False])
def test_scheduler_loads_runs_and_frees_in_sweep_order(checkpoints, tmp_path, prefetching):
    from airmlx.schedule import Scheduler
    from airmlx.store import ShardStore
    folder, _ = checkpoints("llama")
    store = ShardStore(airmlx.shard_checkpoint(folder, tmp_path / "s", progress=False))
    sizes = {s.name: s.nbytes for s in store.manifest.stages}
    layer = sizes["layer.000"]
    plan = make_plan(sizes, sizes["embed"] + sizes["head"] + layer * 3 // 2, prefetching)
    assert plan.prefetch_depth == (1 if prefetching else 0) and plan.streamed
    assert {"embed", "head"} <= set(plan.resident)
    backend = FakeBackend(store)
    scheduler = Scheduler(store, backend, plan)
    assert [scheduler.forward(None) for _ in range(3)] == [6, 6, 6]  # embed, 4 layers, head

    def sweep(first):
        events = []
        for name in sizes:
            resident = name in plan.resident
            events += ([("load", name)] if first or not resident else []) + [("run", name)]
            events += [] if resident else [("free", name)]
        return events

    # resident stages load once; streamed ones load, run and free every sweep, in order
    assert backend.events == sweep(True) + sweep(False) + sweep(False)
    # stage bytes in hand: the residents' read buffers are given back after loading; at most depth + 1
    # streamed stages are read ahead or computing
    assert backend.most_held <= (plan.prefetch_depth + 1) * layer
    assert store.bytes_read >= plan.resident_bytes + 3 * plan.streamed_bytes_per_step
    scheduler.close()
    assert sorted(backend.events[-len(plan.resident):]) == sorted(("free", n) for n in plan.resident)
    assert store.held_bytes == 0
