"""Step contexts for one sweep: a long prompt (or a scoring batch) split into chunks that run one after
another through each stage, so a stage never holds the activations of more than `step_tokens` tokens at
once while the model is still read once. Knows the backend only through begin_step()."""
import numpy as np


def chunk_bounds(batch: int, length: int, step_tokens: int) -> list:
    """[(start, end)] positions of each chunk: at most step_tokens rows x positions per chunk."""
    width = max(1, step_tokens // max(batch, 1))
    return [(i, min(i + width, length)) for i in range(0, length, width)]


def prompt_contexts(backend, tokens: np.ndarray, attention_mask: np.ndarray, cache, step_tokens: int) -> list:
    """New tokens (B, T) after the cache's past (the mask covers past + new) as chunk contexts sharing the
    cache: chunk i sees the mask up to its own last position."""
    past = attention_mask.shape[1] - tokens.shape[1]
    return [backend.begin_step(tokens[:, a:b], attention_mask[:, : past + b], cache)
            for a, b in chunk_bounds(*tokens.shape, step_tokens)]


def scoring_contexts(backend, ids: np.ndarray, mask: np.ndarray, targets, new_cache, step_tokens: int,
                     all_positions: bool = True):
    """Contexts for one left-padded batch that keeps nothing: one context when it fits a step, else chunks
    over a scratch cache (returned, so the sweep can empty each layer once it has run). With `targets`
    (B, T) the head returns log-probabilities instead of logits."""
    batch, length = ids.shape
    if batch * length <= step_tokens:
        return [backend.begin_step(ids, mask, None, all_positions, targets)], None
    pads = np.argmax(mask != 0, axis=1).tolist()
    cache = new_cache(batch, pads)
    ctxs = [backend.begin_step(ids[:, a:b], mask[:, :b], cache, all_positions,
                               None if targets is None else targets[:, a:b])
            for a, b in chunk_bounds(batch, length, step_tokens)]
    return ctxs, cache


def sweep_batches(model, batches: list, on_output, progress=None, all_positions: bool = True) -> None:
    """One read of the model for several left-padded batches [(ids, mask, targets or None)]; on_output(b, out)
    gets batch b's head output as numpy (B, T, vocab), or (B, T, 2) with targets, once all its chunks ran."""
    ctxs, owner, scratch = [], [], []
    for b, (ids, mask, targets) in enumerate(batches):
        made, cache = scoring_contexts(model.backend, ids, mask, targets, model.new_cache, model.prefill_step_size,
                                       all_positions)
        ctxs += made
        owner += [b] * len(made)
        if cache is not None:
            scratch.append(cache)
    parts = []

    def collect(i, x):
        parts.append(model.backend.logits(x))
        if i + 1 == len(ctxs) or owner[i + 1] != owner[i]:
            on_output(owner[i], parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
            parts.clear()

    model.scheduler.forward_many(ctxs, collect, progress, scratch)
