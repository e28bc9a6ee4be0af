"""Run in a fresh process (tests/test_memory.py): stream a shard folder under a budget and print, as JSON, what
the process held: its peak resident set above a baseline taken once the frameworks are loaded, and the
model's own memory_stats().

    python tests/memory_probe.py SHARDS BACKEND FRACTION [--dtype D] [--prompt N] [--new N] [--step N]

The budget is FRACTION of the model as the backend holds it (at least 1.2 x the minimum). glibc serves
allocations above 64 KiB from their own mappings (MALLOC_MMAP_THRESHOLD_, set by the parent), so freed
memory leaves the resident set and the measurement is of what is held, not of the heap's high-water mark.
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
    parser.add_argument("fraction", type=float)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--new", type=int, default=4)
    parser.add_argument("--step", type=int, default=16)
    args = parser.parse_args()

    import numpy as np

    import airmlx
    # load every module and build the framework's model skeleton once, outside the measurement
    with airmlx.AutoModel.from_pretrained(args.shards, backend=args.backend, dtype=args.dtype,
                                          memory_budget="1TB", prefill_step_size=args.step) as probe:
        held = probe.plan.resident_bytes + probe.plan.expert_bytes  # the whole model, as the backend holds it
        budget = max(int(args.fraction * held), int(1.2 * probe.minimum_budget))
        # the framework's first-use costs, also outside: the same prompt, so the kernels oneDNN keeps for its shapes
        # (bounded: airmlx/__init__.py) are made here
        warm = (np.arange(args.prompt) * 7 % (probe.config["vocab_size"] - 3) + 3).tolist()
        probe.generate(warm, max_new_tokens=args.new)
    del probe
    gc.collect()
    if args.backend == "mlx":
        import mlx.core as mx
        mx.clear_cache()
    reset_peak_rss()
    baseline = status("VmRSS")
    model = airmlx.AutoModel.from_pretrained(args.shards, backend=args.backend, dtype=args.dtype,
                                             memory_budget=budget, prefill_step_size=args.step)
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
    print(json.dumps({"budget": budget, "held_model": held, "rss_peak": rss_peak, "tokens": len(out),
                      "minimum_budget": model.minimum_budget,
                      "plan": str(model.plan), **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}))


if __name__ == "__main__":
    main()
