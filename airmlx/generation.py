"""The token loop: sampling, stopping, streaming, left-padded batches. Knows nothing of the backend:
it calls step(tokens, attention_mask, cache) -> last-position logits as numpy (B, vocab)."""
from dataclasses import dataclass

import numpy as np

from .errors import GenerationError


@dataclass
class GenerateOutput:
    sequences: object  # prompt + new tokens, in the caller's array type
    num_prompt_tokens: int
    num_new_tokens: int


def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k):
    if not is_number(temperature) or not is_number(top_p):
        raise GenerationError(f"temperature={temperature!r}, top_p={top_p!r}: both must be numbers.")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens!r}: use a whole number >= 0.")
    if do_sample and not temperature > 0:
        raise GenerationError(f"temperature={temperature!r}: use a value > 0 (or do_sample=False for greedy).")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p!r}: use a value in (0, 1].")
    if not is_int(top_k) or top_k < 0:
        raise GenerationError(f"top_k={top_k!r}: use a whole number >= 0 (0 turns it off).")


def sample(logits, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, rng=None):
    """Next token per row, in transformers' order: temperature, then top-k, then top-p."""
    if not do_sample:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature
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
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    u = (rng or np.random.default_rng()).random((logits.shape[0], 1))
    return np.minimum((cdf < u).sum(-1), logits.shape[-1] - 1)


def _unsort(values, order):
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out


def to_batch(input_ids, attention_mask=None, pad_token_id=0):
    """Any of torch / numpy / mx / (nested) list -> (ids int64 (B, T), mask int64 (B, T), restore)
    where restore(np array) gives the caller's type back. Ragged lists are left-padded."""
    kind = type(input_ids).__module__.split(".")[0]
    if kind == "torch":
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
        width = max(len(r) for r in rows)
        ids = np.array([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
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
        mask = np.asarray(attention_mask.detach().cpu() if hasattr(attention_mask, "detach") else attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match.")
    if not mask.astype(bool).any(axis=1).all():
        raise GenerationError("a prompt is empty (its attention_mask is all zeros); give every row at least one token.")
    return ids.astype(np.int64), mask.astype(np.int64), restore


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


def generate_tokens(step, new_cache, ids, mask, *, max_new_tokens=20, do_sample=False,
                    temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=None,
                    use_cache=True, streamer=None, rng=None, cache=None, past_length=0, select_rows=None):
    """Prompt ids (B, T) -> ids (B, T + n). Each step runs the model once for every row still generating;
    a row that reaches EOS leaves the batch (select_rows(cache, kept rows)) and is filled with
    pad_token_id from then on, as transformers does. With `cache` holding `past_length` earlier tokens,
    ids are only the new ones and the cache is extended."""
    check_sampling(max_new_tokens, do_sample, temperature, top_p, top_k)
    eos = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.size else 0)
    batch = ids.shape[0]
    if cache is None:
        cache = new_cache(batch, left_padding(mask))
    elif past_length:
        mask = np.concatenate([np.ones((batch, past_length), dtype=mask.dtype), mask], axis=1)
    seqs, active, tokens = ids, np.arange(batch), ids
    if streamer is not None:
        streamer.put(ids)
    for _ in range(max_new_tokens):
        if use_cache:
            logits = step(tokens, mask, cache)
        else:
            logits = step(seqs[active], mask, new_cache(len(active), left_padding(mask)))
        picked = sample(logits, do_sample, temperature, top_k, top_p, rng).astype(np.int64)
        nxt = np.full(batch, pad, dtype=np.int64)
        nxt[active] = picked
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(active), 1), dtype=mask.dtype)], axis=1)
        if streamer is not None:
            streamer.put(nxt)
        done = np.isin(picked, eos)
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

