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
