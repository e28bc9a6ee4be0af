"""`python -m airmlx.bench_server`: concurrent streaming clients against python -m airmlx.server.

It builds (or takes) the bench model of `python -m airmlx.bench`, streams it under a quarter of the model as
budget, serves it on a free 127.0.0.1 port and, for each number of clients, starts that many streaming
completions at once (distinct random prompts, greedy, the same number of new tokens each) with the official
openai client. Cold regime: the streamed stage files are dropped from the page cache before every sweep.
It reports aggregate tokens/s, the median and 95th percentile time to first token, sweeps and bytes read
per sweep (the store's count), and each row's tokens/s against one client's.
"""
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .bench import add_source_options, bench_shards
from .cli import ArgumentParser, add_budget_options, bench_budget, face, parse_bench_args, whole_numbers
from .store import evict
from .units import format_bytes


class ColdReads:
    """The model, with its streamed stage files dropped from the page cache before every sweep."""

    def __init__(self, model):
        self._model, self._files = model, model.stage_files(streamed_only=True)

    def step_many(self, items):
        evict(self._files)
        return self._model.step_many(items)

    def __getattr__(self, name):
        return getattr(self._model, name)


def serve(model, max_batch):
    """(engine, uvicorn server, base url) of a server on a free local port, running in a thread."""
    from .engine import Engine
    from .server import build_app, make_server
    engine = Engine(model, max_batch=max_batch, max_queue=max_batch, kv_allowance=1 << 40, keep_caches=0)
    server = make_server(build_app(engine, ["bench"]), engine, "127.0.0.1", 0, "warning")
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return engine, server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def one_client(client, prompt, max_tokens, start):
    """(seconds to the first token, seconds to the end, tokens) of one streaming completion."""
    start.wait()  # every client sends at the same moment
    t0, first, tokens = time.perf_counter(), None, 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter(), tokens


def run_clients(url, model, clients, prompt_tokens, max_tokens, rng):
    import openai
    vocab = model.config["vocab_size"]
    prompts = [rng.integers(3, vocab, size=prompt_tokens).tolist() for _ in range(clients)]
    made = [openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600) for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    before = model.memory_stats()
    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(one_client, c, p, max_tokens, start) for c, p in zip(made, prompts)]
        start.wait()
        t0 = time.perf_counter()
        results = [r.result() for r in running]
    after = model.memory_stats()
    seconds = max(end for _, end, _ in results) - t0
    firsts = sorted(first for first, _, _ in results)
    sweeps = after["steps"] - before["steps"]
    tokens = sum(t for _, _, t in results)
    return dict(clients=clients, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                sweep_s=seconds / max(sweeps, 1), load_average=round(os.getloadavg()[0], 2),
                ttft_p50_s=statistics.median(firsts),
                ttft_p95_s=firsts[min(len(firsts) - 1, int(np.ceil(0.95 * len(firsts))) - 1)], sweeps=sweeps,
                bytes_per_sweep=(after["bytes_read"] - before["bytes_read"]) / max(sweeps, 1))


def run(args):
    from .auto import AutoModel
    from .manifest import Manifest
    _, shards = bench_shards(args)
    model_bytes = Manifest.load(shards).total_bytes
    budget = bench_budget(args, model_bytes)
    model = AutoModel.from_pretrained(shards, backend=args.backend, memory_budget=budget)
    served = model if args.warm else ColdReads(model)
    engine, server, url = serve(served, max(args.clients))
    rng = np.random.default_rng(0)
    try:
        run_clients(url, model, 1, 3, 2, rng)  # resident stages load on the first sweep
        rows = []
        for n in args.clients:
            row = run_clients(url, model, n, args.prompt_tokens, args.max_tokens, rng)
            row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
            rows.append(row)
            print_row(row)
    finally:
        server.should_exit = True
        engine.stop()
        engine.join(60)
        model.close()
    report = dict(backend=args.backend, model_bytes=model_bytes, budget_bytes=budget,
                  streamed_bytes_per_step=model.plan.streamed_bytes_per_step, plan=str(model.plan),
                  regime="warm" if args.warm else "cold", prompt_tokens=args.prompt_tokens,
                  max_tokens=args.max_tokens, rows=rows)
    print(f"model {format_bytes(model_bytes)}, budget {format_bytes(budget)}, streamed "
          f"{format_bytes(model.plan.streamed_bytes_per_step)} per sweep, {report['regime']} regime")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def print_row(r):
    print(f"{r['clients']:>3} clients: {r['tokens_per_s']:8.2f} tokens/s ({r['speedup']:5.1f} x one client) | "
          f"first token p50 {r['ttft_p50_s']:6.2f} s, p95 {r['ttft_p95_s']:6.2f} s | {r['sweeps']} sweeps of "
          f"{r['sweep_s']:.2f} s, {format_bytes(r['bytes_per_sweep'])} read per sweep | load {r['load_average']}",
          flush=True)


def build_parser():
    parser = ArgumentParser(prog="python -m airmlx.bench_server", description=__doc__.split("\n")[0])
    add_source_options(parser, "the generated random Llama", layers=16)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the generated model")
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    add_budget_options(parser, fraction=0.25)
    parser.add_argument("--clients", type=whole_numbers(1), default=[1, 4, 16, 32],
                        help="numbers of concurrent streaming clients, e.g. 1,4,16,32 (the first is the baseline)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per client")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="prompt tokens per client")
    parser.add_argument("--warm", action="store_true", help="leave the shard files in the page cache")
    return parser


@face
def main(argv=None):
    parser = build_parser()
    args = parse_bench_args(parser, argv)
    if min(args.clients) < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        parser.error("--clients, --max-tokens and --prompt-tokens take whole numbers >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
