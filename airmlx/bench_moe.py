"""`python -m airmlx.bench_moe`: bytes read per decode step of a streamed MoE model, against its active bytes.

It builds (or takes) a Mixtral-style checkpoint, shards it (routed experts stored one by one), and runs
decode steps under a memory budget, counting what the store reads:
  active  the bytes one token touches: every non-expert stage plus top_k experts in each MoE layer
  dense   the whole model: what a step streams when experts are part of their layer
Each backend runs twice: a first run, and one that starts from the usage profile the first saved in the shard
folder. The goal is bytes per step <= 0.7 x active with the profile. Step times (cold: shard files evicted from
the page cache before each step, also as a ratio to its reads at the cold bandwidths measured for stage files
read whole and for experts read as steps read them, goal <= 1.3; warm: in the page cache) come with them, and
after the second run the doctor's predicted cold step (airmlx/preflight.py). A cold step can beat neither its
reads nor a warm step's compute, so it is also given as a ratio to the slower.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .bench import add_common_options, bench_shards, save_random_model
from .cli import ArgumentParser, bench_budget, face, whole_number
from .errors import AirmlxError
from .experts import PROFILE_NAME
from .preflight import measure_experts, predict
from .store import evict
from .units import format_bytes

MOE_CONFIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)


def build_moe_model(folder, layers, experts, skew=0.0, hidden=512):
    """A random bf16 Mixtral (about 330 MB at the defaults; experts of hidden x 3 hidden), saved once and reused.
    skew > 0: each router's row for expert e is scaled by 1 + skew * (E - 1 - e) / (E - 1), so its logits
    spread wider and top-k picks low-numbered experts more often, as trained routers favour some experts (a
    uniform random router spreads tokens evenly, which no real one does)."""
    def skewed(model):
        import torch
        with torch.no_grad():
            for layer in model.model.layers:
                gate = layer.mlp.gate.weight if hasattr(layer, "mlp") else layer.block_sparse_moe.gate.weight
                gate.mul_(1 + skew * torch.linspace(1, 0, gate.shape[0])[:, None])
    shape = {"num_hidden_layers": layers, "num_local_experts": experts, "hidden_size": hidden,
             "intermediate_size": 3 * hidden}
    return save_random_model(folder, "Mixtral", {**MOE_CONFIG, **shape}, skewed if skew else None)


def decode_steps(model, steps, cold, seed=0):
    """Per decode step: (seconds, bytes the store read, expert bytes read). Random tokens, so routing varies."""
    files = model.stage_files()
    rng = np.random.default_rng(seed)
    vocab = model.config["vocab_size"]
    cache = model.new_cache()
    model.step(rng.integers(3, vocab, size=(1, 4)), np.ones((1, 4), dtype=np.int64), cache)
    rows = []
    for i in range(steps):
        if cold:
            evict(files)
        before, expert_before = model.bytes_read, model.memory_stats()["expert_bytes_read"]
        t0 = time.perf_counter()
        model.step(rng.integers(3, vocab, size=(1, 1)), np.ones((1, 5 + i), dtype=np.int64), cache)
        rows.append((time.perf_counter() - t0, model.bytes_read - before,
                     model.memory_stats()["expert_bytes_read"] - expert_before))
    return rows


def report_row(backend, run_name, dtype, cold, warm, stats, plan, gbps, expert_gbps, budget, model_bytes, routed,
               top_k, per_expert, non_expert, active, steps, predicted=None):
    step_bytes = statistics.mean(b for _, b, _ in cold)
    expert_step_bytes = statistics.mean(e for _, _, e in cold)
    cold_s = statistics.median(t for t, _, _ in cold)
    # the step's reads at the measured cold bandwidths: stage files read whole, experts as byte ranges
    io_s = (step_bytes - expert_step_bytes) / (gbps * 1e9) + expert_step_bytes / (expert_gbps * 1e9)
    row = dict(backend=backend, run=run_name, dtype=dtype, model_bytes=model_bytes, budget_bytes=budget,
               layers=len(routed), experts_per_layer=len(routed[0].parts), top_k=top_k, expert_bytes=per_expert,
               non_expert_bytes=non_expert, active_bytes=active, bytes_per_step=step_bytes,
               expert_bytes_per_step=expert_step_bytes, over_active=step_bytes / active,
               over_dense=step_bytes / model_bytes, cold_read_gbps=gbps, cold_expert_read_gbps=expert_gbps,
               cold_step_s=cold_s, cold_over_floor=cold_s / io_s, io_s=io_s,
               cold_over_sequential_floor=cold_s * gbps * 1e9 / step_bytes,
               warm_step_s=statistics.median(t for t, _, _ in warm), plan=plan, steps=steps, **stats)
    # a cold step reads its bytes and computes what a warm step computes: it can beat neither
    row["cold_over_bound"] = cold_s / max(io_s, row["warm_step_s"])
    reads = stats["expert_lookahead_reads"]
    print(f"\n{backend}, {run_name}: model {format_bytes(model_bytes)} ({row['layers']} MoE layers x "
          f"{row['experts_per_layer']} experts, top {top_k}), budget {format_bytes(budget)}")
    print(f"  read per decode step {format_bytes(step_bytes)} (experts {format_bytes(row['expert_bytes_per_step'])})"
          f" = {row['over_active']:.2f} x active {format_bytes(active)} = {row['over_dense']:.2f} x dense")
    print(f"  step: cold {cold_s:.3f} s = {row['cold_over_floor']:.2f} x its reads ({io_s:.3f} s: stages at {gbps:.2f} "
          f"GB/s, experts at {expert_gbps:.2f} GB/s cold; {row['cold_over_sequential_floor']:.2f} x with every byte at "
          f"{gbps:.2f}), warm "
          f"{row['warm_step_s']:.3f} s; expert cache {stats['expert_hits']} hits / {stats['expert_misses']} misses, "
          f"look-ahead {stats['expert_lookahead_hits']} of {reads} reads used, "
          f"{stats['expert_profile_hits']} hits from the usage profile; {plan}")
    print(f"  a cold step can be no faster than its reads ({io_s:.3f} s) or a warm step ({row['warm_step_s']:.3f} s):"
          f" cold / the slower = {row['cold_over_bound']:.2f}")
    if predicted:
        row.update(predicted_cold_s=predicted.cold_s_per_token, cold_over_predicted=cold_s / predicted.cold_s_per_token)
        print(f"  the doctor predicts {predicted.cold_s_per_token:.3f} s cold (reading "
              f"{format_bytes(predicted.experts_per_step)} of experts a step): measured / predicted = "
              f"{row['cold_over_predicted']:.2f}")
    return row


def run(args):
    from .auto import AutoModel
    from .manifest import Manifest
    name = f"mixtral-{args.layers}x{args.experts}" + (f"-skew{args.skew:g}" if args.skew else "") + \
        (f"-h{args.hidden}" if args.hidden != MOE_CONFIG["hidden_size"] else "")
    src, shards = bench_shards(args, generated=(name, lambda f: build_moe_model(f, args.layers, args.experts,
                                                                                 args.skew, args.hidden)))
    manifest = Manifest.load(shards)
    routed = [s for s in manifest.stages if s.kind == "experts"]
    if not routed:
        raise AirmlxError(f"{src}: no routed experts in its shards; give a mixtral / qwen2_moe / qwen3_moe model.")
    top_k = manifest.config["num_experts_per_tok"]
    non_expert = sum(s.nbytes for s in manifest.stages if s.kind != "experts")
    per_expert = statistics.mean(e - s for st in routed for s, e in st.parts.values())
    active = non_expert + len(routed) * top_k * per_expert
    model_bytes = manifest.total_bytes
    budget = bench_budget(args, model_bytes)
    rows = []
    for backend in args.backend.split(","):
        # MLX's CPU gather_mm (SwitchGLU) runs only float32 (the experts stay bf16 in the cache and are widened
        # when stacked: backends/mlx_experts.py); on Metal the shards' bf16 runs as it is
        dtype = "float32" if backend == "mlx" and sys.platform != "darwin" else None
        (shards / PROFILE_NAME).unlink(missing_ok=True)  # the first run starts without a usage profile
        for run_name in ("first run", "with profile"):
            with AutoModel.from_pretrained(shards, backend=backend, memory_budget=budget, dtype=dtype) as model:
                gbps = model.read_bandwidth(cold=True) / 1e9
                expert_bps = measure_experts(model)
                cold = decode_steps(model, args.steps, cold=True)
                warm = decode_steps(model, args.steps, cold=False, seed=1)
                stats = {k: v for k, v in model.memory_stats().items() if k.startswith("expert_")}
                plan = str(model.plan)
                # the doctor's prediction, last (its own steps are left out of the usage profile)
                predicted = predict(model, gbps * 1e9, model.read_bandwidth(cold=False), expert_bps=expert_bps) \
                    if run_name == "with profile" else None
            rows.append(report_row(backend, run_name, dtype, cold, warm, stats, plan, gbps, expert_bps[0] / 1e9, budget,
                                   model_bytes, routed, top_k, per_expert, non_expert, active, args.steps, predicted))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


@face
def main(argv=None):
    parser = ArgumentParser(prog="python -m airmlx.bench_moe", description=__doc__.split("\n")[0])
    add_common_options(parser, "the generated random Mixtral", layers=8)
    parser.add_argument("--experts", type=whole_number(MOE_CONFIG["num_experts_per_tok"]), default=8,
                        help="routed experts per layer of the generated model (at least its top_k, 2)")
    parser.add_argument("--hidden", type=int, default=MOE_CONFIG["hidden_size"],
                        help="hidden size of the generated model; its experts are hidden x 3 hidden (default %(default)s)")
    parser.add_argument("--skew", type=float, default=2.0,
                        help="router skew of the generated model (0: a uniform random router; default 2)")
    args = parser.parse_args(argv)
    if args.hidden < MOE_CONFIG["num_attention_heads"] or args.hidden % MOE_CONFIG["num_attention_heads"]:
        parser.error(f"--hidden {args.hidden}: use a multiple of {MOE_CONFIG['num_attention_heads']} (its heads)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
