"""Interrupts and threads: a second Ctrl-C while the prefetcher restarts (audit bug 3), two threads on one model
and close() during a generate (audit bug 7). Nothing hangs, nothing mixes stages, the next call works."""
import os
import signal
import threading
import time

import pytest

import airmlx
from airmlx.errors import ModelClosedError

from tiny import make_checkpoint

PROMPT = [4, 5, 6, 7]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    make_checkpoint(root / "src", "llama", num_hidden_layers=8)  # enough layers that streaming prefetches
    return airmlx.shard_checkpoint(root / "src", root / "shards", progress=False)


def slow_reads(model, seconds):
    """Every streamed stage read takes `seconds` (a slow disk), from the next sweep on."""
    real = model.scheduler.read
    model.scheduler.read = lambda name: (time.sleep(seconds), real(name))[1]
    model.scheduler._stop_prefetch()  # the next sweep starts a prefetcher that reads through it
    return lambda: setattr(model.scheduler, "read", real)


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt here even where the suite was started with SIGINT ignored (a shell's
    background job: `nohup ... &`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_after(*delays):
    def run():
        for d in delays:
            time.sleep(d)
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_second_ctrl_c_during_the_prefetch_restart_leaves_a_working_model(shards, backend):
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="380KB") as m:
        assert m.plan.prefetch_depth and m.plan.streamed
        want = m.generate(PROMPT, max_new_tokens=4)
        restore = slow_reads(m, 1.0)
        sigint_after(1.5, 0.2)  # Ctrl-C mid-sweep, and again while the prefetcher is being stopped
        interrupts = 0
        for attempt in range(2):  # generate ends in a KeyboardInterrupt; a late second one lands in the sleep
            try:
                if attempt == 0:
                    m.generate(PROMPT, max_new_tokens=4)
                time.sleep(2)
            except KeyboardInterrupt:
                interrupts += 1
        assert interrupts >= 1
        restore()
        assert m.scheduler.prefetcher is None or m.scheduler.prefetcher.thread.is_alive()
        for _ in range(2):
            assert m.generate(PROMPT, max_new_tokens=4) == want


def test_waiting_on_a_stopped_prefetcher_raises_instead_of_hanging(shards):
    with airmlx.AutoModel.from_pretrained(shards, backend="torch", memory_budget="380KB") as m:
        want = m.generate(PROMPT, max_new_tokens=2)
        prefetcher = m.scheduler.prefetcher
        prefetcher.stop.set()
        prefetcher.thread.join()
        while not prefetcher.ready.empty():
            prefetcher.ready.get_nowait()
        with pytest.raises(RuntimeError, match="prefetch thread has stopped"):
            prefetcher.take("layer.000")
        assert m.generate(PROMPT, max_new_tokens=2) == want  # a sweep that failed started a new one


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_threads_on_one_model_take_turns(shards, backend):
    with airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="380KB") as m:
        want = m.generate(PROMPT, max_new_tokens=12)
        results, order, step = {}, [], m.step
        m.step = lambda *a, **k: order.append(threading.current_thread().name) or step(*a, **k)

        def run(i):
            try:
                results[i] = m.generate(PROMPT, max_new_tokens=12)
            except BaseException as e:  # noqa: BLE001 - the test reports whatever happened
                results[i] = e
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert all(results[i] == want for i in range(3)), results
        # a whole call after another (the lock is generate's), not step by step: each thread's steps in one run
        runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
        assert len(runs) == len(set(runs)) == 3, runs


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_close_during_generate_cancels_it_cleanly(shards, backend):
    m = airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="300KB")  # no prefetch thread
    real = m.backend.run_stage
    m.backend.run_stage = lambda *a: (time.sleep(0.01), real(*a))[1]
    outcome = {}

    def run():
        try:
            outcome["result"] = m.generate(PROMPT, max_new_tokens=200)
        except BaseException as e:  # noqa: BLE001
            outcome["result"] = e
    t = threading.Thread(target=run, daemon=True)  # a model built on one thread, run first on another
    t.start()
    time.sleep(1.0)
    m.close()  # waits for the running generate to stop at its next step
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome["result"], ModelClosedError), outcome
    with pytest.raises(ModelClosedError, match="closed"):
        m.generate(PROMPT, max_new_tokens=1)
    assert m.store.held_bytes == 0


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_measuring_a_closed_model_is_refused_and_maps_nothing(shards, backend):
    """Regression (QA): read_bandwidth() ran on a closed model, and on torch kept the stage files it measured
    mapped, with nothing left to unmap them (close() had run)."""
    m = airmlx.AutoModel.from_pretrained(shards, backend=backend, memory_budget="300KB")
    m.close()
    for measure in (m.read_bandwidth, m.expert_read_bandwidth):
        with pytest.raises(ModelClosedError, match="closed"):
            measure(cold=False)
    assert not m.store._kept_maps and m.store.held_bytes == 0
