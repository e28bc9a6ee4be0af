"""`python -m airmlx.bench_spec`: speculative decoding against plain streamed decoding, cold, on trained pairs.

Pairs (trained models, never random weights):
  self4bit  the bundled demo model as target, its own 4-bit copy as draft
  sibling   a bigger sibling of the demo model as target (the demo model deepened to 12 layers and trained on
            the same corpus by scripts/train_demo_model.py; built once into the work dir), the demo model as draft
  smollm2   a real pretrained model as target: SmolLM2-135M-Instruct in bf16 (read by transformers from its
            Q4_1 GGUF, --gguf or the one scripts/fetch_smollm2.py fetches; built once into the work dir), its own
            4-bit copy as draft

The target's memory budget is a fraction of its bytes (default a quarter), so most of it streams; the draft is
resident on top of that (its bytes are added to memory_budget, so the target streams exactly what plain decoding
streams). Before every target sweep its streamed stage files are evicted from the page cache (the cold regime); a
speculative round evicts them before its read-ahead, which it gives before drafting, so what the disk reads during
the draft counts as the sweep's reads. Each mode generates the same greedy tokens from the same prompts: plain (one
token per sweep), chain and tree speculation, taking turns prompt by prompt so the load of a shared machine hits
them alike; tokens per sweep, tokens/s and the ratio to plain are reported, with in how many prompts the
outputs were identical to plain decoding's (in bf16 they may differ at near-ties: README, "Precision").
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_hosts import cold_sweeps
from .cli import ArgumentParser, add_budget_options, bench_budget, face, parse_bench_args
from .errors import AirmlxError
from .hub import DEMO_MODEL
from .spec_measure import Measurements
from .units import format_bytes

PROMPTS = ["The list", "A function", "   def f(", "The dictionary", "When an exception", "The import statement"]
# the sibling: the demo model's 6 layers spread over 12, then 52 steps on the same corpus (about 6 minutes on a
# busy 2-core CPU); held-out perplexity 73.8 against the demo model's 76.1
SIBLING_ARGS = ["--seed", "0", "--layers", "12", "--lr", "5e-4", "--steps", "52", "--minutes", "60"]
MODES = ("plain", "chain", "tree")
PAIRS = ("self4bit", "sibling", "smollm2")


def sibling_model(work: Path, given: "str | None") -> Path:
    """The trained sibling: `given`, or the one built into the work dir (built once, by the training script)."""
    if given:
        return Path(given)
    out = work / "sibling-192x12"
    if (out / "model.safetensors").is_file():
        return out
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_demo_model.py"
    if not script.is_file():
        raise AirmlxError("the sibling model is built by scripts/train_demo_model.py, which an installed package "
                          "lacks; run from a clone, or pass --sibling FOLDER.")
    cmd = [sys.executable, str(script), "--out", str(out), "--init-from", str(DEMO_MODEL), *SIBLING_ARGS]
    print("training the sibling once:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def smollm2_model(work: Path, given: "str | None") -> Path:
    """SmolLM2-135M-Instruct as a bf16 checkpoint in the work dir, made once from its Q4_1 GGUF by transformers'
    own GGUF reader (dequantised): a trained target whose 4-bit copy is not the file it came from."""
    out = work / "smollm2-135m-bf16"
    if (out / "config.json").is_file():
        return out
    gguf = Path(given) if given else None
    if gguf is None:
        script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py"
        if not script.is_file():
            raise AirmlxError("the SmolLM2 GGUF is fetched by scripts/fetch_smollm2.py, which an installed package "
                              "lacks; run from a clone, or pass --gguf FILE.")
        got = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        if got.returncode:
            raise AirmlxError(f"could not fetch the SmolLM2 GGUF ({got.stderr.strip()[-200:]}); pass --gguf FILE.")
        gguf = Path(got.stdout.strip().splitlines()[-1])
    if not gguf.is_file():
        raise AirmlxError(f"--gguf {gguf}: no such file.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"making a bf16 checkpoint of {gguf.name} once: {out}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the weights are dequantised: plain bf16 tensors from here on
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def run_modes(model, prompts, modes, tokens):
    """Greedy generation of `tokens` new tokens per prompt in every mode, the modes taking turns prompt by
    prompt (so a change in the machine's load hits them alike); each mode keeps its own measurements.
    Returns {mode: (outputs, new tokens, sweeps, seconds, measurements)}."""
    tok = model.tokenizer
    kwargs = {m: {"draft_model": False} if m == "plain" else {"speculation": m} for m in modes}
    measured = {m: Measurements() for m in modes}
    results = {m: ([], 0, 0, 0.0) for m in modes}
    for mode in modes:  # warm up: resident stages loaded, the tree's sizing measured
        model.speculation = measured[mode]
        model.generate([tok(prompts[0])["input_ids"]], max_new_tokens=16, **kwargs[mode])
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        for mode in modes:
            model.speculation = measured[mode]
            before = model.scheduler.steps
            t0 = time.perf_counter()
            out = model.generate([ids], max_new_tokens=tokens, **kwargs[mode])[0]
            outputs, new, sweeps, seconds = results[mode]
            results[mode] = (outputs + [out], new + len(out) - len(ids), sweeps + model.scheduler.steps - before,
                             seconds + time.perf_counter() - t0)
    return {m: (*results[m], measured[m]) for m in modes}


def run_pair(pair, backend, args, work):
    from .auto import UNLIMITED, AutoModel, backend_class
    if pair == "self4bit":
        target_src, draft_spec = DEMO_MODEL, args.draft_compression
    elif pair == "smollm2":
        target_src, draft_spec = smollm2_model(work, args.gguf), args.draft_compression
    else:
        target_src, draft_spec = sibling_model(work, args.sibling), DEMO_MODEL
    shards = work / f"{Path(target_src).name}-shards"
    probe = AutoModel.from_pretrained(target_src, backend=backend, layer_shards_saving_path=shards,
                                      memory_budget=UNLIMITED)
    target_bytes = probe.shard_bytes
    probe.close()
    target_budget = bench_budget(args, target_bytes)
    draft_src = draft_spec
    own_copy = pair != "sibling"
    if own_copy:
        from .draft import quantised_copy
        draft_src = quantised_copy(shards, draft_spec)
    draft = AutoModel.from_pretrained(draft_src, backend=backend, memory_budget=UNLIMITED,
                                      dtype=backend_class(backend).draft_dtype(),  # as load_draft's default
                                      layer_shards_saving_path=work / f"{Path(draft_src).name}-draft-shards"
                                      if not own_copy else None)
    draft.plan.budget = draft.plan.total_bytes
    model = AutoModel.from_pretrained(shards, backend=backend, draft_model=draft,
                                      memory_budget=target_budget + draft.plan.total_bytes)
    gbps = max(model.read_bandwidth(cold=True) for _ in range(2)) / 1e9
    rows, plain = [], None
    with cold_sweeps(model):
        results = run_modes(model, PROMPTS[: args.prompts] * args.repeat, args.modes, args.tokens)
    for mode in args.modes:
        outputs, new, sweeps, seconds, measured = results[mode]
        last = measured.total
        row = dict(pair=pair, backend=backend, mode=mode, target=str(target_src), draft=str(draft_spec),
                   target_bytes=target_bytes, draft_bytes=draft.plan.total_bytes, target_budget=target_budget,
                   streamed_bytes_per_sweep=model.plan.streamed_bytes_per_step, cold_read_gbps=round(gbps, 3),
                   new_tokens=new, sweeps=sweeps, seconds=seconds, tokens_per_sweep=new / sweeps,
                   tokens_per_s=new / seconds, draft_ms_per_round=1e3 * last.draft_s / max(last.sweeps, 1),
                   sweep_ms_per_round=1e3 * last.verify_s / max(last.sweeps, 1),
                   acceptance_rate=last.acceptance_rate, largest_tree=last.largest)
        if mode == "plain":
            plain = (outputs, row["tokens_per_s"])
        elif plain is not None:
            row["speedup"] = row["tokens_per_s"] / plain[1]
            same = [list(a) == list(b) for a, b in zip(outputs, plain[0])]
            row["identical_to_plain"], row["identical_prompts"] = all(same), f"{sum(same)} of {len(same)}"
        rows.append(row)
        print_row(row)
    model.close()
    draft.close()
    return rows


def print_row(r):
    extra = "" if r["mode"] == "plain" else (
        f"  {r.get('speedup', 0):5.2f} x plain, accepted {r['acceptance_rate']:.0%}, draft "
        f"{r['draft_ms_per_round']:.1f} ms vs sweep {r['sweep_ms_per_round']:.1f} ms per round, largest "
        f"{r['largest_tree']}, identical to plain in {r.get('identical_prompts')} prompts")
    print(f"{r['backend']:<6}{r['pair']:<9}{r['mode']:<6}{r['tokens_per_sweep']:6.2f} tokens/sweep "
          f"{r['tokens_per_s']:7.1f} tokens/s{extra}", flush=True)


def build_parser():
    parser = ArgumentParser(prog="python -m airmlx.bench_spec", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="torch", help="comma-separated: torch,mlx")
    parser.add_argument("--pairs", default="self4bit,sibling", help="comma-separated: self4bit,sibling,smollm2")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: plain,chain,tree")
    add_budget_options(parser, fraction=0.25)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts (at most {len(PROMPTS)})")
    parser.add_argument("--repeat", type=int, default=1, help="times through the prompts")
    parser.add_argument("--sibling", help="a trained sibling folder instead of building one in the work dir")
    parser.add_argument("--draft-compression", default="4bit",
                        help="the self-drafting pairs' copy of the target (default 4bit; e.g. 4bit-g32, 8bit)")
    parser.add_argument("--gguf", help="the SmolLM2-135M-Instruct Q4_1 GGUF for the smollm2 pair (default: fetched "
                        "by scripts/fetch_smollm2.py)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models step slower when threads contend)")
    parser.add_argument("--work-dir", help="where shards and the sibling live (default: $TMPDIR/airmlx-bench-spec)")
    parser.add_argument("--json", help="write the results here")
    return parser


@face
def main(argv=None):
    parser = build_parser()
    args = parse_bench_args(parser, argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes {','.join(args.modes)}: use some of {','.join(MODES)}")
    args.pairs = [p for p in args.pairs.split(",") if p]
    if not set(args.pairs) <= set(PAIRS):
        parser.error(f"--pairs {','.join(args.pairs)}: use some of {','.join(PAIRS)}")
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / "airmlx-bench-spec")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for backend in args.backend.split(","):
        for pair in args.pairs:
            rows += run_pair(pair, backend, args, work)
    summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def summary(rows):
    print("\n| backend | pair | mode | tokens / sweep | tokens/s | × plain | accepted | draft ms / sweep ms per round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        spec = r["mode"] != "plain"
        print(f"| {r['backend']} | {r['pair']} | {r['mode']} | {r['tokens_per_sweep']:.2f} | {r['tokens_per_s']:.1f} | "
              + (f"{r.get('speedup', 0):.2f} | {r['acceptance_rate']:.0%} | {r['draft_ms_per_round']:.1f} / "
                 f"{r['sweep_ms_per_round']:.1f} |" if spec else "1.00 | | |"))
    print()
    for r in [r for r in rows if r["mode"] == "plain"]:
        print(f"{r['backend']} {r['pair']}: target {format_bytes(r['target_bytes'])} under a budget of "
              f"{format_bytes(r['target_budget'])} ({format_bytes(r['streamed_bytes_per_sweep'])} streamed per sweep, "
              f"cold read {r['cold_read_gbps']:.2f} GB/s) + draft {format_bytes(r['draft_bytes'])} resident")

if __name__ == "__main__":
    sys.exit(main())
