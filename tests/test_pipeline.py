"""The pipeline's parts in one process: the range split, the wire format, the link's timeouts and aborts (over an
in-process transport), rank 0's record of cache operations, a store and a sharder that hold one host's range, a
batch's token loop in micro-batches.
Several processes: tests/test_pipeline_ranks.py."""
import contextlib
import queue
import threading
import time

import numpy as np
import pytest

import airmlx
from airmlx.auto import make_backend
from airmlx.errors import BackendError, BudgetError, CorruptShardError
from airmlx.generation import generate_tokens, to_batch
from airmlx.manifest import Manifest, verify_folder
from airmlx.micro_batches import generate_in_parts
from airmlx.pipeline import (
    PipelineError,
    balanced_split,
    check_split,
    even_split,
    launched_framework,
    parse_split,
    range_cost,
    rank_budget,
)
from airmlx.pipeline_link import ABORT, PING, STEP, Link, pack, unpack
from airmlx.pipeline_model import RecordingBackend, open_pipeline
from airmlx.plan import StageCost
from airmlx.store import ShardStore

from tiny import make_checkpoint

KB = 1000


def uniform(layers=8, layer=100 * KB, ends=10 * KB):
    names = ["embed"] + [f"layer.{i:03d}" for i in range(layers)] + ["head"]
    sizes = [ends] + [layer] * layers + [ends]
    return names, {n: StageCost(b, b, b) for n, b in zip(names, sizes)}


