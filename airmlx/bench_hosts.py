"""`python -m airmlx.bench --hosts N`: the pipeline over N ranks on this machine against one process, and the
model's prediction for N hosts that each have their own disk.

The same generated model and per-rank budget as python -m airmlx.bench. Measured, in the cold regime (every
rank's streamed stage files evicted from the page cache before each step): decode tokens/s of a batch with
one process and with N ranks (launched by mlx.launch for --backend mlx, torchrun for torch, on 127.0.0.1), and
the bytes each rank reads per sweep (goal: model bytes / N, give or take a stage); and model.generate's decode
tokens/s, warm and cold, with the batch whole and split into a micro-batch per rank. Ranks on one machine share
its disk and cores, so the measured speed-up is not what N machines would see; the prediction puts each rank
on a disk of its own at the bandwidth measured here: a decode step is the ranks' sweeps one after another
(each reading its streamed stages and computing, as airmlx.preflight simulates it), independent work in a
pipeline (scoring passes) goes at the pace of the slowest rank, and a batch in micro-batches takes one sweep
of the slowest rank per micro-batch (under the budget, and with every range resident).
"""
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .plan import make_plan
from .preflight import stage_compute, sweep_seconds
from .store import evict
from .units import format_bytes

LAUNCH_LIMIT_S = 1800


def free_port(span: int) -> int:
    """A loopback port p with p .. p + span - 1 free (the MLX ring listens on one port per rank)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535 and all(_free(port + i) for i in range(span)):
            return port


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launcher(backend: str, hosts: int) -> list:
    """The framework's own launcher for `hosts` ranks on this machine."""
    bindir = Path(sys.executable).parent
    if backend == "mlx":
        exe = bindir / "mlx.launch" if (bindir / "mlx.launch").is_file() else shutil.which("mlx.launch")
        return [str(exe), "-n", str(hosts), "--backend", "ring", "--starting-port", str(free_port(hosts)),
                sys.executable]
    exe = bindir / "torchrun" if (bindir / "torchrun").is_file() else shutil.which("torchrun")
    return [str(exe), "--nproc-per-node", str(hosts), "--master-addr", "127.0.0.1", "--master-port", str(free_port(1))]


@contextlib.contextmanager
def cold_sweeps(model, drop=None):
    """Inside, every sweep of `model` starts its reads with its streamed stage files out of the page cache (the
    cold regime): drop() (a pipeline's model.drop_page_cache), or evicting this model's streamed files, runs
    before the sweep, or before the read-ahead hint that precedes it (a speculative round's, given before its
    drafting: the disk's work during the draft counts as the sweep's)."""
    files = model.stage_files(streamed_only=True)
    drop = drop or (lambda: evict(files))
    sweep, read_ahead = model.scheduler.forward_many, model.read_ahead
    hinted = False

    def cold_read_ahead():
        nonlocal hinted
        drop()
        hinted = True
        return read_ahead()

    def cold_sweep(*args, **kwargs):
        nonlocal hinted
        if not hinted:
            drop()
        hinted = False
        return sweep(*args, **kwargs)

    model.scheduler.forward_many, model.read_ahead = cold_sweep, cold_read_ahead
    try:
        yield
    finally:
        del model.scheduler.forward_many, model.read_ahead  # the scheduler's and the model's own methods again


def cold_decode(model, batch: int, steps: int, drop) -> tuple:
    """(median seconds of a cold decode step for `batch` rows, steps run): a short prefill, then one token per
    step, drop() evicting the streamed stage files before each."""
    cache = model.new_cache(batch, [0] * batch)
    prompt = np.arange(1, 4 * batch + 1).reshape(batch, 4) % 1000 + 1
    model.step(prompt, np.ones_like(prompt), cache)
    times = []
    for i in range(steps + 1):
        drop()
        t0 = time.perf_counter()
        model.step(np.full((batch, 1), 5 + i), np.ones((batch, 5 + i), dtype=np.int64), cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), steps + 1


def generation_rate(model, batch: int, steps: int, parts: int, drop=None) -> float:
    """Decode tokens/s of model.generate on `batch` prompts split into `parts` micro-batches: `steps` tokens more
    in one run than in another (the prefill cancels out); drop() evicts before every sweep when given."""
    prompts = (np.arange(1, 4 * batch + 1).reshape(batch, 4) % 1000 + 1).tolist()
    seconds = []
    with cold_sweeps(model, drop) if drop is not None else contextlib.nullcontext():
        for n in (1, steps + 1):
            t0 = time.perf_counter()
            model.generate(prompts, max_new_tokens=n, micro_batches=parts, eos_token_id=[], pad_token_id=0)
            seconds.append(time.perf_counter() - t0)
    return batch * steps / (seconds[1] - seconds[0])


