"""`python -m airmlx.score`: log-likelihoods of many requests, layer-major (about one read of the model per pass).

    python -m airmlx.score [--model PATH_OR_HUB_ID] REQUESTS.jsonl [--batch-size 8] [--max-tokens N] > scores.jsonl

Each line of REQUESTS.jsonl (or stdin, for -) is {"text": ...}, every token after the first scored, or
{"context": ..., "continuation": ...}, the continuation's tokens scored; texts, or lists of token ids. Each line
out is {"loglikelihood": ..., "is_greedy": ...} (and the request's "id", if it has one) on its request's line
number: blank lines between requests stay blank (model.score, airmlx/scoring.py).
"""
import json
import sys
import time

from .cli import ArgumentParser, add_model_options, face, load_model, whole_number
from .errors import GenerationError, OptionError, ScoreRequestError
from .units import format_bytes


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m airmlx.score",
                            description="Log-likelihoods of many requests, about one read of the model per pass.")
    parser.add_argument("requests", help='a JSON-lines file of {"text": ...} or {"context": ..., "continuation": '
                                         '...} requests (texts or token-id lists); - reads stdin')
    add_model_options(parser, speculation=False)
    parser.add_argument("--batch-size", type=whole_number(1), default=8,
                        help="requests a batch runs side by side (default %(default)s)")
    parser.add_argument("--max-tokens", type=whole_number(1), default=None,
                        help="most tokens of hidden states one pass holds (default: 512 MB of them)")
    return parser


def request_part(item: dict, key: str, where: str):
    """A request's "text", "context" or "continuation": a string or a list of token ids, or a one-line error."""
    value = item[key]
    if isinstance(value, str) or (isinstance(value, list) and all(type(t) is int for t in value)):
        return value
    raise OptionError(f'{where}: "{key}" is {json.dumps(value)[:40]}; give a string or a list of token ids.')


def read_requests(lines, source: str) -> tuple:
    """A JSON object per line (bytes, UTF-8) -> (model.score's requests: a text or ids, or a (context,
    continuation) tuple; the line each came from; each one's "id" as a 1-tuple, () without one). Other keys are
    left alone."""
    requests, numbers, ids = [], [], []
    for number, raw in enumerate(lines, 1):
        where = f"{source} line {number}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff" if number == 1 else "")
        except UnicodeDecodeError as e:
            raise OptionError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            json.dumps(item, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") is no text
        except json.JSONDecodeError as e:
            raise OptionError(f"{where}: not JSON ({e.msg}).") from None
        except UnicodeEncodeError:
            raise OptionError(f"{where}: holds a lone surrogate escape, which is no text.") from None
        keys = set(item) & {"text", "context", "continuation"} if isinstance(item, dict) else None
        if keys == {"text"}:
            requests.append(request_part(item, "text", where))
        elif keys == {"context", "continuation"}:
            requests.append((request_part(item, "context", where), request_part(item, "continuation", where)))
        else:
            raise OptionError(f'{where}: use {{"text": ...}} or {{"context": ..., "continuation": ...}}, not '
                              f"{line.strip()[:60]}.")
        numbers.append(number)
        ids.append((item["id"],) if "id" in item else ())
    if not requests:
        raise OptionError(f"{source} holds no requests.")
    return requests, numbers, ids


def output_lines(scores, numbers: list, ids: list) -> list:
    """A JSON line per request, on the line its request had: a blank line between requests gives a blank line
    out (trailing ones give none), so line N out answers line N in. A request's "id" comes back with it."""
    out = []
    for (loglikelihood, greedy), number, key in zip(scores, numbers, ids):
        out += [""] * (number - 1 - len(out))
        out.append(json.dumps({**{"id": k for k in key}, "loglikelihood": loglikelihood, "is_greedy": greedy}))
    return out


@face
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.requests == "-":
        source, (requests, numbers, ids) = "stdin", read_requests(sys.stdin.buffer, "stdin")
    else:
        try:
            with open(args.requests, "rb") as f:
                source, (requests, numbers, ids) = args.requests, read_requests(f, args.requests)
        except OSError as e:
            raise OptionError(f"{args.requests}: {e.strerror}.") from None
    with load_model(args) as model:
        start = time.perf_counter()
        try:
            scores = model.score(requests, batch_size=args.batch_size, max_tokens=args.max_tokens)
        except ScoreRequestError as e:  # named by its line, not its index
            raise GenerationError(f"{source} line {numbers[e.number]}{e.problem}") from None
        seconds = time.perf_counter() - start
        if args.profile:
            print(model.profile_report(show=False), file=sys.stderr)
    for line in output_lines(scores, numbers, ids):
        print(line)
    passes = f"{scores.passes} pass" + ("es" if scores.passes != 1 else "")
    requests = f"{len(scores)} request" + ("s" if len(scores) != 1 else "")
    print(f"scored {requests} in {passes}, {seconds:.2f} s | read "
          f"{format_bytes(scores.bytes_read)} ({format_bytes(scores.bytes_read // max(scores.passes, 1))} per pass)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
