"""A pipeline over several processes on this machine (loopback only): 2 and 3 ranks over mx.distributed (ring,
started by mlx.launch) and torch.distributed (gloo, started by torchrun), a dense and a MoE model streamed under
per-rank budgets, against the single-process model; and ranks that die or hang end the others with an error
naming them, within the timeout. Each launch runs tests/pipeline_rank.py on every rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import airmlx
import airmlx.manifest
from airmlx.bench_hosts import free_port, launcher

from tiny import BATCH, PROMPT, make_checkpoint

HERE = Path(__file__).parent
NEW_TOKENS = 8
REQUESTS = [[[5, 17, 33], [2, 9]], [[8, 90], [10, 4, 11]], [[3, 4, 5, 6], [7]]]
MICRO_BATCH = BATCH + [[3, 4, 5, 6, 7]]  # split into one micro-batch per row
MICRO_WIDTH = max(map(len, MICRO_BATCH))  # the left-padded prompts' width
LINK_TIMEOUT = 8  # seconds a rank waits for a sign of life from the rank before it
LAUNCH_LIMIT = 150  # seconds a whole launch may take before the test fails (nothing may hang)
EXIT_SLACK = 15  # seconds for a process to print its error and exit once it knows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (full shard folder, {ranks: per-rank folder pattern from --hosts/--rank}, the model's minimum
    budget)."""
    root = tmp_path_factory.mktemp("pipeline")
    made = {}
    for name, arch in (("dense", "llama"), ("moe", "mixtral")):
        make_checkpoint(root / arch, arch)
        full = airmlx.shard_checkpoint(root / arch, root / f"{arch}-shards", progress=False)
        hosts = {}
        for n in (2, 3):
            for r in range(n):
                airmlx.shard_checkpoint(root / arch, root / f"{arch}-h{n}-{r}", progress=False, hosts=n, rank=r)
            hosts[n] = str(root / f"{arch}-h{n}-{{rank}}")
        least = 0  # the smallest budget the whole model runs under, on either backend
        for backend in ("torch", "mlx"):
            with airmlx.AutoModel.from_pretrained(full, backend=backend, memory_budget="1GB") as probe:
                least = max(least, probe.minimum_budget)
        made[name] = (full, hosts, least)
    return made


def spec_file(tmp_path, models_spec, **extra):
    spec = {"models": models_spec, "timeout": LINK_TIMEOUT, "out": str(tmp_path / "out.json"), "prompt": PROMPT[0],
            "batch": BATCH, "micro_batch": MICRO_BATCH, "new_tokens": NEW_TOKENS, "requests": REQUESTS, **extra}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def launcher_command(framework, ranks, spec):
    return launcher(framework, ranks) + [str(HERE / "pipeline_rank.py"), str(spec)]


