"""The token loop: sampling, stopping, streaming, left-padded batches. Knows nothing of the backend:
it calls step(tokens, attention_mask, cache) -> last-position logits as numpy (B, vocab)."""
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass
class GenerateOutput:
    sequences: object  # prompt + new tokens, in the caller's array type
    num_prompt_tokens: int
    num_new_tokens: int
    past_key_values: object = None  # the cache generate() continued, when one was given


HELD = "airmlx_tokens"  # the attribute a cache generate() continued keeps its token ids in (a copy keeps them)


def held_tokens(cache, length: int) -> "list | None":
    """The token ids a cache of `length` tokens holds: known when it is empty or generate() left it so."""
    held = getattr(cache, HELD, None) if length else []
    return held if held is not None and len(held) == length else None


def note_held(cache, tokens: "list | None", length: int) -> None:
    """After generate(): the cache holds the first `length` of `tokens` (None: not known)."""
    if tokens is None or len(tokens) < length:
        forget_held(cache)
        return
    try:
        setattr(cache, HELD, tokens[:length])
    except AttributeError:  # a cache that takes no attribute: its tokens stay unknown
        pass


def forget_held(cache) -> None:
    """A call other than generate() ran tokens through the cache, or changed it."""
    if getattr(cache, HELD, None) is not None:
        setattr(cache, HELD, None)


def trim_held(cache, keep: int) -> None:
    held = getattr(cache, HELD, None)
    if held is not None:
        setattr(cache, HELD, held[:keep])


def whole_conversation(ids: np.ndarray, mask: np.ndarray, held: "list | None") -> tuple:
    """One row continuing a cache -> (the ids to run, their mask, the ids before them that do not run). Its left
    padding does not run (the cache's positions would count it). Nor, in transformers' way of continuing a cache
    (input_ids the whole conversation), do the tokens the cache holds (`held`), when the row after its padding
    starts with them; otherwise the row is only the new tokens (airmlx's way)."""
    pads = int(np.argmax(mask[0] != 0)) if mask[0].any() else 0
    n = len(held or [])
    if n and ids.shape[1] - pads > n and ids[0, pads:pads + n].tolist() == held:
        pads += n
    return ids[:, pads:], mask[:, pads:], ids[:, :pads]


class WholePrompt:
    """A streamer whose first put (the prompt) carries the part of a conversation that did not run before it, so
    it is shown the whole conversation as its prompt, as transformers' generate shows it."""

    def __init__(self, streamer, before: np.ndarray):
        self.streamer, self.before = streamer, before

    def put(self, ids):
        if self.before is not None:
            ids, self.before = np.concatenate([self.before, np.asarray(ids).reshape(1, -1)], axis=1), None
        self.streamer.put(ids)

    def end(self):
        self.streamer.end()


class Given:
    """A streamer in front of another (or of none) that keeps the token ids put through it: the prompt that ran,
    then each new token, so what a cache holds is known if the run is cut short (Ctrl-C)."""

    def __init__(self, streamer=None):
        self.streamer, self.ids = streamer, []

    def put(self, ids):
        self.ids.extend(np.asarray(ids).reshape(-1).tolist())
        if self.streamer is not None:
            self.streamer.put(ids)

    def end(self):
        if self.streamer is not None:
            self.streamer.end()

    def certainly_held(self, prompt_length: int) -> list:
        """The ids a cut-short run certainly left in its cache: the prompt and every new token but the last one
        given out (a sweep cut short left some layers longer), or none of them before a new token came."""
        new = self.ids[prompt_length:]
        return self.ids[:prompt_length] + new[:-1] if new else []