def generation_rates(model, batch: int, steps: int, parts: int, drop) -> dict:
    return {"parts": parts, "warm": generation_rate(model, batch, steps, parts),
            "cold": generation_rate(model, batch, steps, parts, drop)}


def cold_scoring(model, requests: int, length: int, drop) -> float:
    """Seconds to score `requests` random sequences layer-major, cold."""
    rng = np.random.default_rng(0)
    data = [rng.integers(3, 1000, size=length).tolist() for _ in range(requests)]
    drop()
    t0 = time.perf_counter()
    model.score(data, batch_size=8, max_tokens=length * 16, progress=False)
    return time.perf_counter() - t0


def rank_main(spec_path: str) -> int:
    """Run on every rank by the launcher: rank 0 times the pipeline and writes the results; the others follow."""
    from .auto import AutoModel
    spec = json.loads(Path(spec_path).read_text())
    model = AutoModel.from_pretrained(spec["shards"], backend=spec["backend"], memory_budget=spec["budget"],
                                      pipeline_timeout=spec["timeout"])  # the other ranks stay in here, then exit
    with model:
        model.step(np.array([[1]]), np.ones((1, 1), dtype=np.int64), model.new_cache())  # resident stages read once
        before = model.rank_stats()
        step_s, steps = cold_decode(model, spec["batch"], spec["steps"], model.drop_page_cache)
        after = model.rank_stats()
        score_s = cold_scoring(model, spec["score"], 64, model.drop_page_cache) if spec["score"] else None
        hosts = model.link.size
        generation = [generation_rates(model, spec["batch"], spec["steps"], parts, model.drop_page_cache)
                      for parts in (1, hosts)]
        ranks = [{"rank": a["rank"], "stages": a["stages"], "range_bytes": a["range_bytes"], "plan": a["plan"],
                  "streamed_per_step": a["streamed_per_step"],
                  "bytes_per_sweep": (a["bytes_read"] - b["bytes_read"]) / (a["steps"] - b["steps"])}
                 for a, b in zip(after, before)]
        Path(spec["out"]).write_text(json.dumps({"step_s": step_s, "steps": steps, "score_s": score_s,
                                                 "ranks": ranks, "generation": generation}))
    return 0


def predict(costs: dict, compute: dict, part_compute: dict, budget: int, bps: float, hosts: int) -> dict:
    """The pipeline on `hosts` machines with a disk of `bps` each and `budget` each (None: each holds its range
    resident): the balanced split, each rank's plan, the seconds of its sweep; a decode step of the batch (ranks
    in turn), a pipelined pass (the slowest rank), and a decode step of the batch in a micro-batch per host
    (each rank sweeps once per micro-batch, at the pace of the slowest; part_compute: a stage's seconds for
    one micro-batch's rows)."""
    from .pipeline import balanced_split
    names = list(costs)
    everything = 2 * sum(c.loading for c in costs.values())  # a budget that holds any range resident
    counts = [len(names)] if hosts == 1 else balanced_split(names, [costs] * hosts, [budget or everything] * hosts)
    sweeps, part_sweeps, streamed, start = [], [], [], 0
    for n in counts:
        part = {name: costs[name] for name in names[start:start + n]}
        plan = make_plan(part, budget or everything)
        sweeps.append(sweep_seconds(plan, compute, bps))
        part_sweeps.append(sweep_seconds(plan, part_compute, bps))
        streamed.append(plan.streamed_bytes_per_step)
        start += n
    return {"hosts": hosts, "split": counts, "streamed_per_rank": streamed, "sweep_s": sweeps,
            "decode_step_s": sum(sweeps), "pipelined_pass_s": max(sweeps),
            "micro_step_s": sum(part_sweeps) if hosts == 1 else hosts * max(part_sweeps)}