def test_wire_format_round_trips_arrays_and_plain_values():
    obj = {"ids": np.arange(6, dtype=np.int64).reshape(2, 3), "mask": np.array([[0, 1]], dtype=np.int8),
           "x": [np.float32(1.5), (1, None, True), "text"], "empty": np.zeros((0, 4), dtype=np.float32)}
    back = unpack(pack(obj))
    assert back["ids"].dtype == np.int64 and back["ids"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["mask"].dtype == np.int8 and back["empty"].shape == (0, 4)
    assert back["x"] == [1.5, [1, None, True], "text"]
    back["ids"][0, 0] = 7  # a copy, not a view of the message
    with pytest.raises(TypeError):
        pack({"what": object()})


def test_split_and_budget_options():
    assert parse_split("9,9", 2) == [9, 9] and parse_split([3, 4, 5], 3) == [3, 4, 5] and parse_split(None, 2) is None
    for bad in ("9", "9,0", "a,b", "1,2,3"):
        with pytest.raises(PipelineError, match="give 2 whole numbers"):
            parse_split(bad, 2)
    assert rank_budget("4GB,8GB", 1, 2) == "8GB" and rank_budget("4GB", 1, 2) == "4GB" and rank_budget(None, 0, 2) is None
    with pytest.raises(BudgetError, match="one budget for every rank"):
        rank_budget("4GB,8GB", 0, 3)


def test_equal_budgets_split_the_bytes_evenly():
    names, costs = uniform()
    assert balanced_split(names, [costs] * 2, [10**9] * 2) == [5, 5]  # everything resident: the bytes decide
    assert even_split([10 * KB] + [100 * KB] * 8 + [10 * KB], 2) == [5, 5]
    tight = [250 * KB] * 2  # each rank streams most of its range
    counts = balanced_split(names, [costs] * 2, tight)
    streamed = [range_cost(costs, part, b) for part, b in zip((names[:counts[0]], names[counts[0]:]), tight)]
    assert counts == [5, 5] and abs(streamed[0] - streamed[1]) <= 100 * KB


def test_a_rank_with_more_memory_takes_more_stages_and_the_slowest_rank_gets_faster():
    names, costs = uniform()
    budgets = [250 * KB, 650 * KB]
    counts = balanced_split(names, [costs] * 2, budgets)
    assert counts[1] > counts[0]

    def worst(c):
        return max(range_cost(costs, names[:c[0]], budgets[0]), range_cost(costs, names[c[0]:], budgets[1]))

    assert worst(counts) < worst([5, 5])


def test_splits_that_cannot_work_say_why():
    names, costs = uniform(layers=2)
    with pytest.raises(PipelineError, match="too few for 4 ranks"):
        balanced_split(names, [costs] * 4, [10**9] * 4)
    with pytest.raises(BudgetError, match="rank 1's memory budget"):
        balanced_split(names, [costs] * 2, [10**9, 50 * KB])  # rank 1 cannot hold even one layer loading
    assert balanced_split(names, [costs] * 3, [10**9] * 3)[0] >= 2  # rank 0: the embedding and a layer


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    make_checkpoint(root / "src", "mixtral")
    return root


def test_check_split_keeps_experts_with_their_layer_and_a_layer_on_rank_0(moe_source):
    full = airmlx.shard_checkpoint(moe_source / "src", moe_source / "full", progress=False)
    manifest = Manifest.load(full)
    assert check_split(manifest, [2, 2]) == [["embed", "layer.000", "layer.000.experts"],
                                             ["layer.001", "layer.001.experts", "head"]]
    with pytest.raises(PipelineError, match="rank 0 must run the embedding and at least one layer"):
        check_split(manifest, [1, 3])
    # a split that does not add up is an option's error, not a damaged shard folder's (QA)
    with pytest.raises(PipelineError, match=r"pipeline split \[2, 3\]: 5 stages in all, but the model has 4"):
        check_split(manifest, [2, 3])
    with pytest.raises(PipelineError, match="but the model has 4"):
        airmlx.shard_checkpoint(moe_source / "src", moe_source / "split", hosts=2, rank=0, pipeline_split="3,3",
                                progress=False)


def test_a_host_folder_holds_its_range_and_the_same_manifest_entries(moe_source, tmp_path):
    full = Manifest.load(airmlx.shard_checkpoint(moe_source / "src", moe_source / "full", progress=False))
    from airmlx.shard import main
    assert main([str(moe_source / "src"), str(tmp_path / "r1"), "--hosts", "2", "--rank", "1"]) == 0
    part = Manifest.load(tmp_path / "r1")
    assert part.pipeline == {"stages_per_host": [2, 2], "rank": 1}
    held = {s.name for s in part.held_stages()}
    assert held == {"layer.001", "layer.001.experts", "head"}
    assert {p.name for p in (tmp_path / "r1").glob("*.safetensors")} == {f"{n}.safetensors" for n in held}
    assert [(s.name, s.nbytes, s.checksum) for s in part.stages] == [(s.name, s.nbytes, s.checksum) for s in full.stages]
    assert verify_folder(tmp_path / "r1") == []
    before = (tmp_path / "r1" / "head.safetensors").stat().st_mtime_ns
    airmlx.shard_checkpoint(moe_source / "src", tmp_path / "r1", progress=False, hosts=2, rank=1)  # reused
    assert (tmp_path / "r1" / "head.safetensors").stat().st_mtime_ns == before
    assert main([str(moe_source / "src"), str(tmp_path / "bad"), "--hosts", "2", "--rank", "2"]) == 2
    assert main([str(moe_source / "src"), str(tmp_path / "bad"), "--hosts", "2", "--rank", "0",
                 "--pipeline-split", "3,3"]) == 2
    assert not (tmp_path / "bad").exists()  # Regression (QA): refused after an empty folder was made


def test_a_store_opens_only_the_stages_it_reads(moe_source, tmp_path):
    airmlx.shard_checkpoint(moe_source / "src", tmp_path / "r0", progress=False, hosts=2, rank=0)
    with pytest.raises(CorruptShardError, match="layer.001"):
        ShardStore(tmp_path / "r0")  # the whole model: the other host's files are not here
    mine = ["embed", "layer.000", "layer.000.experts"]
    store = ShardStore(tmp_path / "r0", stages=mine)
    assert list(store.stages) == mine
    (tmp_path / "r0" / "layer.000.safetensors").unlink()
    with pytest.raises(CorruptShardError, match="layer.000"):
        ShardStore(tmp_path / "r0", stages=mine)


def test_the_launcher_decides_the_framework(monkeypatch, tmp_path):
    assert launched_framework({}) is None
    assert launched_framework({"MLX_RANK": "1"}) == "mlx"
    assert launched_framework({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}) == "torch"
    assert launched_framework({"RANK": "0", "WORLD_SIZE": "2"}) is None  # not torchrun's full set
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(BackendError, match="mlx.launch"):
        airmlx.AutoModel.from_pretrained(tmp_path, backend="torch")


class Wires:
    """In-process transports: one queue per (src, dst); a receive times out as gloo's does."""

    def __init__(self, size):
        self.queues = {(a, b): queue.Queue() for a in range(size) for b in range(size)}
        self.size = size

    def transport(self, rank, times_out=True):
        wires = self

        class Transport:
            def __init__(self):
                self.rank, self.size, self.times_out = rank, wires.size, times_out
                self.broken, self.release = False, threading.Event()

            def send(self, x, dst, wait=True):
                wires.queues[rank, dst].put(np.array(x, copy=True))

            def recv(self, shape, dtype, src, timeout, is_numpy):
                if self.broken:
                    raise RuntimeError("[ring] connection to a peer was lost")
                if not self.times_out:  # like MLX: waits until something ends it
                    self.release.wait()
                    raise RuntimeError("released")
                try:
                    x = wires.queues[src, rank].get(timeout=timeout)
                except queue.Empty:
                    raise RuntimeError("Timed out waiting for recv") from None
                assert x.shape == shape
                return x

            def flush(self, timeout):
                pass

            def close(self):
                pass

        return Transport()


def in_process_pipeline(shards, backend, size=2):
    """Rank 0's PipelineModel over in-process wires, with the other ranks following it in threads (they end when
    it closes the model): (model, the followers' threads)."""
    wires, barrier, rows = Wires(size), threading.Barrier(size), {}

    def transport(rank):
        t = wires.transport(rank)
        t.describe = lambda x: ([*x.shape], "framework", False)  # hidden states travel as the framework's arrays
        t.send = lambda x, dst, wait=True: wires.queues[rank, dst].put(np.array(x, copy=True)
                                                                       if isinstance(x, np.ndarray) else x)

        def all_gather(row):
            rows[rank] = row
            barrier.wait()
            out = np.stack([rows[r] for r in range(size)])
            barrier.wait()
            return out

        t.all_gather = all_gather
        return t

    manifest = Manifest.load(shards)
    opened = [lambda r=r: open_pipeline(shards, make_backend(backend, manifest), transport(r), "1GB", timeout=30,
                                        progress=False) for r in range(size)]
    followers = [threading.Thread(target=f, daemon=True) for f in opened[1:]]
    for f in followers:
        f.start()
    return opened[0](), followers


def test_a_pipeline_refuses_a_draft_model_given_to_generate(tmp_path):
    """Regression (QA): generate(draft_model=AirModel) on a pipeline speculated; a tree's accepted path
    (keep_cache_positions) was not repeated on the other ranks, whose caches then differed: the pipeline ended
    with "rank 1: The size of tensor a (38) must match the size of tensor b (31)"."""
    from airmlx.errors import DraftModelError
    make_checkpoint(tmp_path / "src", "llama")
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    draft = airmlx.AutoModel.from_pretrained(shards, backend="torch")
    model, followers = in_process_pipeline(shards, "torch")
    try:
        prompt = [5, 17, 33, 2, 9, 60, 7]
        assert model.generate(prompt, max_new_tokens=6) == draft.generate(prompt, max_new_tokens=6)
        with pytest.raises(DraftModelError, match="a pipeline over several ranks does not speculate"):
            model.generate(prompt, max_new_tokens=6, draft_model=draft)
        assert model.generate(prompt, max_new_tokens=6, draft_model=False) == draft.generate(prompt, max_new_tokens=6)
    finally:
        model.close()
        draft.close()
        for f in followers:
            f.join(30)
    assert not any(f.is_alive() for f in followers)


def test_messages_arrive_whole_and_pings_reach_every_waiting_rank():
    wires = Wires(3)
    links = [Link(wires.transport(r), timeout=2) for r in range(3)]
    links[0].send(PING, hops=1)
    links[0].send(STEP, {"ops": [["new", 0, 2, [0, 1]]]}, [np.ones((2, 3), dtype=np.float32)])
    msg = links[1].recv("a step")  # the ping is passed on, not returned
    assert msg.kind == STEP and msg.payload["ops"] == [["new", 0, 2, [0, 1]]] and msg.arrays[0].sum() == 6
    forwarded = wires.queues[1, 2].get_nowait()
    assert forwarded[1] == PING and forwarded[4] == 2  # hops: rank 2 hears rank 0's ping
    assert wires.queues[1, 2].empty()
    links[2].send(PING, hops=2, origin=0)  # the last hop: rank 0 is not pinged by its own ping
    wires.queues[2, 0].get_nowait()
    links[1].send(PING, hops=2, origin=0)
    links[1].send(STEP, {}, [])
    assert links[2].recv("a step").kind == STEP and wires.queues[2, 0].empty()


def test_a_lost_link_or_a_silence_fails_naming_the_rank_and_tells_the_next():
    wires = Wires(3)
    t1 = wires.transport(1)
    link = Link(t1, timeout=0.3)
    t1.broken = True
    with pytest.raises(PipelineError, match="rank 1: lost the link to rank 0"):
        link.recv("a step")
    header = wires.queues[1, 2].get_nowait()
    assert header[1] == ABORT
    t1.broken = False
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match="no message from rank 0 for 0.3 s"):
        link.recv("a step")
    assert time.monotonic() - t0 < 2