def rank_env():
    """The ranks' environment: one thread each, tests/ importable, the caller's PYTHONPATH kept."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_launcher(framework, ranks, spec):
    done = subprocess.run(launcher_command(framework, ranks, spec), env=rank_env(), capture_output=True, text=True,
                          timeout=LAUNCH_LIMIT)
    out = Path(json.loads(Path(spec).read_text())["out"])
    assert done.returncode == 0 and out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def reference(folder, backend):
    """The single-process run the pipeline must equal. Its micro_eos (the third new token of the micro-batch
    batch's second row, given as EOS) ends that row early, so the micro-batches stop at different steps."""
    with airmlx.AutoModel.from_pretrained(folder, backend=backend) as model:
        scores = model.score([tuple(r) for r in REQUESTS], batch_size=1, max_tokens=6, progress=False)
        free = model.generate(MICRO_BATCH, max_new_tokens=NEW_TOKENS)
        eos = free[1][MICRO_WIDTH + 2]
        return {"single": model.generate(PROMPT[0], max_new_tokens=NEW_TOKENS),
                "batch": model.generate(BATCH, max_new_tokens=NEW_TOKENS),
                "micro_free": free, "micro_eos": eos,
                "micro": model.generate(MICRO_BATCH, max_new_tokens=NEW_TOKENS, eos_token_id=eos),
                "scores": [list(s) for s in scores],
                "logits_argmax": model.logits(np.array(PROMPT)).argmax(-1).tolist(),
                "served": [model.generate(p, max_new_tokens=NEW_TOKENS)[len(p):] for p in PROMPT + BATCH]}


def micro_sweeps(seqs, eos):
    """(every micro-batch's steps, the steps that start while another micro-batch's sweep is out) for a
    micro-batch per row: a row steps until it yields EOS or NEW_TOKENS; once one row is left, it steps alone."""
    steps = []
    for row in seqs:
        new = row[MICRO_WIDTH:]
        ends = [k + 1 for k, t in enumerate(new) if t in np.atleast_1d(eos)]
        steps.append(ends[0] if ends else NEW_TOKENS)
    longest, second = sorted(steps)[-1], sorted(steps)[-2]
    return sum(steps), sum(steps) - 1 - (longest - second)


def check_against_reference(got, want, ranks, budgets, range_folders):
    assert got["single"] == want["single"] and len(got["single"]) == len(PROMPT[0]) + NEW_TOKENS
    assert got["batch"] == want["batch"]
    assert got["logits_argmax"] == want["logits_argmax"]
    # micro-batches: the same tokens; every step of one started while another's was on the other ranks (until
    # one was left), and each rank read its range once per micro-batch step
    assert got["micro"] == want["micro"]
    sweeps, overlapped = micro_sweeps(want["micro"], want["micro_eos"])
    assert got["micro_overlapped"] == overlapped
    for read, r in zip(got["micro_read"], got["ranks"]):
        assert sweeps * r["streamed_per_step"] <= read <= sweeps * (r["streamed_per_step"] + r["expert_bytes"])
    assert got["served"] == want["served"] and got["merged"]  # the server's engine: one batch over the ranks
    served, merged, overlapped = got["served_lanes"]  # ... and in two lanes, one's sweep out while the other's runs
    assert served == want["served"] and merged and overlapped > 0
    assert got["passes"] == len(REQUESTS)  # one pass per request ...
    assert got["overlapped"] == len(REQUESTS) - 1  # ... each after the first started while the one before was out
    for (ll, greedy), (ll_want, greedy_want) in zip(got["scores"], want["scores"]):
        assert abs(ll - ll_want) < 1e-4 * max(1.0, abs(ll_want)) and greedy == greedy_want
    stats = got["ranks"]
    assert [r["rank"] for r in stats] == list(range(ranks))
    names = [n for r in stats for n in r["stages"]]
    assert len(names) == len(set(names)) and stats[0]["stages"][0] == "embed" and stats[-1]["stages"][-1] == "head"
    assert [r["budget"] for r in stats] == budgets
    assert any(r["streamed_per_step"] for r in stats), "no rank streams: the budgets are too loose to test"
    for r in stats:
        # each rank read its own range only: what its plan streams per sweep, its resident stages once (and, for
        # MoE, at most its layers' experts per sweep)
        assert r["bytes_read"] <= r["range_bytes"] + r["steps"] * (r["streamed_per_step"] + r["expert_bytes"])
        assert r["bytes_read"] >= r["steps"] * r["streamed_per_step"]
        if range_folders:  # a folder from --hosts/--rank holds its range's files and no others
            files = {p.name for p in Path(range_folders.format(rank=r["rank"])).glob("*.safetensors")}
            assert files == {f"{n}.safetensors" for n in r["stages"]}


# Every launch starts 2 or 3 interpreters that each import torch and transformers or mlx-lm (about 10 s apiece
# on a loaded 2-core machine), so one costs 20-35 s. The default run keeps one launch per framework (2 and 3
# ranks, from --hosts/--rank folders) and one per way to fail (a killed rank, a hung one); the variants (the
# full folder, an explicit split, the other framework for each failure) are marked slow: python -m pytest -m slow.
SLOW = pytest.mark.slow

LAUNCHES = [  # framework, ranks, folders (per-rank from --hosts/--rank, or the full one), explicit split
    ("mlx", 2, "hosts", None),
    pytest.param("mlx", 3, "full", None, marks=SLOW),
    pytest.param("torch", 2, "full", "explicit", marks=SLOW),  # the split only fits two ranks
    ("torch", 3, "hosts", None),
]


@pytest.mark.parametrize("framework,ranks,folders,split", LAUNCHES)
def test_pipeline_matches_one_process(models, tmp_path, framework, ranks, folders, split):
    spec_models, budgets = [], {}
    for name, (full, hosts, least) in models.items():
        per_rank = [int((1.05 + 0.1 * r) * least) for r in range(ranks)]  # tight: every rank streams
        budgets[name] = per_rank
        spec_models.append({"name": name, "folder": hosts[ranks] if folders == "hosts" else str(full),
                            "budget": ",".join(str(b) for b in per_rank),
                            # rank 0: embed and a layer; the last rank all the rest
                            "split": f"2,{len(stage_names(full)) - 2}" if split else None})
    want = {name: reference(full, framework) for name, (full, _, _) in models.items()}
    for spec in spec_models:
        spec["micro_eos"] = want[spec["name"]]["micro_eos"]
    # every range resident: a batch splits into a micro-batch per rank by itself
    full, hosts, _ = models["dense"]
    spec_models.append({"name": "resident", "folder": hosts[ranks] if folders == "hosts" else str(full),
                        "budget": "1GB", "resident": True, "split": spec_models[0]["split"]})
    got = run_launcher(framework, ranks, spec_file(tmp_path, spec_models))
    for (name, (full, hosts, _)), spec in zip(models.items(), spec_models):
        check_against_reference(got[name], want[name], ranks, budgets[name],
                                hosts[ranks] if folders == "hosts" else None)
        if split:
            assert [len([s for s in r["stages"] if not s.endswith("experts")]) for r in got[name]["ranks"]] == \
                [int(n) for n in spec["split"].split(",")]
    resident = got["resident"]
    assert not any(r["streamed_per_step"] for r in resident["ranks"])
    assert not any(r["swept_bytes_read"] for r in resident["ranks"])  # the stats line's per rank: was first loads / steps
    assert resident["micro"] == want["dense"]["micro_free"]
    assert resident["micro_overlapped"] > 0  # split into a part per rank (3 rows: 2 + 1, or 1 each)
    served, merged, overlapped = resident["served_lanes"]  # the server's engine splits its requests alike
    assert served == want["dense"]["served"] and overlapped > 0


def stage_names(folder):
    return [s.name for s in airmlx.manifest.Manifest.load(folder).stages if s.kind != "experts"]


def start_ranks(framework, ranks, spec, tmp_path):
    """The ranks as plain processes with the environment the launcher would give them (the launchers end every
    rank as soon as one exits, which would hide what airmlx does)."""
    port = free_port(ranks)
    env = rank_env()
    if framework == "mlx":
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(ranks)]))
        envs = [{**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(ranks)]
    else:
        envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)} for r in range(ranks)]
    return [subprocess.Popen([sys.executable, str(HERE / "pipeline_rank.py"), str(spec)], env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]


@pytest.mark.parametrize("framework,ranks,how", [("mlx", 3, "KILL"), pytest.param("torch", 3, "KILL", marks=SLOW),
                                                 pytest.param("mlx", 2, "STOP", marks=SLOW), ("torch", 2, "STOP")])
def test_a_rank_that_dies_or_hangs_ends_the_others(models, tmp_path, framework, ranks, how):
    """Rank 1 is killed (its sockets close) or stopped (it hangs: silence until the timeout) at its third step."""
    full, _, least = models["dense"]
    spec = spec_file(tmp_path, [{"name": "dense", "folder": str(full), "budget": str(int(1.5 * least))}],
                     stop={"rank": 1, "step": 3, "signal": how})
    procs = start_ranks(framework, ranks, spec, tmp_path)
    try:
        victim = procs[1]
        others = [p for i, p in enumerate(procs) if i != 1]
        deadline = time.monotonic() + LAUNCH_LIMIT
        while victim.poll() is None and how == "KILL" and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped_at = time.monotonic()
        if how == "STOP":  # the victim stops itself: wait until it has
            while (time.monotonic() < deadline and victim.poll() is None
                   and open(f"/proc/{victim.pid}/stat").read().split()[2] != "T"):
                time.sleep(0.1)
            stopped_at = time.monotonic()
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in others]
        took = time.monotonic() - stopped_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    for p, (out, err) in zip(others, outputs):
        assert p.returncode == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("airmlx: ")]
        assert lines and "rank 1" in lines[-1], err[-2000:]
    # a closed socket is seen at once, silence after the timeout; then the interpreter's teardown (torch's takes
    # seconds on a busy machine)
    limit = LINK_TIMEOUT + EXIT_SLACK if how == "STOP" else EXIT_SLACK
    assert took < limit, f"the other ranks took {took:.1f} s to end"


@pytest.mark.parametrize("framework", ["mlx", pytest.param("torch", marks=SLOW)])
def test_a_rank_that_cannot_open_its_model_ends_every_rank_naming_it(models, tmp_path, framework):
    """The ranks wait for each other to open their models under the startup deadline (torch on a CPU may write
    its int4 layout copy first); rank 1's budget is below what its range of the split needs, so it fails to open
    its model, says why, and rank 0 ends naming it, within a launch."""
    full, _, least = models["dense"]
    stages = len(stage_names(full))
    spec = spec_file(tmp_path, [{"name": "dense", "folder": str(full), "budget": f"{10 * least},{least // 4}",
                                 "split": f"2,{stages - 2}"}])
    procs = start_ranks(framework, 2, spec, tmp_path)
    try:
        outputs = [p.communicate(timeout=LAUNCH_LIMIT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [[line for line in err.splitlines() if line.startswith("airmlx: ")] for _, err in outputs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outputs]
    assert "raise --memory-budget to at least" in lines[1][-1], lines[1]  # a face spells it as its option
    assert "rank 1 could not open its model" in lines[0][-1], lines[0]