def run_hosts(args, shards) -> dict:
    """python -m airmlx.bench --hosts N on the shard folder `shards` (python -m airmlx.bench's options)."""
    from .auto import AutoModel
    from .cli import bench_budget
    from .manifest import Manifest
    backend = args.backend.split(",")[0]
    batch = (args.batch or [8])[0]
    model_bytes = Manifest.load(shards).total_bytes
    budget = bench_budget(args, model_bytes)
    with AutoModel.from_pretrained(shards, backend=backend, memory_budget=budget) as model:
        files = model.stage_files(streamed_only=True)
        bps = max(model.read_bandwidth(cold=True) for _ in range(2))
        one_step, _ = cold_decode(model, batch, args.steps, lambda: evict(files))
        one_score = cold_scoring(model, args.score, 64, lambda: evict(model.stage_files())) if args.score else None
        one_bytes = model.plan.streamed_bytes_per_step
        one_generation = generation_rates(model, batch, args.steps, 1, lambda: evict(files))
        compute = stage_compute(model, batch)[0]
        predicted_hosts = sorted({1, 2, args.hosts, 4})
        part_compute = {h: compute if h == 1 else stage_compute(model, -(-batch // h))[0] for h in predicted_hosts}
        costs = dict(model.plan.stages)
        largest = max(c.read for c in costs.values())
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"shards": str(shards), "backend": backend, "budget": budget, "batch": batch,
                                    "steps": args.steps, "score": args.score, "timeout": 600,
                                    "out": str(Path(tmp) / "out.json")}))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = launcher(backend, args.hosts) + ["-m", "airmlx.bench_hosts", str(spec)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S)
        out = Path(tmp) / "out.json"
        if done.returncode or not out.is_file():
            raise RuntimeError(f"the {args.hosts}-rank run failed: {(done.stderr or done.stdout)[-2000:]}")
        many = json.loads(out.read_text())
    result = {"backend": backend, "hosts": args.hosts, "batch": batch, "model_bytes": model_bytes, "budget_per_rank": budget,
              "largest_stage": largest, "cold_read_bps": bps, "command": " ".join(command[:-1] + ["SPEC"]),
              "one_rank": {"step_s": one_step, "tokens_per_s": batch / one_step, "bytes_per_sweep": one_bytes,
                           "score_s": one_score, "generation": one_generation},
              "ranks": many["ranks"], "many_step_s": many["step_s"], "many_tokens_per_s": batch / many["step_s"],
              "many_score_s": many["score_s"], "score_requests": args.score, "generation": many["generation"],
              "predicted": [predict(costs, compute, part_compute[h], budget, bps, h) for h in predicted_hosts],
              "predicted_resident": [predict(costs, compute, part_compute[h], None, bps, h) for h in predicted_hosts]}
    print_hosts(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def print_hosts(r):
    n = r["hosts"]
    print(f"\n{r['backend']}: model {format_bytes(r['model_bytes'])}, budget {format_bytes(r['budget_per_rank'])} per "
          f"rank, cold read {format_bytes(r['cold_read_bps'])}/s, batch {r['batch']}")
    print(f"  measured on this machine (one disk, shared cores), cold: 1 rank {r['one_rank']['tokens_per_s']:.2f} "
          f"tokens/s, {n} ranks {r['many_tokens_per_s']:.2f} tokens/s "
          f"({r['many_tokens_per_s'] / r['one_rank']['tokens_per_s']:.2f} x)")
    if r["many_score_s"]:
        print(f"  scoring {r['score_requests']} x 64 tokens cold: 1 rank {r['one_rank']['score_s']:.1f} s, {n} ranks "
              f"{r['many_score_s']:.1f} s ({r['one_rank']['score_s'] / r['many_score_s']:.2f} x)")
    one = r["one_rank"]["generation"]
    print(f"  generate(), {r['batch']} prompts, decode tokens/s (warm / cold): 1 rank {one['warm']:.2f} / "
          f"{one['cold']:.2f}; " + "; ".join(f"{n} ranks, {g['parts']} micro-batch{'es' if g['parts'] > 1 else ''} "
                                            f"{g['warm']:.2f} / {g['cold']:.2f}" for g in r["generation"]))
    goal = r["model_bytes"] / n
    for rank in r["ranks"]:
        print(f"  rank {rank['rank']}: {len(rank['stages'])} stages ({format_bytes(rank['range_bytes'])}), read "
              f"{format_bytes(rank['bytes_per_sweep'])} per sweep (model / {n} = {format_bytes(goal)}, a stage = "
              f"{format_bytes(r['largest_stage'])}); {rank['plan']}")
    print(f"  predicted, each host with its own disk at {format_bytes(r['cold_read_bps'])}/s and "
          f"{format_bytes(r['budget_per_rank'])}:")
    for title, rows in (("under that budget", r["predicted"]), ("every range resident", r["predicted_resident"])):
        print(f"  {title}:\n  {'hosts':>6}{'split':>16}{'decode tok/s':>14}{'micro-batched':>15}{'pipelined tok/s':>17}"
              "  streamed per rank")
        for p in rows:
            print(f"  {p['hosts']:>6}{','.join(map(str, p['split'])):>16}{r['batch'] / p['decode_step_s']:>14.2f}"
                  f"{r['batch'] / p['micro_step_s']:>15.2f}{r['batch'] / p['pipelined_pass_s']:>17.2f}  "
                  f"{', '.join(format_bytes(b) for b in p['streamed_per_rank'])}")


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))
