"""The bundled demo model: where it lives, the corpus it was trained on, and held-out perplexity.

The corpus is Python's own documentation (pydoc_data.topics), so it exists wherever Python does.
"""
import math
import sys
from pathlib import Path

import numpy as np

from .auto import BACKENDS
from .cli import ArgumentParser, face
from .corpus import corpus
from .hub import DEMO_MODEL


def token_stream(tokenizer, texts):
    """Each text as <bos> text <eos>, concatenated."""
    ids = []
    for t in texts:
        ids += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.array(ids, dtype=np.int64)


def perplexity(model, ids, window=256, batch=8):
    """exp(mean next-token loss) over non-overlapping windows of the stream, batched (short last window
    left-padded)."""
    chunks = [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]
    total, count = 0.0, 0
    for b in range(0, len(chunks), batch):
        group = chunks[b:b + batch]
        width = max(len(c) for c in group) - 1
        inp = np.zeros((len(group), width), dtype=np.int64)
        mask = np.zeros_like(inp)
        for r, c in enumerate(group):
            inp[r, width - len(c) + 1:] = c[:-1]
            mask[r, width - len(c) + 1:] = 1
        logits = model.logits(inp, mask).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for r, c in enumerate(group):
            n = len(c) - 1
            total -= logp[r, width - n:, :][np.arange(n), c[1:]].sum()
            count += n
    return math.exp(total / count)


def quantisation_report(work_dir, backend="torch"):
    """Held-out perplexity, shard bytes and decode speed of the demo model unquantised, 8-bit and 4-bit."""
    import time

    from .auto import AutoModel
    rows = []
    for compression in (None, "8bit", "4bit"):
        with AutoModel.from_pretrained(DEMO_MODEL, backend=backend, compression=compression, progress=False,
                                       layer_shards_saving_path=Path(work_dir) / f"demo-{compression or 'fp32'}") as m:
            ids = token_stream(m.tokenizer, corpus()[1])
            ppl = perplexity(m, ids)
            t0 = time.perf_counter()
            m.generate([ids[:16].tolist()], max_new_tokens=32, eos_token_id=-1)
            tps = 32 / (time.perf_counter() - t0)
            rows.append({"compression": compression or "none", "perplexity": ppl,
                         "shard_bytes": m.shard_bytes, "tokens_per_s": tps})
    return rows


@face
def main(argv=None):
    import tempfile
    parser = ArgumentParser(prog="python -m airmlx.demo",
                            description="Quantisation quality of the bundled demo model.")
    parser.add_argument("--backend", default="torch", choices=[b for b in BACKENDS if b != "auto"])
    parser.add_argument("--work-dir", default=None, help="where the shard folders go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = quantisation_report(args.work_dir or tmp, args.backend)
    base = rows[0]
    print(f"{'compression':<12}{'held-out ppl':>14}{'vs none':>10}{'shard MB':>10}{'size':>8}{'tok/s':>8}")
    for r in rows:
        print(f"{r['compression']:<12}{r['perplexity']:>14.3f}{r['perplexity'] / base['perplexity'] - 1:>+10.2%}"
              f"{r['shard_bytes'] / 1e6:>10.2f}{r['shard_bytes'] / base['shard_bytes']:>8.2f}{r['tokens_per_s']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
