"""`python -m airmlx.score`: log-likelihoods of many requests, layer-major (about one read of the model per pass).

    python -m airmlx.score [--model PATH_OR_HUB_ID] REQUESTS.jsonl [--batch-size 8] [--max-tokens N] > scores.jsonl

Each line of REQUESTS.jsonl (or stdin, for -) is {"text": ...}, every token after the first scored, or
{"context": ..., "continuation": ...}, the continuation's tokens scored; texts, or lists of token ids. Each line
out is {"loglikelihood": ..., "is_greedy": ...}, in the requests' order (model.score, airmlx/scoring.py).
"""
import json
import sys
import time

from .cli import ArgumentParser, add_model_options, face, load_model, whole_number
from .errors import OptionError
from .units import format_bytes


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.score",
                            description="Log-likelihoods of many requests, about one read of the model per pass.")
    parser.add_argument("requests", help='a JSON-lines file of {"text": ...} or {"context": ..., "continuation": '
                                         '...} requests (texts or token-id lists); - reads stdin')
    add_model_options(parser)
    parser.add_argument("--batch-size", type=whole_number(1), default=8,
                        help="requests a batch runs side by side (default %(default)s)")
    parser.add_argument("--max-tokens", type=whole_number(1), default=None,
                        help="most tokens of hidden states one pass holds (default: 512 MB of them)")
    return parser


def read_requests(lines, source: str) -> list:
    """A JSON object per line -> model.score's requests: a text or ids, or a (context, continuation) tuple."""
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise OptionError(f"{source} line {number}: not JSON ({e.msg}).") from None
        if isinstance(item, dict) and set(item) == {"text"}:
            requests.append(item["text"])
        elif isinstance(item, dict) and set(item) == {"context", "continuation"}:
            requests.append((item["context"], item["continuation"]))
        else:
            raise OptionError(f'{source} line {number}: use {{"text": ...}} or {{"context": ..., '
                              f'"continuation": ...}}, not {line.strip()[:60]}.')
    if not requests:
        raise OptionError(f"{source} holds no requests.")
    return requests


@face
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests == "-":
        requests = read_requests(sys.stdin, "stdin")
    else:
        try:
            with open(args.requests, encoding="utf-8") as f:
                requests = read_requests(f, args.requests)
        except OSError as e:
            raise OptionError(f"{args.requests}: {e.strerror}.") from None
    with load_model(args) as model:
        start = time.perf_counter()
        scores = model.score(requests, batch_size=args.batch_size, max_tokens=args.max_tokens)
        seconds = time.perf_counter() - start
    for loglikelihood, greedy in scores:
        print(json.dumps({"loglikelihood": loglikelihood, "is_greedy": greedy}))
    passes = f"{scores.passes} pass" + ("es" if scores.passes != 1 else "")
    print(f"scored {len(scores)} requests in {passes}, {seconds:.2f} s | read "
          f"{format_bytes(scores.bytes_read)} ({format_bytes(scores.bytes_read // max(scores.passes, 1))} per pass)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