def test_an_abort_ends_the_rank_with_the_culprits_error_and_travels_on():
    wires = Wires(3)
    links = [Link(wires.transport(r), timeout=2) for r in range(3)]
    links[2].abort("rank 1: it broke", culprit=1)  # rank 2 saw rank 1 fail: rank 0 must hear of it
    with pytest.raises(PipelineError, match="rank 1: it broke"):
        links[0].recv("results")
    assert wires.queues[0, 1].empty()  # rank 1 is the culprit: nothing is sent to it


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "10", None, True])
def test_a_pipeline_timeout_that_is_not_a_finite_positive_number_is_refused(timeout):
    """Regression (QA): "10" (from Python) or None raised a TypeError, inf (--pipeline-timeout inf) killed the
    watchdog thread with an OverflowError (no receive could time out), True was 1 s."""
    with pytest.raises(PipelineError, match="use a finite number of seconds > 0"):
        Link(Wires(2).transport(1), timeout=timeout)


def test_the_watchdog_ends_a_receive_the_transport_cannot_time_out(monkeypatch):
    wires = Wires(2)
    transport = wires.transport(1, times_out=False)
    expired = []

    def expire(self, message):  # instead of printing and leaving the process
        expired.append(message)
        transport.release.set()

    monkeypatch.setattr(Link, "_expire", expire)
    link = Link(transport, timeout=0.3)
    with pytest.raises(PipelineError):
        link.recv("results")
    assert expired and "rank 1: no message from rank 0" in expired[0]


