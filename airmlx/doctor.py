"""`python -m airmlx.doctor MODEL [--memory-budget B]`: what speed to expect, before a long run.

It measures the disk where the shard folder lives (cold and warm), times the compute of a few steps, and
predicts from the plan the seconds per token cold and warm, the time to prefill a prompt and the hours a
scoring run takes (airmlx/preflight.py). The bandwidths are saved in the shard folder: the CLIs print a
one-line preflight the first time they open a model, and the stats line puts what a run achieved beside them.
"""
import statistics
import sys
import time

import numpy as np

from .cli import ArgumentParser, add_model_options, face, load_model, whole_number
from .errors import OptionError
from .preflight import measure_disk, measure_experts, predict, save
from .scoring import make_passes, pass_tokens
from .units import format_bytes, per_token


def disk_alone(p) -> float:
    """Seconds a decode step spends reading from the disk, with nothing else to do."""
    return p.streamed_per_step / p.cold_bps + p.experts_per_step / (p.expert_cold_bps or p.cold_bps)


def draft_call_seconds(draft, calls: int = 4) -> float:
    """A resident draft's time for one token, measured warm (median of a few calls after a first)."""
    cache, times = draft.new_cache(), []
    for i in range(calls + 1):
        t0 = time.perf_counter()
        draft.step(np.array([[1 + i]]), np.ones((1, i + 1), dtype=np.int64), cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def scoring_passes(requests: int, tokens: int, per_pass: int, batch_size: int = 8) -> int:
    """The passes score() makes of `requests` of `tokens` tokens each (its batches of batch_size rows, as many to a
    pass as per_pass tokens hold; a request runs all its tokens but the last); counted without a list past 100,000
    requests (one pass more at most)."""
    run = max(tokens - 1, 1)
    if requests <= 100_000:
        return len(make_passes([run] * requests, batch_size, per_pass))
    batches = -(-requests // batch_size)
    return -(-batches // max(per_pass // (batch_size * run), 1))


def rounds(draft_tokens, draft_s) -> str:
    """What a speculative round's drafting costs: k calls, in seconds where --num-draft-tokens gives k."""
    if draft_tokens is None:
        return "k draft tokens costs about k calls"
    return f"{draft_tokens} draft tokens (--num-draft-tokens) costs about {1e3 * draft_tokens * draft_s:.1f} ms"


def report(model, p, prompt_tokens, requests, request_tokens, draft_s=None, draft_tokens=None):
    plan = model.plan
    prefill = p.prefill_s_per_token * prompt_tokens + plan.streamed_bytes_per_step / p.cold_bps
    passes = scoring_passes(requests, request_tokens, pass_tokens(model.config))
    scoring = passes * (plan.streamed_bytes_per_step / p.cold_bps) + requests * request_tokens * p.prefill_s_per_token
    compute = sum(p.compute_s.values())
    return "\n".join([
        f"model    {model.shard_dir} ({format_bytes(model.shard_bytes)} of shards) on {model.backend_name}",
        f"plan     {plan}",
        f"disk     {format_bytes(p.cold_bps)}/s cold, {format_bytes(p.warm_bps)}/s warm (from the page cache)",
        *([f"experts  {format_bytes(p.expert_cold_bps)}/s cold, {format_bytes(p.expert_warm_bps)}/s warm (routed "
           "experts read as decode steps read them)"] if p.expert_cold_bps else []),
        f"compute  {compute:.3f} s per decode step (stages loaded and run, measured warm)",
        f"decode   {per_token(p.cold_s_per_token)} cold, {per_token(p.warm_s_per_token)} warm "
        f"(reading {format_bytes(plan.streamed_bytes_per_step)}"
        + (f" and about {format_bytes(p.experts_per_step)} of routed experts" if plan.expert_bytes else "")
        + f" per token: {disk_alone(p):.2f} s from the disk alone)",
        *([f"draft    {1e3 * draft_s:.1f} ms a call, {format_bytes(plan.draft_bytes)} resident: the decode line is "
           f"without it; a round of {rounds(draft_tokens, draft_s)} and pays while the tokens it adds save more "
           f"than that in sweeps (the stats line shows what a run gets)"] if draft_s is not None else []),
        f"prefill  {prefill:.1f} s for a {prompt_tokens}-token prompt",
        f"scoring  {scoring / 3600:.2f} h for {requests} request{'s' * (requests != 1)} of {request_tokens} tokens "
        f"({passes} pass{'es' * (passes != 1)})",
    ])


@face
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m airmlx.doctor",
                            description="Measure the disk and predict the speed of a model streamed under a budget.")
    add_model_options(parser)
    parser.add_argument("model_path", nargs="?", help="the model (same as --model; give one of the two)")
    parser.add_argument("--prompt-tokens", type=whole_number(1), default=None,
                        help="prompt length for the prefill prediction (default 512, or the context if shorter)")
    parser.add_argument("--requests", type=whole_number(1), default=1000, help="requests for the scoring prediction")
    parser.add_argument("--request-tokens", type=whole_number(1), default=None,
                        help="tokens per scoring request (default 256, or the context if shorter)")
    args = parser.parse_args(argv)
    if args.model and args.model_path and args.model != args.model_path:
        parser.error(f"two models given: {args.model_path} and --model {args.model}; give one")
    args.model = args.model or args.model_path
    with load_model(args, preflight=False) as model:
        context = model.config.get("max_position_embeddings") or 1 << 62
        # generate and score refuse such work: no time predicted (score never runs a request's last token)
        for option, tokens, most in (("--prompt-tokens", args.prompt_tokens, context),
                                     ("--request-tokens", args.request_tokens, context + 1)):
            if tokens is not None and tokens > most:
                raise OptionError(f"{option} {tokens} is past the model's context of {context} tokens; give at most "
                                  f"{most}.")
        args.prompt_tokens = args.prompt_tokens or min(512, context)
        args.request_tokens = args.request_tokens or min(256, context)
        cold, warm = measure_disk(model)
        preflight = predict(model, cold, warm, expert_bps=measure_experts(model), keep_records=args.profile)
        save(model.shard_dir, preflight)
        draft_s = draft_call_seconds(model.draft) if model.draft is not None else None
        print(report(model, preflight, args.prompt_tokens, args.requests, args.request_tokens, draft_s,
                     args.num_draft_tokens))
        if args.profile:  # the stages of the steps it timed
            print(model.profile_report(show=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
