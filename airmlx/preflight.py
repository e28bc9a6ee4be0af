"""What speed to expect from a streamed model: the disk where its shard folder lives, measured with the store's
own reads (cold: files evicted from the page cache; warm: from it), the compute of a few steps, and the sweep
simulated from the plan: one reader thread reading streamed stages in order, at most prefetch depth + 1 of
them ahead, stages computing in order once read. `python -m airmlx.doctor` prints it; the measured bandwidths
are saved in the shard folder (preflight.json) for the CLIs' one-line preflight and the stats line.
"""
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .manifest import write_atomic
from .units import format_bytes, per_token

PREFLIGHT_NAME = "preflight.json"
SAMPLE_BYTES = 512 << 20  # the most stage bytes the bandwidth measurement reads
QUICK_SAMPLE_BYTES = 128 << 20  # what the CLIs' one-line preflight reads
EXPERT_SAMPLE_BYTES = 128 << 20  # the most routed-expert bytes the bandwidth measurement reads


@dataclass
class Preflight:
    cold_bps: float  # bytes per second from the disk
    warm_bps: float  # bytes per second from the page cache
    streamed_per_step: int = 0
    compute_s: dict = None  # stage name -> seconds of one decode step's load and compute
    prefill_s_per_token: float = 0.0  # compute of one prompt token through every stage
    cold_s_per_token: float = 0.0
    warm_s_per_token: float = 0.0
    experts_per_step: int = 0  # MoE: routed experts' bytes a decode step reads (measured, or from the profile)
    expert_cold_bps: float = 0.0  # MoE: bytes per second reading routed experts as steps do (0: not measured)
    expert_warm_bps: float = 0.0


def measure_disk(model, sample_bytes=SAMPLE_BYTES):
    """(cold, warm) bytes per second reading up to sample_bytes of the model's streamed stages."""
    return model.read_bandwidth(cold=True, limit_bytes=sample_bytes), \
        model.read_bandwidth(cold=False, limit_bytes=sample_bytes)


def measure_experts(model, sample_bytes=EXPERT_SAMPLE_BYTES):
    """(cold, warm) bytes per second reading up to sample_bytes of the model's routed experts as its decode
    steps read them, or (0.0, 0.0) for a model without routed experts."""
    if not model.plan.expert_bytes:
        return 0.0, 0.0
    return model.expert_read_bandwidth(cold=True, limit_bytes=sample_bytes), \
        model.expert_read_bandwidth(cold=False, limit_bytes=sample_bytes)


def sweep_seconds(plan, compute_s, bps, steps=3):
    """A decode step's seconds in the steady state: a reader reads the streamed stages in sweep order, cycling
    across steps, each once a slot is free (at most depth + 1 stages read, waiting or computing); each stage
    computes once it is read and the one before it is done; without prefetch a stage's read waits for the
    sweep to reach it. Simulated over a few steps; the last one is the answer."""
    streamed = set(plan.streamed)
    done = []  # compute end of each streamed stage, in read order
    reader = clock = step_start = 0.0
    for _ in range(steps):
        step_start = clock
        for name in plan.stages:
            if name in streamed:
                j = len(done)
                if plan.prefetch_depth:
                    start = max(reader, done[j - plan.prefetch_depth - 1] if j > plan.prefetch_depth else 0.0)
                else:
                    start = clock
                reader = start + plan.stages[name].read / bps
                clock = max(clock, reader)
            clock += compute_s.get(name, 0.0)
            if name in streamed:
                done.append(clock)
    return clock - step_start


