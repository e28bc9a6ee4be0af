"""`python -m airmlx.bench`: decode-step time streamed cold, streamed warm and resident, against the I/O floor.

It builds (or takes) a model several times larger than the budget, shards it, measures the cold sequential
read bandwidth of the shard files, then times decode steps per backend:
  cold      every shard file evicted from the page cache (posix_fadvise DONTNEED) before each step
  warm      shard files in the page cache, each step taking turns with a resident one (the ratio: of each pair)
  read-warm (--warm-after-read) warm, in a model opened after the files came into the page cache by read()
  resident  the reference framework (transformers / mlx-lm) with the whole model in memory
"""
import inspect
import itertools
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .cli import ArgumentParser, add_budget_options, bench_budget, face, parse_bench_args, whole_number, whole_numbers
from .preflight import predict
from .quant import COMPRESSIONS
from .store import evict
from .units import format_bytes

REFERENCES = {"torch": "transformers", "mlx": "mlx-lm"}  # the resident reference's framework
UNBOUNDED = 1 << 50  # a memory budget no model is below: every stage resident
BENCH_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


def word_tokenizer(vocab_size, renamed: "dict | None" = None):
    """A word-level tokenizer over tokens "w0".."w{n-1}" (w0 = pad, w1 = bos), for tools that insist on one;
    renamed: {id: another word for it}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {**{f"w{i}": i for i in range(vocab_size) if i not in (renamed or {})},
             **{word: i for i, word in (renamed or {}).items()}}
    tok = Tokenizer(models.WordLevel(words, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", unk_token="w2")


def save_tokenizer(folder, vocab_size):
    word_tokenizer(vocab_size).save_pretrained(folder)


def build_model(folder, layers, hidden):
    """A random bf16 Llama (about 470 MB at the defaults), saved once and reused."""
    cfg = {**BENCH_CONFIG, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden}
    return save_random_model(folder, "Llama", cfg)


def save_random_model(folder, family, cfg, adjust=None):
    """transformers' <family>ForCausalLM with random weights (then `adjust(model)`), saved in bf16 with a
    tokenizer, unless it is there."""
    import torch
    import transformers
    if (folder / "tokenizer.json").is_file():
        return folder
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**cfg)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    if adjust is not None:
        adjust(model)
    model.to(torch.bfloat16).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_theta"] = cfg["rope_theta"]  # mlx-lm reads only the top-level key
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    save_tokenizer(folder, cfg["vocab_size"])
    return folder


def time_streamed(model, steps, cold):
    """Median decode-step time: prefill a short prompt, then one token per step."""
    files = model.stage_files(streamed_only=True)
    cache = model.new_cache()
    model.step(np.array([[1, 2, 3, 4]]), np.ones((1, 4), dtype=np.int64), cache)
    model.reset_peak()
    times, past = [], 4
    for i in range(steps + 1):
        if cold:
            evict(files)
        t0 = time.perf_counter()
        model.step(np.array([[5 + i]]), np.ones((1, past + 1), dtype=np.int64), cache)
        times.append(time.perf_counter() - t0)
        past += 1
    stats = model.memory_stats()
    bound = stats["budget"] + stats["kv_cache_peak"] + stats["activation_bound"]
    return statistics.median(times[1:]), stats["peak"], stats["peak"] / bound


def read_into_page_cache(files, chunk: int = 1 << 20) -> None:
    """Evict files, then bring them back into the page cache as another reader would (read(), 1 MB at a time):
    in small folios, which a mapping cannot map as huge pages until the store reads them again."""
    evict(files)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(chunk):
                pass


def time_batches(model, batch_sizes, steps):
    """Cold-regime aggregate decode tokens/s per batch size: each step serves every row with one read."""
    from .bench_hosts import cold_decode
    files = model.stage_files(streamed_only=True)
    return {batch: batch / cold_decode(model, batch, steps, lambda: evict(files))[0] for batch in batch_sizes}


def time_scoring(model, requests, length):
    """Layer-major scoring of `requests` random sequences, cold: bytes read against model bytes x passes."""
    files = model.stage_files()
    rng = np.random.default_rng(0)
    data = [rng.integers(3, 1000, size=length).tolist() for _ in range(requests)]
    evict(files)
    t0 = time.perf_counter()
    scores = model.score(data, batch_size=8, max_tokens=length * 64)
    seconds = time.perf_counter() - t0
    model_bytes = model.shard_bytes
    return dict(requests=requests, tokens_per_request=length, passes=scores.passes, bytes_read=scores.bytes_read,
                bytes_over_model_x_passes=scores.bytes_read / (model_bytes * scores.passes),
                score_s=seconds, tokens_per_s=requests * length / seconds)


def reference_loads(backend: str, src: Path) -> bool:
    """Whether the reference framework's own loader takes the checkpoint: neither takes a GGUF file, and
    transformers no mlx-lm quantised folder (its quantization config names no quant_method)."""
    config = Path(src) / "config.json"
    if not config.is_file():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return backend != "torch" or not quantization or "quant_method" in quantization


@contextmanager
def resident_stepper(backend, src, shards):
    """The reference framework's own model of the whole checkpoint, in memory and prefilled: a function that
    runs its next decode step and returns the seconds it took. Where the framework cannot load the checkpoint
    (mlx-community's quantisation on torch, a GGUF file), airmlx's own model of its shards with every stage
    resident stands in (the row's resident_reference says which)."""
    tokens = itertools.count(5)
    if not reference_loads(backend, src):
        from .auto import AutoModel
        with AutoModel.from_pretrained(shards, backend=backend, memory_budget=UNBOUNDED) as model:
            yield streamed_stepper(model)
        return
    if backend == "torch":
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        cache = DynamicCache(config=ref.config)
        # transformers >= 5.2x takes the cache as `cache=` (past_key_values= is deprecated there)
        kw = {"cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values": cache}
        with torch.inference_mode():
            ref(torch.tensor([[1, 2, 3, 4]]), use_cache=True, **kw)

        def step():
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref(torch.tensor([[next(tokens)]]), use_cache=True, **kw)
            return time.perf_counter() - t0
        yield step
        return
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    ref, _ = load(str(src))
    cache = make_prompt_cache(ref)
    mx.eval(ref(mx.array([[1, 2, 3, 4]]), cache=cache))

    def step():
        t0 = time.perf_counter()
        mx.eval(ref(mx.array([[next(tokens)]]), cache=cache))
        return time.perf_counter() - t0
    yield step


def streamed_stepper(model):
    """The same for a streamed model (its files left where they are: warm once read)."""
    cache, past = model.new_cache(), itertools.count(5)
    model.step(np.array([[1, 2, 3, 4]]), np.ones((1, 4), dtype=np.int64), cache)

    def step():
        n = next(past)
        t0 = time.perf_counter()
        model.step(np.array([[n]]), np.ones((1, n), dtype=np.int64), cache)
        return time.perf_counter() - t0
    return step


def time_warm_and_resident(model, backend, src, steps):
    """(median warm streamed step, median resident step, median of their ratios), the two taking turns step by
    step, so that a machine busier at one moment slows both alike (run one after the other, they were often
    measured minutes apart on a shared machine, and the ratio moved with its load)."""
    with resident_stepper(backend, src, model.shard_dir) as resident:
        streamed = streamed_stepper(model)
        pairs = [(streamed(), resident()) for _ in range(steps + 1)][1:]
    return (statistics.median(s for s, _ in pairs), statistics.median(r for _, r in pairs),
            statistics.median(s / r for s, r in pairs))


def time_airllm(src, steps):
    """AirLLM's decode step on the same model, when it is installed (it is not a dependency, and it takes no
    memory budget: it streams every layer). Per step = (generate 1 + steps tokens - generate 1) / steps."""
    try:
        from airllm import AutoModel as AirLLMAutoModel
    except ImportError:
        return None
    import torch
    model = AirLLMAutoModel.from_pretrained(str(src), device="cpu", dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 2, 3, 4]])
    elapsed = []
    for n in (1, 1 + steps):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True)
        elapsed.append(time.perf_counter() - t0)
    return (elapsed[1] - elapsed[0]) / steps


