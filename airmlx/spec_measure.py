"""What speculative decoding measures as it runs, and the totals it reports.

The tree each round drafts is sized from these (airmlx/draft_tree.py): how long a target sweep takes for n
tokens (its cost grows with n only through compute; the read of the weights is the same), how long a draft
call takes for w tokens, how often draft tokens are accepted, and the tokens per second achieved so far. A
node is worth verifying while its chance of being accepted pays for the time it adds to the sweep at the tokens/s
reached so far; a level's nodes are worth drafting while what they are expected to add pays for the draft
call.
"""
from dataclasses import dataclass, fields

from .errors import GenerationError

DECAY = 0.95  # per measurement: older sweeps and draft calls weigh less (about the last 20 count)
PROB_BINS = 10  # greedy acceptance is estimated per tenth of the draft's probability for the token
RANKS = 8  # sampling acceptance is estimated per child rank (first drawn, second, ...)
# speculate or take plain steps (worth_a_round): on averages over the last few decode rounds and plain steps
FAST = 0.7
PROBE_EVERY = 16  # plain steps taken before a round measures again whether speculating pays; doubled after
PROBE_MOST = 256  # each round that found it did not, up to this
PLAIN_EVERY = 32  # rounds between two plain steps that measure again what one costs
FIRST_TREE = 8  # most draft tokens a round verifies until a sweep's cost has been measured at two sizes


MODES = ("chain", "tree")  # generate(speculation=...), besides None


def check_speculation(speculation) -> None:
    if speculation is not None and speculation not in MODES:
        raise GenerationError(f"speculation={speculation!r}: use 'chain', 'tree' or None.")