class FakeBackend:
    name = "fake"

    def new_cache(self, batch_size, left_padding):
        return type("Cache", (), {})()

    def select_rows(self, cache, rows):
        pass

    def trim_cache(self, cache, keep):
        pass

    def merge_caches(self, caches, lengths):
        return None if len(caches) > 2 else self.new_cache(1, [0])  # more than two "cannot merge"

    def extract_cache(self, cache, row, length):
        return self.new_cache(1, [0])

    def begin_step(self, tokens, attention_mask, cache, all_positions=False, targets=None):
        return ("local", tokens.shape)

    def logits(self, x):
        return "framework"


def test_rank_0_records_what_the_others_must_repeat():
    rec = RecordingBackend(FakeBackend())
    cache = rec.new_cache(2, [0, 3])
    rec.select_rows(cache, np.array([1]))
    rec.trim_cache(cache, 4)
    step = rec.begin_step(np.ones((1, 2), dtype=np.int64), np.ones((1, 6), dtype=np.int64), cache, True)
    assert step.local == ("local", (1, 2)) and step.spec["cache"] == 0 and step.spec["args"] == [True]
    assert step.spec["mask"].dtype == np.int8
    assert rec.take_ops() == [["new", 0, 2, [0, 3]], ["select", 0, [1]], ["trim", 0, 4]]
    del cache, step
    import gc
    gc.collect()
    assert rec.take_ops() == [["drop", 0]]
    a, b = rec.new_cache(1, [0]), rec.new_cache(1, [0])  # the server's engine joins requests and parts them
    assert rec.merge_caches([a, b, a], [[1], [2], [1]]) is None
    both = rec.merge_caches([a, b], [[3], [2]])
    one = rec.extract_cache(both, 1, 2)
    assert rec.cache_id(both) == 3 and rec.cache_id(one) == 4
    assert rec.take_ops() == [["new", 1, 1, [0]], ["new", 2, 1, [0]], ["merge", 3, [1, 2], [[3], [2]]],
                              ["extract", 4, 3, 1, 2]]
    assert rec.logits(np.zeros(2)).shape == (2,) and rec.logits(object()) == "framework" and rec.name == "fake"
    with pytest.raises(PipelineError, match="made outside this model"):
        rec.begin_step(np.ones((1, 1)), np.ones((1, 1)), FakeBackend().new_cache(1, [0]))


