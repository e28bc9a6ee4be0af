"""A batch split into micro-batches on a pipeline (airmlx/pipeline_model.py): every micro-batch has its own
token loop (airmlx.generation.token_steps) and KV cache, rank 0 starts micro-batch i's step while the other
ranks work on the ones before it, and starts each micro-batch's next step once its logits are back. Every rank
reads its range once per micro-batch step."""
import collections
import contextlib

import numpy as np

from .generation import token_steps


def generate_in_parts(model, ids: np.ndarray, mask: np.ndarray, parts: int, **options) -> np.ndarray:
    """model.generate's token loop over `parts` micro-batches of the rows of ids (B, T): prompt + new ids
    (B, T + n), as one batch would give them (a part that ends early is filled with pad_token_id)."""
    rows = np.array_split(np.arange(ids.shape[0]), parts)
    loops = [token_steps(model.new_cache, ids[r], mask[r], **options) for r in rows]
    pending, logits, seqs = set(), {}, {}

    def start(i, request):
        pending.add(i)
        model.start_step(*request, lambda x: (pending.discard(i), logits.__setitem__(i, x)))

    turn = collections.deque()
    with model.overlapped():
        for i, loop in enumerate(loops):
            with _returns(i, seqs):
                start(i, next(loop))
                turn.append(i)
        while turn:
            i = turn.popleft()
            model.wait_for(lambda: i not in pending)
            with _returns(i, seqs):
                start(i, loops[i].send(logits.pop(i)))
                turn.append(i)
    width = max(s.shape[1] for s in seqs.values())
    pad, eos = options.get("pad_token_id"), np.atleast_1d(options.get("eos_token_id", []))
    if pad is None:  # token_steps' padding: the first EOS id, as transformers does
        pad = int(eos[0]) if eos.size and eos[0] is not None else 0
    return np.concatenate([np.pad(seqs[i], ((0, 0), (0, width - seqs[i].shape[1])), constant_values=pad)
                           for i in range(parts)])


@contextlib.contextmanager
def _returns(i, seqs):
    """A micro-batch's loop returning ends its turns with its sequences."""
    try:
        yield
    except StopIteration as done:
        seqs[i] = done.value
