"""Quantisation quality: held-out perplexity, shard size and decode speed of every compression option, on the
bundled demo model and on a GGUF model (the README's compression table).

    python -m airmlx.bench_quant [--gguf PATH] [--backend torch|mlx] [--options none,8bit,4bit,...]
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .auto import BACKENDS
from .cli import ArgumentParser, face
from .demo import DEMO_MODEL, corpus, perplexity, token_stream

EVAL_TEXT = Path(__file__).parent / "texts" / "eval.txt"
OPTIONS = ["none", "8bit", "4bit", "4bit-g32", "4bit-gptq", "4bit-g32-gptq"]


def eval_ids(tokenizer):
    """The fixed English text (airmlx/texts/eval.txt, about 230 tokens) as the tokenizer encodes it."""
    return np.array(tokenizer(EVAL_TEXT.read_text())["input_ids"], dtype=np.int64)


def perplexity_of(model, ids):
    """Perplexity of one token stream in one window."""
    return perplexity(model, np.asarray(ids), window=len(ids) - 1)


def report(src, options, work_dir, backend="torch", demo=False):
    """One row per compression option: perplexity (demo: held-out corpus; else the eval text), its change
    from the uncompressed shard, shard bytes, decode tokens/s, sharding seconds."""
    from .auto import AutoModel
    rows = []
    for option in options:
        compression = None if option == "none" else option
        t0 = time.perf_counter()
        with AutoModel.from_pretrained(src, backend=backend, compression=compression, progress=False,
                                       layer_shards_saving_path=Path(work_dir) / f"{Path(src).stem}-{option}") as m:
            shard_s = time.perf_counter() - t0
            ids = token_stream(m.tokenizer, corpus()[1]) if demo else eval_ids(m.tokenizer)
            ppl = perplexity(m, ids) if demo else perplexity_of(m, ids)
            t0 = time.perf_counter()
            m.generate([ids[:16].tolist()], max_new_tokens=16, eos_token_id=-1)
            tps = 16 / (time.perf_counter() - t0)
            rows.append({"compression": option, "perplexity": ppl, "shard_bytes": m.store.manifest.total_bytes,
                         "tokens_per_s": tps, "shard_s": shard_s})
    return rows


def print_rows(title, rows):
    base = rows[0]
    print(title)
    print(f"{'compression':<16}{'ppl':>10}{'vs none':>10}{'shard MB':>10}{'size':>8}{'tok/s':>8}{'shard s':>9}")
    for r in rows:
        print(f"{r['compression']:<16}{r['perplexity']:>10.3f}{r['perplexity'] / base['perplexity'] - 1:>+10.2%}"
              f"{r['shard_bytes'] / 1e6:>10.2f}{r['shard_bytes'] / base['shard_bytes']:>8.2f}"
              f"{r['tokens_per_s']:>8.1f}{r['shard_s']:>9.1f}")


@face
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m airmlx.bench_quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="also measure this GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--backend", default="torch", choices=[b for b in BACKENDS if b != "auto"])
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated compression options")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model")
    parser.add_argument("--work-dir", default=None, help="where the shard folders go (default: a temp dir)")
    args = parser.parse_args(argv)
    options = args.options.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        if not args.no_demo:
            print_rows(f"demo model ({args.backend}; held-out corpus)",
                       report(DEMO_MODEL, options, work, args.backend, demo=True))
        if args.gguf:
            print_rows(f"{Path(args.gguf).name} ({args.backend}; airmlx/texts/eval.txt)",
                       report(args.gguf, options, work, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