def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# transformers' global generation defaults (transformers 5: GenerationConfig._get_default_generation_params()),
# used where neither the call nor the checkpoint's generation_config.json sets a value; tests/test_generate.py
# checks them against transformers
SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def resolve_sampling(generation_config: dict, do_sample=None, temperature=None, top_k=None, top_p=None) -> dict:
    """do_sample, temperature, top_k and top_p as transformers' generate resolves them: the argument when it
    is not None, else the checkpoint's generation_config.json, else transformers' global default."""
    given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return {name: next(v for v in (given[name], generation_config.get(name), default) if v is not None)
            for name, default in SAMPLING_DEFAULTS.items()}


def check_seed(seed) -> None:
    if seed is not None and (not is_int(seed) or seed < 0):
        raise GenerationError(f"seed={seed!r}: use a whole number >= 0, or None for a fresh one.")


def check_token_ids(name: str, value, many: bool = True) -> None:
    """eos_token_id (a token id or a list of them) or pad_token_id (one id): whole numbers, or None. A negative
    eos id is no token, so nothing stops a row (transformers takes it too, with a warning)."""
    ids = list(value) if many and isinstance(value, (list, tuple, np.ndarray)) else [value]
    if value is not None and not all(is_int(t) and (many or t >= 0) for t in ids):  # [] is no eos: taken
        raise GenerationError(f"{name}={value!r}: use a token id (a whole number" + (")" if many else " >= 0)")
                              + (", a list of them" if many else "") + ", or None for the model's own.")


def check_flags(error=GenerationError, **flags) -> None:
    """do_sample, use_cache, ...: True, False (or None where the default is meant); "no" would count as True."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise error(f"{name}={value!r}: use True or False.")


def check_streamer(streamer) -> None:
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise GenerationError(f"streamer={type(streamer).__name__}: give an object with put(ids) and end(), as "
                              "transformers' TextStreamer has.")


def check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k):
    if not is_number(temperature) or not is_number(top_p):
        raise GenerationError(f"temperature={temperature!r}, top_p={top_p!r}: both must be numbers.")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: use a whole number >= 0.")
    if do_sample and not 0 < temperature < float("inf"):
        raise GenerationError(f"temperature={temperature!r}: use a finite value > 0 (or do_sample=False for greedy).")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p!r}: use a value in (0, 1].")
    if not is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k={top_k!r}: use a whole number >= 0 (0 turns it off).")


def sample(logits, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, rng=None):
    """Next token per row, in transformers' order: temperature, then top-k, then top-p."""
    if not do_sample:
        return logits.argmax(axis=-1)
    logits = filtered_logits(logits, temperature, top_k, top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    u = (rng or np.random.default_rng()).random((logits.shape[0], 1))
    return np.minimum((cdf < u).sum(-1), logits.shape[-1] - 1)


def filtered_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Logits (B, vocab) as float64 divided by the temperature, those top-k and then top-p drop set to -inf:
    what sample() draws from (speculative sampling's acceptance rules use the same distribution)."""
    logits = logits.astype(np.float64)
    # shifted first (softmax does not change): a tiny temperature then sends the others to -inf, never inf - inf
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(-1, keepdims=True)) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, -1:])
        cum = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = np.where(_unsort(drop, order), -np.inf, logits)
    return logits


class StopStrings:
    """Which rows' new tokens, decoded, contain one of the stop strings. The row's whole continuation is
    decoded (special tokens kept, as transformers matches them), so a stop string split over several tokens
    is found as soon as its last piece arrives."""

    def __init__(self, stop_strings: "str | Sequence[str]", tokenizer):
        stops = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if not isinstance(stops, Sequence) or not stops or not all(isinstance(t, str) and t for t in stops):
            raise GenerationError(f"stop_strings={stop_strings!r}: use a string or a list of non-empty strings.")
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise GenerationError("stop_strings needs a tokenizer to decode the new tokens; pass tokenizer=... "
                                  "(anything with decode(ids)).")
        self.stops, self.tokenizer = list(stops), tokenizer
        try:
            params = inspect.signature(tokenizer.decode).parameters.values()
            keyword = any(p.name == "skip_special_tokens" or p.kind is p.VAR_KEYWORD for p in params)
        except (TypeError, ValueError):  # no signature to read (a compiled decode): pass it, as to transformers'
            keyword = True
        # a plain decode(ids) has no special tokens to keep
        self.options = {"skip_special_tokens": False} if keyword else {}

    def rows_hit(self, new_tokens: np.ndarray) -> np.ndarray:
        """new_tokens (B, n): the tokens each row generated so far -> bool (B,), True where a stop string is in."""
        texts = (self.tokenizer.decode([int(t) for t in row], **self.options) for row in new_tokens)
        return np.array([any(stop in text for stop in self.stops) for text in texts], dtype=bool)


