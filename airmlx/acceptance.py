"""Verifying draft tokens against the model's own distribution, so speculation changes speed, never output.

Greedy: a draft token is accepted when it is the model's argmax there; the walk down a tree follows the
argmax while the draft proposed it, then adds the model's own token.

Sampling: speculative sampling (Leviathan et al. 2023, Chen et al. 2023) and, for several children of one
node, its multi-draft form with children drawn without replacement (as in SpecTr / Sequoia): child x drawn
from the draft's q is accepted with probability min(1, p(x) / q(x)); on rejection p becomes the residual
max(p - q, 0) renormalised and q loses x (renormalised), so the next child is checked as a draw from what is
left; when no child is accepted, a token is drawn from the last residual. Each accepted token is then
distributed exactly as the model's own sample (temperature, top-k and top-p applied as `generation.sample`
applies them), whatever the draft proposed. Pure numpy; knows nothing of models.
"""
import numpy as np

from .generation import filtered_logits

ROOT = -1  # the node a tree grows from: the last token the model has not yet run


def sampling_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution generation.sample draws from, per row (float64): temperature, then top-k, then top-p."""
    logits = filtered_logits(np.atleast_2d(logits), temperature, top_k, top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def draw(probs: np.ndarray, rng) -> int:
    """One token from a distribution, by its cumulative sum (as generation.sample draws)."""
    cdf = np.cumsum(probs / probs.sum())
    return int(min((cdf < rng.random()).sum(), len(probs) - 1))


def draw_distinct(probs: np.ndarray, count: int, rng) -> list:
    """Up to `count` distinct tokens drawn one after another without replacement, in the order drawn (the
    Gumbel-top-k trick: the largest log p + Gumbel noise)."""
    support = np.flatnonzero(probs > 0)
    keys = np.log(probs[support]) - np.log(-np.log(rng.random(len(support))))
    return support[np.argsort(-keys)[:count]].tolist()


def walk_greedy(children: dict, tokens: list, target_argmax) -> tuple:
    """Follow the model's argmax down the tree from ROOT. target_argmax(node) -> the model's token after it.
    Returns (accepted nodes, the model's own next token, [(node, child, accepted)] for every child looked at)."""
    path, seen, node = [], [], ROOT
    while True:
        best = target_argmax(node)
        nxt = next((c for c in children.get(node, ()) if tokens[c] == best), None)
        seen += [(node, c, c == nxt) for c in children.get(node, ())]
        if nxt is None:
            return path, best, seen
        path.append(nxt)
        node = nxt


def walk_sampling(children: dict, tokens: list, target_probs, draft_probs, rng) -> tuple:
    """Multi-draft speculative sampling down the tree from ROOT. target_probs(node) / draft_probs(node): the
    model's / the draft's sampling distribution after a node; children[node] in the order they were drawn
    (without replacement) from draft_probs(node). Returns (accepted nodes, the next token, [(node, child,
    accepted)] for every child checked)."""
    path, seen, node = [], [], ROOT
    while True:
        p = target_probs(node)
        kids = children.get(node, ())
        q = draft_probs(node).copy() if kids else None
        nxt = None
        for c in kids:
            x = tokens[c]
            if rng.random() * q[x] < p[x]:
                nxt = c
                seen.append((node, c, True))
                break
            seen.append((node, c, False))
            residual = np.maximum(p - q, 0.0)
            p = residual / residual.sum() if residual.sum() > 0 else p
            q[x] = 0.0
            if q.sum() <= 0:
                break
            q = q / q.sum()
        if nxt is None:
            return path, draw(p, rng), seen
        path.append(nxt)
        node = nxt
