"""Layer-major scoring: log-likelihoods of many requests for about one read of the model per pass.

A request is a text (every token after the first is scored), a (context, continuation) tuple of texts
(the continuation's tokens are scored), or the same with token-id lists instead of texts. Requests are
sorted by length into left-padded batches; a pass is as many batches as fit `max_tokens`, and every
stage runs all of a pass's batches before the next stage is read.
"""
import numpy as np

from .errors import GenerationError, ScoreRequestError
from .generation import is_int

DEFAULT_HIDDEN_BYTES = 512 << 20  # hidden states of one pass kept in memory


class Scores(list):
    """[(log-likelihood, is_greedy)] per request, plus what the run cost: the passes, and the bytes the disk read
    meanwhile (their sweeps and the next sweep's first stages, read ahead as a pass ends; the resident stages'
    first loads left out, as in generate's stats line)."""
    bytes_read = 0
    passes = 0


def prefix_token(tokenizer) -> "int | None":
    """The token a text without context is scored after (lm-eval's rule): BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """Token ids of a text pair, split where the encoding of context + continuation splits, as lm-eval's models
    split it: the context's trailing spaces go to the continuation, so "Answer: " + "Paris" scores " Paris" as
    the running text has it; an empty context is the tokenizer's BOS token (its EOS where it has none). Where
    the whole text's tokens do not begin with the context's (a token across the boundary, an EOS the tokenizer
    appends), the continuation is encoded on its own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = prefix_token(tokenizer)
        tail = tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
        return ([] if prefix is None else [prefix]), tail
    whole = tokenizer(context + continuation, verbose=False)["input_ids"]
    context_ids = tokenizer(context, verbose=False)["input_ids"]
    if whole[:len(context_ids)] != context_ids or len(whole) == len(context_ids):
        return context_ids, tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def encode(request, tokenizer, number: int = 0):
    """-> (token ids, index of the first scored token). A tuple is (context, continuation); anything else is
    one text or one list of token ids. `tokenizer` is called only when there is text. A pair of texts is split
    as encode_pair splits it."""
    if isinstance(request, tuple) and len(request) != 2:
        raise ScoreRequestError(number, f" ({str(request)[:60]!r}): a tuple is a (context, continuation) pair; give "
                                   "one text or one list of token ids as it is, not as a tuple.")
    context, continuation = request if isinstance(request, tuple) else (request, None)

    def ids(part, first):
        if isinstance(part, str):
            return tokenizer()(part, add_special_tokens=first, verbose=False)["input_ids"]  # past the context: ours
        part = part.tolist() if hasattr(part, "tolist") else part  # a tensor or array of ids
        if isinstance(part, (list, tuple)) and all(is_int(t) for t in part):
            return [int(t) for t in part]
        raise ScoreRequestError(number, f" ({str(request)[:60]!r}): score() takes texts, lists of token ids, or "
                                   "(context, continuation) pairs of either.")

    if isinstance(context, str) and isinstance(continuation, str):
        tokens, scored = encode_pair(tokenizer(), context, continuation)
        start = len(tokens)
        tokens = tokens + scored
    else:
        tokens = ids(context, True)
        start = 1 if continuation is None else len(tokens)
        if continuation is not None:
            tokens = tokens + ids(continuation, False)
    if start < 1 or len(tokens) <= start:
        raise ScoreRequestError(number, f" ({str(request)[:60]!r}) leaves nothing to score: it needs at least one "
                                   "context token and one scored token.")
    return tokens, start


def pass_tokens(config: dict) -> int:
    """The most tokens a pass scores by default: as many as DEFAULT_HIDDEN_BYTES of float32 hidden states hold."""
    return max(DEFAULT_HIDDEN_BYTES // (4 * config.get("hidden_size", 4096)), 1)


def make_passes(lengths, batch_size, max_tokens):
    """Indices grouped into batches of similar length, and batches into passes of at most max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    passes, current, used = [], [], 0
    for batch in batches:
        size = len(batch) * lengths[batch[0]]  # the longest row sets the padded width
        if current and used + size > max_tokens:
            passes.append(current)
            current, used = [], 0
        current.append(batch)
        used += size
    return passes + ([current] if current else [])


def row_scores(scores, tokens, start, offset):
    """Sum of log p(token) over the scored tokens of one row, and whether each was the argmax; `scores`
    (T, 2) holds per position the log-probability of the next token and whether it was the argmax."""
    rows = scores[offset + start - 1: offset + len(tokens) - 1]
    return float(rows[:, 0].astype(np.float64).sum()), bool((rows[:, 1] > 0.5).all())


def score(model, requests, batch_size=8, max_tokens=None, progress=True):
    if isinstance(requests, (str, bytes, tuple)):
        raise GenerationError(f"score() takes a list of requests, not one {type(requests).__name__}: use "
                              "score([request]) (a text, token ids, or a (context, continuation) tuple).")
    if not is_int(batch_size) or batch_size < 1:
        raise GenerationError(f"batch_size={batch_size!r}: use a whole number of requests >= 1.")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise GenerationError(f"max_tokens={max_tokens!r}: use a whole number of tokens >= 1, or leave it out for "
                              "the default.")
    encoded = [encode(r, lambda: model.tokenizer, n) for n, r in enumerate(requests)]
    context = model.config.get("max_position_embeddings")
    for number, (tokens, _) in enumerate(encoded):
        try:
            model.check_vocabulary(tokens)
        except GenerationError as e:
            raise ScoreRequestError(number, f": {e}") from None
        if context and len(tokens) - 1 > context:  # the last token is only scored, never run
            raise ScoreRequestError(number, f" has {len(tokens)} tokens, more than the model's context of "
                                       f"{context} and the last, scored token; shorten it.")
    max_tokens = max_tokens or pass_tokens(model.config)
    results = Scores([None] * len(encoded))
    before = model.swept_bytes_read
    pad = model.pad_token_id or 0
    # every token but the last runs (as lm-eval's models run them): a rolling window of max_length scored tokens
    # after its prefix token fits the context
    passes = make_passes([len(t) - 1 for t, _ in encoded], batch_size, max_tokens)
    for n, batches in enumerate(passes):
        inputs = []
        for batch in batches:
            width = max(len(encoded[i][0]) - 1 for i in batch)
            ids = np.full((len(batch), width), pad, dtype=np.int64)
            mask, targets = np.zeros_like(ids), np.zeros_like(ids)
            for r, i in enumerate(batch):
                tokens = encoded[i][0]
                run = width - len(tokens) + 1
                ids[r, run:], mask[r, run:], targets[r, run:] = tokens[:-1], 1, tokens[1:]
            inputs.append((ids, mask, targets))

        def collect(b, scores, batches=batches):
            for r, i in enumerate(batches[b]):
                tokens, start = encoded[i]
                results[i] = row_scores(scores[r], tokens, start, scores.shape[1] - len(tokens) + 1)

        model.sweep(inputs, collect, f"scoring pass {n + 1}/{len(passes)}" if progress else None)
    results.bytes_read = model.swept_bytes_read - before
    results.passes = len(passes)
    return results
