"""Run in a fresh process (tests/test_memory.py): stream a model under a budget and print, as JSON, what
the process held: its peak resident set above a baseline taken once the frameworks are loaded, and the
model's own memory_stats().

    python tests/memory_probe.py MODEL BACKEND [FRACTION] [--budget B] [--baseline warm|imports] [--dtype D]
                                 [--prompt N] [--new N] [--step N]

The budget is FRACTION of the model as the backend holds it (at least 1.2 x the minimum; 0.3 by default), or
--budget. glibc serves allocations above 64 KiB from their own mappings (MALLOC_MMAP_THRESHOLD_, set by the
parent), so freed memory leaves the resident set and the measurement is of what is held, not of the heap's
high-water mark.

--baseline warm (the tests'): the baseline is taken after a first run of the same model, so the runtime that
comes once per process (the frameworks' modelling code, the tokenizer, kernel caches) is left out.
--baseline imports: it is taken right after importing airmlx, transformers and the backend's framework, and the
run loads the tokenizer too, so rss_peak holds that runtime as well (README, "Memory budget"); load_rss is what
opening the model added to the resident set, tokenizer_rss what loading the tokenizer did. MODEL may then be
anything from_pretrained opens (a GGUF file); the parent's MALLOC_MMAP_THRESHOLD_ is left to the caller
(airmlx's own threshold when unset).
"""
import argparse
import gc
import json
from pathlib import Path


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("backend")
    parser.add_argument("fraction", type=float, nargs="?", default=0.3)
    parser.add_argument("--budget", default=None, help="a budget in bytes or units (100MB); overrides FRACTION")
    parser.add_argument("--baseline", choices=("warm", "imports"), default="warm")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--new", type=int, default=4)
    parser.add_argument("--step", type=int, default=16)
    args = parser.parse_args()

    import numpy as np
    import transformers  # noqa: F401 (both backends read configs and tokenizers with it)

    import airmlx
    from airmlx.auto import backend_class
    from airmlx.units import parse_bytes
    backend_class(args.backend)  # the backend's frameworks imported
    budget = parse_bytes(args.budget) if args.budget else None
    held = None
    if args.baseline == "warm":
        # load every module and build the framework's model skeleton once, outside the measurement
        with airmlx.AutoModel.from_pretrained(args.shards, backend=args.backend, dtype=args.dtype,
                                              memory_budget="1TB", prefill_step_size=args.step) as probe:
            held = probe.plan.resident_bytes + probe.plan.expert_bytes  # the whole model, as the backend holds it
            budget = budget or max(int(args.fraction * held), int(1.2 * probe.minimum_budget))
            # the framework's first-use costs, also outside: the same prompt, so the kernels oneDNN keeps for its
            # shapes (bounded: airmlx/__init__.py) are made here
            warm = (np.arange(args.prompt) * 7 % (probe.config["vocab_size"] - 3) + 3).tolist()
            probe.generate(warm, max_new_tokens=args.new)
        del probe
        gc.collect()
        if args.backend == "mlx":
            import mlx.core as mx
            mx.clear_cache()
    elif budget is None:
        raise SystemExit("--baseline imports needs --budget (a fraction needs the model loaded first)")
    reset_peak_rss()
    baseline = status("VmRSS")
    model = airmlx.AutoModel.from_pretrained(args.shards, backend=args.backend, dtype=args.dtype,
                                             memory_budget=budget, prefill_step_size=args.step)
    load_rss, tokenizer_rss = status("VmRSS") - baseline, 0
    if args.baseline == "imports":
        before = status("VmRSS")
        model.tokenizer  # noqa: B018 (loaded on first use)
        tokenizer_rss = status("VmRSS") - before
    prompt = (np.arange(args.prompt) * 7 % (model.config["vocab_size"] - 3) + 3).tolist()
    model.reset_peak()
    out = model.generate(prompt, max_new_tokens=args.new)
    rss_peak = status("VmHWM") - baseline
    stats = model.memory_stats()
    experts = model.scheduler.experts
    if experts is not None:  # MoE: the largest group the cache stacks, and its largest expert, as held
        stats["expert_group_bytes"] = experts.group_bytes
        stats["largest_expert_held"] = max(experts.sizes.values()) * experts.held_per_byte
    model.close()
    print(json.dumps({"budget": budget, "held_model": held, "rss_peak": rss_peak, "load_rss": load_rss,
                      "tokenizer_rss": tokenizer_rss,
                      "baseline": args.baseline, "tokens": len(out),
                      "minimum_budget": model.minimum_budget,
                      "plan": str(model.plan), **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}))


if __name__ == "__main__":
    main()
