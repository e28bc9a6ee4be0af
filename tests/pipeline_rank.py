"""One rank of a pipeline test (tests/test_pipeline_ranks.py), run under mlx.launch, torchrun or a plain process
with the launcher's environment. argv[1]: a JSON file with
  models: [{"name", "folder" (may hold {rank}), "budget", "split" (optional)}], "timeout", "out" (rank 0's
  results), "prompt", "batch", "micro_batch" (a batch for micro-batches, one per row; a model's "micro_eos": an
  EOS token that ends some of its rows early), "new_tokens", "requests", and optionally "stop": {"rank", "step", "signal"}
  (that rank sends itself the signal at its nth step: a rank that dies or hangs).
Rank 0 writes, per model: greedy tokens for the prompt and the batch (from generate, and as requests to the
server's engine), for the micro-batched batch with what its sweeps overlapped and read, scores, and every rank's
statistics. A model with "resident": true (budgets that hold every range) only generates the micro-batch batch
with the default micro-batches."""
import json
import os
import signal
import sys
import time

import numpy as np

import airmlx
import airmlx.pipeline_model
from airmlx.cli import face
from airmlx.engine import Delta, Engine, Failed, Finished, Request, Sampling


def serve(model, prompts, new_tokens, micro_batches=None):
    """The server's engine on rank 0 (requests merged into one batch, parted again as they finish): each request
    is sent once the one before has its first token, so it joins a batch already decoding. Their tokens, whether
    caches merged, and how many sweeps started while another was out."""
    events = [[] for _ in prompts]
    before = model.sweeps_overlapped
    engine = Engine(model, kv_allowance=10**8, micro_batches=micro_batches)
    try:
        for p, got in zip(prompts, events):
            engine.submit(Request(p, new_tokens, Sampling(), got.append))
            while not got:
                time.sleep(0.001)
        deadline = time.monotonic() + 60
        while not all(got and isinstance(got[-1], (Finished, Failed)) for got in events):
            assert time.monotonic() < deadline, "a request never finished"
            time.sleep(0.01)
        assert all(isinstance(got[-1], Finished) for got in events), [got[-1] for got in events]
        merged = engine.merging
    finally:
        engine.stop()
        engine.join(30)
    return [[t for e in got if isinstance(e, Delta) for t in e.tokens] for got in events], merged, \
        model.sweeps_overlapped - before


def stop_at(step, signum):
    """This rank sends itself `signum` when it starts its nth step."""
    real, calls = airmlx.pipeline_model.run_step, []

    def run_step(*args):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*args)

    airmlx.pipeline_model.run_step = run_step


@face
def main(argv):
    spec = json.loads(open(argv[0]).read())
    rank = int(os.environ.get("MLX_RANK", os.environ.get("RANK", 0)))
    stop = spec.get("stop")
    if stop and stop["rank"] == rank:
        stop_at(stop["step"], getattr(signal, f"SIG{stop['signal']}"))
    results = {}
    for m in spec["models"]:
        try:
            model = airmlx.AutoModel.from_pretrained(m["folder"].format(rank=rank), memory_budget=m["budget"],
                                                     pipeline_split=m.get("split"),
                                                     pipeline_timeout=spec["timeout"])
        except SystemExit:  # the other ranks follow rank 0 in there, then would exit: on to the next model
            continue
        with model:
            if m.get("resident"):
                before = model.sweeps_overlapped
                micro = model.generate(spec["micro_batch"], max_new_tokens=spec["new_tokens"])
                results[m["name"]] = {"micro": micro, "micro_overlapped": model.sweeps_overlapped - before,
                                      "served_lanes": serve(model, [spec["prompt"], *spec["batch"]],
                                                            spec["new_tokens"]),
                                      "ranks": model.rank_stats()}
                continue
            single = model.generate(spec["prompt"], max_new_tokens=spec["new_tokens"])
            batch = model.generate(spec["batch"], max_new_tokens=spec["new_tokens"])
            before, read = model.sweeps_overlapped, [r["bytes_read"] for r in model.rank_stats()]
            micro = model.generate(spec["micro_batch"], max_new_tokens=spec["new_tokens"],
                                   micro_batches=len(spec["micro_batch"]), eos_token_id=m["micro_eos"])
            micro_overlapped = model.sweeps_overlapped - before
            micro_read = [r["bytes_read"] - b for r, b in zip(model.rank_stats(), read)]
            before = model.sweeps_overlapped
            scores = model.score([tuple(r) for r in spec["requests"]], batch_size=1, max_tokens=6, progress=False)
            overlapped = model.sweeps_overlapped - before
            logits = model.logits(np.array([spec["prompt"]]))
            served, merged, _ = serve(model, [spec["prompt"], *spec["batch"]], spec["new_tokens"])
            lanes = serve(model, [spec["prompt"], *spec["batch"]], spec["new_tokens"], micro_batches=2)
            results[m["name"]] = {"single": single, "batch": batch, "scores": [list(s) for s in scores],
                                  "passes": scores.passes, "overlapped": overlapped, "logits_argmax": logits.argmax(-1).tolist(),
                                  "served": served, "merged": merged, "ranks": model.rank_stats(),
                                  "micro": micro, "micro_overlapped": micro_overlapped, "micro_read": micro_read,
                                  "served_lanes": lanes}
    if rank:
        return
    with open(spec["out"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