def bench_shards(args, compression: "str | None" = None, generated: "tuple | None" = None) -> tuple:
    """(checkpoint, shard folder): --model, or a generated model made once under --work-dir, by default the
    dense Llama of --layers and --hidden; generated: (folder name, build(folder) -> checkpoint) instead."""
    from .sharder import shard_checkpoint
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "airmlx-bench")
    name, build = generated or (f"llama-{args.layers}x{args.hidden}",
                                lambda folder: build_model(folder, args.layers, args.hidden))
    src = Path(args.model) if args.model else build(work / name)
    suffix = f"-{compression}" if compression else ""
    return src, shard_checkpoint(src, work / f"{src.name}-shards{suffix}", compression=compression, progress=True)


def run(args):
    from .auto import AutoModel
    from .manifest import Manifest
    src, shards = bench_shards(args, args.compression)
    model_bytes = Manifest.load(shards).total_bytes
    budget = bench_budget(args, model_bytes)
    rows = []
    for backend in args.backend.split(","):
        # opened only for its minimum budget (nothing loads before a step): a model held wider than its files
        # (3-bit weights dequantised on torch) is below model_bytes
        with AutoModel.from_pretrained(shards, backend=backend, memory_budget=UNBOUNDED) as probe:
            minimum = probe.minimum_budget
        if budget < minimum:  # e.g. a quarter of a 4-bit model: less than its largest stage takes loaded
            print(f"{backend}: the budget is raised to this model's minimum, {format_bytes(minimum)}", file=sys.stderr)
        model = AutoModel.from_pretrained(shards, backend=backend, memory_budget=max(budget, minimum))
        plan = model.plan
        # best of two: a busy disk only lowers it; everything resident: the disk is reported anyway
        gbps = max(model.read_bandwidth(cold=True) for _ in range(2)) / 1e9
        floor = plan.streamed_bytes_per_step / (gbps * 1e9)
        predicted = predict(model, gbps * 1e9, model.read_bandwidth(cold=False))  # what python -m airmlx.doctor says
        cold, cold_peak, cold_ratio = time_streamed(model, args.steps, cold=True)
        _, warm_peak, warm_ratio = time_streamed(model, args.steps, cold=False)
        read_warm = None
        if args.warm_after_read:
            read_into_page_cache(model.stage_files(streamed_only=True))
            with AutoModel.from_pretrained(shards, backend=backend, memory_budget=max(budget, minimum)) as fresh:
                read_warm = time_streamed(fresh, args.steps, cold=False)[0]
        batches = time_batches(model, args.batch, max(2, args.steps // 2)) if args.batch else {}
        scoring = time_scoring(model, args.score, 64) if args.score else None
        # the warm run above gave the peak; the warm step is measured again taking turns with the reference
        warm, resident, warm_over_resident = time_warm_and_resident(model, backend, src, args.steps)
        model.close()
        # the resident reference is the framework's own load of the checkpoint: unquantised
        row = dict(backend=backend, compression=args.compression, resident_is_unquantised=bool(args.compression),
                   resident_reference=REFERENCES[backend] if reference_loads(backend, src) else "airmlx",
                   model_bytes=model_bytes, budget_bytes=plan.budget,
                   streamed_bytes_per_step=plan.streamed_bytes_per_step, cold_read_gbps=round(gbps, 3),
                   io_floor_s=floor, cold_step_s=cold, warm_step_s=warm, resident_step_s=resident,
                   cold_over_floor=cold / floor if floor else None, warm_over_resident=warm_over_resident,
                   peak_memory_bytes=max(cold_peak, warm_peak), plan=str(plan), steps=args.steps,
                   peak_over_bound=max(cold_ratio, warm_ratio), predicted_cold_s=predicted.cold_s_per_token,
                   predicted_warm_s=predicted.warm_s_per_token,
                   cold_over_predicted=cold / predicted.cold_s_per_token)
        if read_warm is not None:
            row["warm_after_read_step_s"] = read_warm
        if batches:
            row["cold_batch_tokens_per_s"] = batches
            row["batch_speedup"] = {b: batches[b] / batches[min(batches)] for b in batches}
        if scoring:
            row["scoring"] = scoring
        if args.compare == "airllm":
            airllm = time_airllm(src, max(2, args.steps // 2))
            row["airllm_step_s"] = airllm
            row["speedup_vs_airllm"] = airllm / warm if airllm else None
        rows.append(row)
        print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def print_row(r):
    print(f"\n{r['backend']}: model {format_bytes(r['model_bytes'])}, budget {format_bytes(r['budget_bytes'])}, "
          f"streamed {format_bytes(r['streamed_bytes_per_step'])}/step, cold read {r['cold_read_gbps']:.2f} GB/s")
    print(f"  {'regime':<10}{'step s':>10}{'ratio':>24}")
    print(f"  {'io floor':<10}{r['io_floor_s']:>10.3f}")
    print(f"  {'cold':<10}{r['cold_step_s']:>10.3f}" + (f"{r['cold_over_floor']:>14.2f} x floor" if r['cold_over_floor'] else ""))
    print(f"  {'warm':<10}{r['warm_step_s']:>10.3f}{r['warm_over_resident']:>14.2f} x resident")
    if r.get("warm_after_read_step_s"):
        print(f"  {'read-warm':<10}{r['warm_after_read_step_s']:>10.3f}"
              f"{r['warm_after_read_step_s'] / r['resident_step_s']:>14.2f} x resident (files cached by read())")
    print(f"  {'predicted':<10}{r['predicted_cold_s']:>10.3f}{r['cold_over_predicted']:>14.2f} x (cold / doctor's "
          f"prediction; warm predicted {r['predicted_warm_s']:.3f})")
    print(f"  {'resident':<10}{r['resident_step_s']:>10.3f}" + ("" if r["resident_reference"] != "airmlx" else
          f"{'':>14}  (airmlx, every stage resident: {REFERENCES[r['backend']]} cannot load this checkpoint)"))
    if r.get("airllm_step_s"):
        print(f"  {'airllm':<10}{r['airllm_step_s']:>10.3f}{r['speedup_vs_airllm']:>14.1f} x slower than warm")
    print(f"  peak memory {format_bytes(r['peak_memory_bytes'])} = {r['peak_over_bound']:.2f} x (budget + KV cache + "
          f"activation bound); {r['plan']}")
    for b, rate in r.get("cold_batch_tokens_per_s", {}).items():
        print(f"  cold batch {b:>3}: {rate:8.2f} tokens/s ({r['batch_speedup'][b]:.1f} x batch {min(r['batch_speedup'])})")
    if r.get("scoring"):
        s = r["scoring"]
        print(f"  scoring {s['requests']} x {s['tokens_per_request']} tokens: {s['passes']} passes, read "
              f"{format_bytes(s['bytes_read'])} = {s['bytes_over_model_x_passes']:.3f} x model x passes, "
              f"{s['tokens_per_s']:.0f} tokens/s")


def add_source_options(parser, generated, layers):
    """The model options every bench over the generated model shares (bench_shards reads them)."""
    parser.add_argument("--model", help=f"HF model folder (or mlx-community folder, or GGUF file) to use instead of "
                                        f"{generated}")
    parser.add_argument("--layers", type=int, default=layers, help="decoder layers of the generated model")
    parser.add_argument("--work-dir", help="where the generated model and shards live (default: $TMPDIR/airmlx-bench)")
    parser.add_argument("--json", help="write the results here")


def add_common_options(parser, generated, layers):
    """The options python -m airmlx.bench and python -m airmlx.bench_moe share."""
    add_source_options(parser, generated, layers)
    parser.add_argument("--backend", default="torch", help="comma-separated: torch,mlx")
    add_budget_options(parser, fraction=0.25)
    parser.add_argument("--steps", type=whole_number(1), default=8, help="decode steps per regime")


def build_parser():
    parser = ArgumentParser(prog="python -m airmlx.bench", description=__doc__.split("\n")[0])
    add_common_options(parser, "the generated random Llama", layers=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--compare", choices=["airllm"], help="also time AirLLM, when installed")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default=None, help="stream quantised shards")
    parser.add_argument("--batch", type=whole_numbers(1), default=None,
                        help="also time cold decode at these batch sizes, e.g. 1,8,32")
    parser.add_argument("--score", type=int, default=0, help="also score this many 64-token requests, layer-major")
    parser.add_argument("--warm-after-read", action="store_true",
                        help="also time warm steps of a model opened after its files came into the page cache by "
                             "read() (small folios: the store reads each stage once more into huge pages)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="a pipeline over this many ranks on this machine (mlx.launch / torchrun) against one "
                             "process: cold tokens/s of --batch (default 8), generate()'s tokens/s warm and cold "
                             "with the batch whole and in a micro-batch per rank, bytes per rank per sweep, and the "
                             "prediction for hosts with a disk each (airmlx/bench_hosts.py)")
    return parser


@face
def main(argv=None):
    parser = build_parser()
    args = parse_bench_args(parser, argv)
    if args.hosts > 1:
        from .bench_hosts import run_hosts
        run_hosts(args, bench_shards(args, args.compression)[1])
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
