"""The tree of draft tokens one target sweep verifies, grown level by level by the draft model.

Every node carries a value: the estimated chance that verification accepts it (its parent's value times the
chance of this step). Greedy decoding values a child by the draft's probability for its token, calibrated by
what was accepted so far (SpecExec's choice: the likeliest continuations); sampling values it by its rank
among its siblings only, so the tree's shape never depends on the tokens drawn, which the multi-draft
acceptance rule needs to stay exact (acceptance.walk_sampling). Each level the draft runs the nodes worth
expanding in one call; the sweep verifies the `cap` most valuable nodes whose value pays for them
(spec_measure.Measurements). A chain is the tree with one child per node.
"""
from dataclasses import dataclass, field

import numpy as np

from .acceptance import ROOT, draw_distinct

TREE_BRANCHING = 8  # children a node may get in a tree (a chain: 1)
LEVEL_WIDTH = 16  # most nodes the draft runs in one call


@dataclass
class Tree:
    """Nodes in the order they were made; parents[i] is ROOT or an earlier node."""
    tokens: list = field(default_factory=list)
    parents: list = field(default_factory=list)
    depths: list = field(default_factory=list)  # 1 for ROOT's children
    values: list = field(default_factory=list)  # estimated chance of being accepted
    probs: list = field(default_factory=list)  # the draft's probability for the token, under its parent
    origin: list = field(default_factory=list)  # index in the tree it was selected from

    def __len__(self):
        return len(self.tokens)

    def add(self, token: int, parent: int, value: float, prob: float, origin: int = -1) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        self.values.append(float(value))
        self.probs.append(float(prob))
        self.origin.append(origin if origin >= 0 else len(self.tokens) - 1)
        return len(self.tokens) - 1

    def children(self) -> dict:
        """node (or ROOT) -> its children, in the order they were made (rank order)."""
        out = {}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
        return out

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def path_to(self, node: int) -> list:
        """node's ancestors and itself, root side first."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def best(self, cap: int, cutoff: float) -> "Tree":
        """The `cap` most valuable nodes whose value exceeds cutoff, breadth first. Values never grow from a
        parent to its children, nor from a child to a later sibling, so the choice keeps every chosen node's
        ancestors and earlier siblings."""
        order = sorted(range(len(self)), key=lambda i: (-self.values[i], self.depths[i], i))
        keep = sorted((i for i in order[:cap] if self.values[i] > cutoff), key=lambda i: (self.depths[i], i))
        index = {old: new for new, old in enumerate(keep)}
        out = Tree()
        for i in keep:
            out.add(self.tokens[i], ROOT if self.parents[i] == ROOT else index[self.parents[i]], self.values[i],
                    self.probs[i], origin=i)
        return out


def ancestor_mask(tree: Tree, rows: list, slot: dict, prefix: int, width: int) -> np.ndarray:
    """(1, len(rows), width) bool: node rows[k] sees the first `prefix` columns (everything up to the root),
    and the columns slot[a] of itself and its ancestors a."""
    mask = np.zeros((1, len(rows), width), dtype=bool)
    mask[..., :prefix] = True
    for k, node in enumerate(rows):
        for a in tree.path_to(node):
            mask[0, k, slot[a]] = True
    return mask


def grow(root_probs: np.ndarray, expand, measure, *, cap: int, depth: int, branching: int, greedy: bool,
         rng) -> tuple:
    """Grow a draft tree of at most `cap` nodes and `depth` levels from the draft's distribution after the
    root. expand(tree, nodes) runs the draft on those nodes (all of one level, their ancestors already run)
    and returns its distribution after each; it runs at most `cap` nodes in all. Returns (the tree to verify,
    {its node or ROOT: the draft's distribution after it, where it ran})."""
    tree, dists = Tree(), {ROOT: root_probs}
    frontier = [ROOT]
    carry_on = measure.continues.value
    expanded = 0  # nodes the draft ran: its cache grows by them, at most `cap` (a server's KV headroom)
    while frontier and depth > 0:
        level = []
        for node in frontier:
            q = dists[node]
            value = 1.0 if node == ROOT else tree.values[node]
            if greedy:
                top = np.argsort(-q)[:branching]
                picks = [t for t in top.tolist() if q[t] > 0]
            else:
                picks = draw_distinct(q, branching, rng)
            for rank, tok in enumerate(picks):
                step = measure.accept_prob(q[tok]) if greedy else measure.accept_rank(rank)
                level.append(tree.add(tok, node, value * step, q[tok]))
        if not level or tree.depths[level[0]] >= min(cap, depth):
            break
        ranked = sorted(tree.values, reverse=True)
        cutoff = max(measure.node_cutoff(), ranked[cap - 1] if len(ranked) >= cap else 0.0)
        frontier = sorted((i for i in level if tree.values[i] * carry_on > cutoff),
                          key=lambda i: -tree.values[i])[:LEVEL_WIDTH]
        frontier = frontier[:measure.worth_drafting([carry_on * tree.values[i] for i in frontier])][:cap - expanded]
        if not frontier:
            break
        expanded += len(frontier)
        dists.update(zip(frontier, expand(tree, frontier)))
    chosen = tree.best(cap, measure.node_cutoff())
    return chosen, {new: dists[old] for new, old in [(ROOT, ROOT)] + list(enumerate(chosen.origin)) if old in dists}