class LaterSteps:
    """A model whose steps come back later, as on a pipeline's rank 0: start_step computes at once and queues
    the logits; wait_for() and leaving overlapped() hand them out, oldest first."""

    def __init__(self, model):
        self.model, self.queue, self.most_in_flight = model, [], 0

    def new_cache(self, *args):
        return self.model.new_cache(*args)

    def start_step(self, tokens, mask, cache, on_logits):
        self.queue.append((on_logits, self.model.step(tokens, mask, cache)))
        self.most_in_flight = max(self.most_in_flight, len(self.queue))

    def wait_for(self, ready):
        while not ready():
            on_logits, logits = self.queue.pop(0)
            on_logits(logits)

    @contextlib.contextmanager
    def overlapped(self):
        yield
        self.wait_for(lambda: not self.queue)


def test_micro_batches_give_what_the_whole_batch_gives(tmp_path):
    """generate_in_parts keeps every micro-batch's step in flight until that micro-batch needs its logits, and
    puts the parts back together: rows ending early (an EOS) are filled with padding as in the whole batch."""
    make_checkpoint(tmp_path / "src", "llama")
    shards = airmlx.shard_checkpoint(tmp_path / "src", tmp_path / "shards", progress=False)
    prompts = [[5, 17, 33, 2, 9], [8, 90], [3, 4, 5, 6], [7, 7, 1]]
    with airmlx.AutoModel.from_pretrained(shards, backend="torch") as model:
        free = model.generate(prompts, max_new_tokens=8)
        eos = free[1][5 + 2]  # the third new token of the second row ends it early
        ids, mask, _ = to_batch(prompts, None, 0)
        for parts in (2, 4):
            for sampling in ({"do_sample": False}, {"do_sample": True, "temperature": 0.7, "top_k": 5}):
                options = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0, top_p=1.0, **sampling)
                options.setdefault("temperature", 1.0)
                options.setdefault("top_k", 0)
                whole = generate_tokens(model.step, model.new_cache, ids, mask, rng=np.random.default_rng(0),
                                        select_rows=model.backend.select_rows, **options)
                later = LaterSteps(model)
                got = generate_in_parts(later, ids, mask, parts, rng=np.random.default_rng(0),
                                        select_rows=model.backend.select_rows, **options)
                assert later.most_in_flight == parts and got.shape[0] == len(prompts)
                if not sampling["do_sample"]:
                    assert got.tolist() == whole.tolist()
                    assert (got[1, 5 + 3:] == 0).all() and got.shape == whole.shape
                else:  # the parts take turns drawing: other draws, the same prompts and padding
                    assert (got[:, :5] == ids).all() and got.shape[1] <= 5 + 8
        # Regression (QA): without a pad id a row that ended early was filled with 0, not with the EOS id as the
        # whole batch fills it
        options = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=None, top_p=1.0, do_sample=False,
                       temperature=1.0, top_k=0)
        whole = generate_tokens(model.step, model.new_cache, ids, mask, rng=np.random.default_rng(0),
                                select_rows=model.backend.select_rows, **options)
        got = generate_in_parts(LaterSteps(model), ids, mask, 4, rng=np.random.default_rng(0),
                                select_rows=model.backend.select_rows, **options)
        assert got.tolist() == whole.tolist() and (got[1, 5 + 3:] == eos).all()