def stage_compute(model, batch: int = 1, steps: int = 2, prompt: int = 4, keep_records: bool = False) -> tuple:
    """({stage name: seconds to load and run it in a decode step of `batch` rows}, seconds of the prefill of
    `prompt` tokens before those steps, MoE: (expert bytes read, seconds waited for them) per decode step):
    the stages profiled, the model's own profiling left as it was (its records then hold these steps too
    with keep_records=True: the doctor's --profile)."""
    profiling, records = model.profiling, list(model.profile_records)
    routed = model.scheduler.experts
    usage = (Counter(routed.usage), Counter(routed.decode_usage)) if routed else None
    model.profiling = True
    model.profile_records.clear()
    cache = model.new_cache(batch, [0] * batch)
    tokens = (np.arange(batch * prompt).reshape(batch, prompt) % (model.config["vocab_size"] - 3) + 3)
    t0 = time.perf_counter()
    model.step(tokens, np.ones_like(tokens), cache)
    prefill = time.perf_counter() - t0
    experts = model.memory_stats()
    for i in range(steps):
        model.step(np.full((batch, 1), 5 + i), np.ones((batch, prompt + i + 1), dtype=np.int64), cache)
    after = model.memory_stats()
    expert_reads = tuple((after.get(k, 0) - experts.get(k, 0)) / steps for k in ("expert_bytes_read", "expert_wait_s"))
    first = min(r.step for r in model.profile_records)
    compute = {}
    for r in model.profile_records:
        if r.step > first:
            compute[r.stage] = compute.get(r.stage, 0.0) + (r.load_s + r.compute_s) / steps
    model.profiling = profiling
    model.profile_records[:] = records + (model.profile_records if keep_records else [])
    if usage:  # these synthetic steps' routing stays out of the usage profile saved on close
        routed.usage, routed.decode_usage = usage
    return compute, prefill, expert_reads


def predict(model, cold_bps, warm_bps, steps=3, prompt=64, expert_bps=(0.0, 0.0), keep_records=False):
    """A Preflight: compute measured on a prefill and a few warm decode steps (profiling the stages), then
    the sweep simulated at the two bandwidths. A MoE step also reads the experts its tokens route to that the
    cache lacks, once its router has run, so with nothing to compute meanwhile: those bytes, as the decode
    steps read them, are added in place of the time the steps waited for them, at expert_bps (cold, warm:
    measure_experts()) where measured, else at the stages' bandwidths. The bytes are those the cache misses
    once settled, where the usage profile holds enough routing to say (ExpertCache.steady_miss_bytes): a few
    steps after a prefill miss more than a long run does (2 x on a bench MoE of 19 MB experts). keep_records:
    as stage_compute's."""
    compute, prefill, (expert_bytes, expert_wait) = stage_compute(model, 1, steps, prompt, keep_records)
    cache = model.scheduler.experts
    settled = cache.steady_miss_bytes() if cache is not None else None
    expert_bytes = expert_bytes if settled is None else settled
    plan = model.plan
    prefill_compute = max(prefill - plan.streamed_bytes_per_step / warm_bps, prefill * 0.5)
    cold, warm = (sweep_seconds(plan, compute, bps) - expert_wait + expert_bytes / (experts or bps)
                  for bps, experts in zip((cold_bps, warm_bps), expert_bps))
    return Preflight(cold_bps, warm_bps, plan.streamed_bytes_per_step, compute, prefill_compute / prompt,
                     cold, warm, int(expert_bytes), *expert_bps)


def save(folder, preflight):
    try:
        write_atomic(Path(folder) / PREFLIGHT_NAME, json.dumps(asdict(preflight)).encode())
    except OSError:
        pass  # a read-only shard folder keeps no record


def load(folder):
    try:
        return Preflight(**json.loads((Path(folder) / PREFLIGHT_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def quick(model):
    """The one-line preflight the CLIs print the first time they open a model (and save for later)."""
    cold, warm = measure_disk(model, QUICK_SAMPLE_BYTES)
    record = Preflight(cold, warm, model.plan.streamed_bytes_per_step)
    save(model.shard_dir, record)
    floor = record.streamed_per_step / cold
    return (f"preflight: disk {format_bytes(cold)}/s cold, {format_bytes(warm)}/s warm; "
            f"{format_bytes(record.streamed_per_step)} read per token: at best {per_token(floor)} cold "
            "(python -m airmlx.doctor for the full prediction)")