def _unsort(values, order):
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out


def to_batch(input_ids, attention_mask=None, pad_token_id=0, mask_pad: "int | None" = None):
    """Any of torch / numpy / mx / (nested) list -> (ids int64 (B, T), mask int64 (B, T), restore)
    where restore(np array) gives the caller's type back. Ragged lists are left-padded. Without an
    attention_mask, the tokens equal to mask_pad that lead a row are padding (transformers masks the pad id, for a
    pad id no eos id shares; one inside a prompt stays a token here, as only left padding runs)."""
    lead_pads = attention_mask is None and mask_pad is not None
    kind = type(input_ids).__module__.split(".")[0]
    if kind == "torch":
        if input_ids.is_floating_point() or input_ids.is_complex():  # numpy has no bfloat16 to say it with
            raise GenerationError(f"input_ids is a {input_ids.dtype} tensor; pass integer token ids (B, T).")
        ids = input_ids.detach().cpu().numpy()
        restore = lambda a: __import__("torch").from_numpy(a)
    elif kind == "mlx":
        ids = np.array(input_ids)
        restore = lambda a: __import__("mlx.core", fromlist=["array"]).array(a)
    elif isinstance(input_ids, np.ndarray):
        ids, restore = input_ids, lambda a: a
    elif isinstance(input_ids, (list, tuple)):
        rows = [list(input_ids)] if not input_ids or not isinstance(input_ids[0], (list, tuple, np.ndarray)) \
            else [list(r) for r in input_ids]
        if not all(is_int(t) for r in rows for t in r):
            raise GenerationError("input_ids holds something other than whole-number token ids; tokenize the text first.")
        if any(abs(int(t)) >= 1 << 63 for r in rows for t in r):
            raise GenerationError("input_ids holds a token id past 64 bits, outside any vocabulary; use this model's "
                                  "tokenizer (model.tokenizer).")
        width = max(len(r) for r in rows)
        ids = np.array([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        elif isinstance(attention_mask, (list, tuple)) and len(attention_mask) == len(rows) and all(
                isinstance(m, (list, tuple)) and len(m) == len(r) for m, r in zip(attention_mask, rows)):
            attention_mask = [[0] * (width - len(m)) + list(m) for m in attention_mask]  # padded as the rows are
        flat = not input_ids or not isinstance(input_ids[0], (list, tuple, np.ndarray))
        restore = (lambda a: a[0].tolist()) if flat else (lambda a: a.tolist())
    else:
        raise GenerationError(f"input_ids of type {type(input_ids).__name__} is not supported; pass a torch "
                              "tensor, numpy array, mx.array or list of token ids.")
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids has shape {ids.shape} and dtype {ids.dtype}; pass a non-empty "
                              "batch of integer token ids (B, T).")
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        try:
            mask = np.asarray(attention_mask.detach().cpu().long() if hasattr(attention_mask, "detach")
                              else attention_mask)
        except (ValueError, TypeError):  # a ragged list that does not match the rows
            raise GenerationError("attention_mask is not a (B, T) array of 0s and 1s matching input_ids; give one row "
                                  "per prompt, as long as it.") from None
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match.")
    if lead_pads:  # a row of nothing but the pad id stays whole: it is the prompt
        lead = np.cumsum(ids != mask_pad, axis=1) > 0
        mask = mask.astype(bool) & (lead | ~lead.any(axis=1, keepdims=True))
    if not mask.astype(bool).any(axis=1).all():
        raise GenerationError("a prompt is empty (its attention_mask is all zeros); give every row at least one token.")
    return ids.astype(np.int64), mask.astype(np.int64), restore


def mask_pad(pad_token_id, eos_token_id) -> "int | None":
    """The id that marks padding in input_ids given without an attention_mask: the pad id, unless an eos id is
    the same (a prompt may then end in it), as transformers' generate decides."""
    if pad_token_id is None or int(pad_token_id) in np.atleast_1d(eos_token_id if eos_token_id is not None else []):
        return None
    return int(pad_token_id)


def left_padding(attention_mask):
    """Leading zeros per row; raises if a row has holes (only left padding is supported)."""
    mask = np.asarray(attention_mask).astype(bool)
    pads = np.argmax(mask, axis=1)
    pads[~mask.any(axis=1)] = mask.shape[1]
    for row, pad in zip(mask, pads):
        if not row[pad:].all():
            raise GenerationError("attention_mask must be left padding (zeros, then ones) in every row; "
                                  "pad prompts on the left.")
    return pads.tolist()


def generate_tokens(step, new_cache, ids, mask, **options):
    """Prompt ids (B, T) -> ids (B, T + n), calling step(tokens, attention_mask, cache) -> logits for each
    step of token_steps(new_cache, ids, mask, **options)."""
    return run_steps(token_steps(new_cache, ids, mask, **options), step)


def run_steps(steps, step):
    """Drive a token_steps generator with step(); what it returns."""
    try:
        request = next(steps)
        while True:
            request = steps.send(step(*request))
    except StopIteration as done:
        return done.value


def token_steps(new_cache, ids, mask, *, max_new_tokens=20, do_sample=False,
                temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=None,
                use_cache=True, streamer=None, rng=None, cache=None, past_length=0, select_rows=None,
                stop_strings=None, tokenizer=None):
    """The token loop as a generator: it yields each step's (tokens, attention_mask, cache), is sent that
    step's last-position logits (B, vocab), and returns prompt + new ids (B, T + n). Each step runs the model
    once for every row still generating; a row that reaches EOS, or whose new tokens decoded with `tokenizer`
    contain one of `stop_strings`, leaves the batch (select_rows(cache, kept rows)) and is filled with
    pad_token_id from then on, as transformers does. With `cache` holding `past_length` earlier tokens, ids
    are only the new ones and the cache is extended. A caller may keep several loops' steps in flight at once
    (a pipeline's micro-batches)."""
    check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k)
    stops = StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    eos = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.size else 0)
    batch = ids.shape[0]
    if cache is None:
        cache = new_cache(batch, left_padding(mask))
    elif past_length:
        mask = np.concatenate([np.ones((batch, past_length), dtype=mask.dtype), mask], axis=1)
    seqs, active, tokens, start = ids, np.arange(batch), ids, ids.shape[1]
    if streamer is not None:
        streamer.put(ids)
    for _ in range(max_new_tokens):
        if use_cache:
            logits = yield tokens, mask, cache
        else:
            logits = yield seqs[active], mask, new_cache(len(active), left_padding(mask))
        picked = sample(logits, do_sample, temperature, top_k, top_p, rng).astype(np.int64)
        nxt = np.full(batch, pad, dtype=np.int64)
        nxt[active] = picked
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(active), 1), dtype=mask.dtype)], axis=1)
        if streamer is not None:
            streamer.put(nxt)
        done = np.isin(picked, eos)
        if stops is not None:
            done |= stops.rows_hit(seqs[active, start:])
        if done.all():
            break
        if done.any():
            keep = np.flatnonzero(~done)
            if use_cache:
                select_rows(cache, keep)
            active, mask, picked = active[keep], mask[keep], picked[keep]
        tokens = picked[:, None]
    if streamer is not None:
        streamer.end()
    return seqs