def check_num_draft_tokens(value) -> "int | None":
    """None (the default) or a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise GenerationError(f"num_draft_tokens={value!r}: use a whole number >= 1 (the most draft tokens one "
                              "sweep verifies), or leave it out for the default.")
    return value


class LinearCost:
    """t(n) = a + b * n fitted to recent measurements (weighted least squares, b >= 0). With no spread in n
    yet, b is 0: larger trees look free until a measurement says otherwise."""

    def __init__(self):
        self.s = [0.0] * 5  # sums of w, w n, w n^2, w t, w n t

    def add(self, n: int, seconds: float) -> None:
        self.s = [DECAY * v for v in self.s]
        for i, v in enumerate((1.0, n, n * n, seconds, n * seconds)):
            self.s[i] += v

    @property
    def known(self) -> bool:
        return self.s[0] > 0

    @property
    def spread(self) -> bool:
        """Whether measurements at two sizes or more have come in (so the slope is measured, not assumed 0)."""
        w, wn, wnn, _, _ = self.s
        return w > 0 and w * wnn - wn * wn > 1e-9 * max(w * wnn, 1e-30)

    @property
    def slope(self) -> float:
        if not self.spread:
            return 0.0
        w, wn, wnn, _, _ = self.s
        return max((w * self.s[4] - wn * self.s[3]) / (w * wnn - wn * wn), 0.0)

    def __call__(self, n: int) -> float:
        w, wn, _, wt, _ = self.s
        if w <= 0:
            return 0.0
        b = self.slope
        return max((wt - b * wn) / w, 0.0) + b * n


class Rate:
    """A decayed count of successes over trials with a prior: the estimate of one probability."""

    def __init__(self, prior: float, strength: float = 4.0):
        self.hits, self.trials = prior * strength, strength

    def add(self, hit: bool) -> None:
        self.hits = DECAY * self.hits + hit
        self.trials = DECAY * self.trials + 1

    @property
    def value(self) -> float:
        return self.hits / self.trials


@dataclass
class Totals:
    """Counts and times of speculative rounds (one target sweep each)."""
    sweeps: int = 0
    tokens: int = 0  # new tokens those sweeps produced
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    draft_s: float = 0.0  # time in the draft model
    verify_s: float = 0.0  # time in target sweeps
    largest: int = 0  # most draft tokens one sweep verified

    @property
    def tokens_per_sweep(self) -> float:
        return self.tokens / self.sweeps if self.sweeps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: "Totals") -> None:
        for f in fields(self):
            if f.name == "largest":
                self.largest = max(self.largest, other.largest)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return {"spec_sweeps": self.sweeps, "spec_tokens": self.tokens, "tokens_per_sweep": self.tokens_per_sweep,
                "spec_draft_tokens": self.drafted, "acceptance_rate": self.acceptance_rate,
                "draft_s": self.draft_s, "verify_s": self.verify_s}

    def line(self) -> str:
        per = max(self.sweeps, 1)
        return (f"speculation: {self.tokens_per_sweep:.2f} tokens per sweep, {self.accepted}/{self.drafted} draft "
                f"tokens accepted ({self.acceptance_rate:.0%}), draft {1e3 * self.draft_s / per:.1f} ms vs sweep "
                f"{1e3 * self.verify_s / per:.1f} ms per round")


class Measurements:
    """One per target model: the cost and acceptance estimates that size each round's tree, and totals."""

    def __init__(self, timed: bool = True):
        self.timed = timed  # False: rounds sized by acceptance alone (untimed())
        self.verify = LinearCost()  # target sweep seconds for n tokens
        self.draft = LinearCost()  # draft call seconds for w tokens
        self.by_prob = [Rate((i + 0.5) / PROB_BINS) for i in range(PROB_BINS)]  # greedy
        self.by_rank = [Rate(0.6 / (r + 1)) for r in range(RANKS)]  # sampling
        self.continues = Rate(0.5)  # a node reached that has children: one of them is accepted
        self.tokens_per_round = self.seconds_per_round = 0.0
        self.round_tokens = self.round_seconds = 0.0  # decode rounds (one token pending), FAST-decayed
        self.plain_seconds = self.plain_count = 0.0  # plain decode steps, FAST-decayed
        self.plain_steps = 0  # plain steps taken in a row because speculating did not pay
        self.probe_every = PROBE_EVERY
        self.rounds_since_plain = 0
        self.total, self.last = Totals(), Totals()

    # -- estimates ---------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Tokens per second of the rounds so far (decayed); 0 before the first."""
        return self.tokens_per_round / self.seconds_per_round if self.seconds_per_round else 0.0

    def accept_prob(self, q: float) -> float:
        """Greedy: the chance the model's token is a draft token the draft gave probability q (monotone in q)."""
        i = min(int(q * PROB_BINS), PROB_BINS - 1)
        return max(r.value for r in self.by_prob[: i + 1])

    def accept_rank(self, rank: int) -> float:
        """Sampling: the chance the child drawn `rank`-th (0 first) is accepted when those before were not
        (non-increasing in rank)."""
        return min(r.value for r in self.by_rank[: min(rank, RANKS - 1) + 1])

    def untimed(self) -> "Measurements":
        """Fresh estimates that size rounds by acceptance alone, never by the times measured (which differ from
        run to run), sharing this one's totals: seeded sampling with a draft then repeats."""
        fixed = Measurements(timed=False)
        fixed.total, fixed.last = self.total, self.last
        return fixed

    def round_cap(self, cap: int) -> int:
        """The most draft tokens this round may verify: `cap`, or FIRST_TREE while the sweep's cost per token
        is unmeasured, so that the first rounds (a one-shot call's only ones, where nothing is known) cost a
        few draft calls and a small sweep rather than a full tree's."""
        return cap if self.verify.spread or not self.timed else min(cap, FIRST_TREE)

    def node_cutoff(self) -> float:
        """The least acceptance chance that pays for verifying one more token in the sweep."""
        return self.rate * self.verify.slope if self.timed else 0.0

    def worth_a_round(self) -> bool:
        """Whether to speculate now, or take a plain step (a tree of no nodes). Both are measured as they run:
        the tokens/s of the last few decode rounds against a plain step's time, which one plain step measures
        after the first decode round and again every PLAIN_EVERY rounds. While the rounds give fewer tokens/s
        than plain steps would (a small model in the page cache, where a draft call costs about as much as a
        step), plain steps are taken; after PROBE_EVERY of them a round is drafted again to see whether that
        has changed, after twice as many the next time it had not."""
        if not self.timed or not self.round_seconds:
            return True
        if not self.plain_count or self.rounds_since_plain >= PLAIN_EVERY:
            self.rounds_since_plain = 0
            return False
        if self.round_tokens / self.round_seconds * (self.plain_seconds / self.plain_count) >= 1:
            self.plain_steps, self.probe_every = 0, PROBE_EVERY
            self.rounds_since_plain += 1
            return True
        if self.plain_steps >= self.probe_every:
            self.plain_steps, self.probe_every = 0, min(2 * self.probe_every, PROBE_MOST)
            return True
        self.plain_steps += 1
        return False

    def worth_drafting(self, gains: list) -> int:
        """How many of a level's nodes (best first; gains: the accepted tokens each is expected to add a level
        further down) to run through the draft: the most the expected gain pays for, after the draft call
        and the sweep's time for the nodes it adds, at the tokens/s reached so far. All, before anything
        was measured."""
        if not self.seconds_per_round or not self.timed:
            return len(gains)
        best, count, total = 0.0, 0, 0.0
        for width, gain in enumerate(gains, 1):
            total += gain
            net = total - self.rate * (self.draft(width) + self.verify.slope * width)
            if net > best:
                best, count = net, width
        return count

    # -- recording ---------------------------------------------------------------------------------
    def record_checks(self, checks: list, probs: list, greedy: bool) -> None:
        """[(node, child, accepted)] from a walk; probs[child]: the draft's probability of the child's token."""
        rank, parent = 0, None
        for node, child, accepted in checks:
            rank = rank + 1 if node == parent else 0
            if node != parent:
                self.continues.add(any(a for n, _, a in checks if n == node))
            parent = node
            if greedy:
                self.by_prob[min(int(probs[child] * PROB_BINS), PROB_BINS - 1)].add(accepted)
            else:
                self.by_rank[min(rank, RANKS - 1)].add(accepted)

    def record_plain(self, positions: int, seconds: float) -> None:
        """A plain step (worth_a_round said no): one token from a sweep of the positions pending."""
        self.verify.add(positions, seconds)
        if positions == 1:
            self.plain_seconds = FAST * self.plain_seconds + seconds
            self.plain_count = FAST * self.plain_count + 1
        for totals in (self.total, self.last):
            totals.add(Totals(sweeps=1, tokens=1, verify_s=seconds))

    def record_round(self, round_: Totals, pending: int = 1) -> None:
        if pending == 1:  # a decode round: a first round also computes the prompt
            self.round_tokens = FAST * self.round_tokens + round_.tokens
            self.round_seconds = FAST * self.round_seconds + round_.draft_s + round_.verify_s
        self.tokens_per_round = DECAY * self.tokens_per_round + round_.tokens
        self.seconds_per_round = DECAY * self.seconds_per_round + round_.draft_s + round_.verify_s
        self.total.add(round_)
        self.last.add(round_)

    def stats_line(self) -> str:
        """' | speculation: ...' for the stats line, after a generate() call that speculated; else ''."""
        return f" | {self.last.line()}" if self.last.sweeps else ""
