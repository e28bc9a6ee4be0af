"""The memory plan: which stages stay resident under a budget, and what everything else costs.

`memory_budget` bounds what the model's weights take in memory: resident stages as the backend holds them
(after any dtype conversion or dequantisation, not their file size), the stages in flight (read buffers or
page-cache mappings, the one loading and computing), and the MoE expert cache with its stacking room. The KV
caches (at their real dtype) and a step's activations (bounded by prefill_step_size) come on top; both are
counted in model.memory_stats(), and the default budget leaves room for them.
"""
import math
from dataclasses import dataclass

from .archs import experts_per_token
from .errors import BudgetError, GenerationError
from .units import format_bytes, parse_bytes

SAFE_FRACTION = 0.8  # of what the device reports free: room for the OS, the interpreter, fragmentation
RESERVE_CONTEXT = 4096  # tokens of KV cache the default budget leaves room for
DEFAULT_PREFILL_STEP = 512  # tokens (rows x positions) a stage runs at once; longer prompts run in chunks


def check_prefill_step(value) -> int:
    """prefill_step_size: a whole number of tokens >= 1."""
    if not isinstance(value, int) or value < 1:
        raise GenerationError(f"prefill_step_size={value!r}: use a whole number of tokens >= 1.")
    return value
NO_PREFETCH_COST = 1.25  # a sweep without prefetch waits for its reads: as if it read this much more
SCORE_LOGITS = 1 << 22  # logits the head computes at once when it scores targets (float32: 16 MB)


@dataclass(frozen=True)
class StageCost:
    read: int  # bytes read from disk: the stage file
    held: int  # bytes in memory once the backend has loaded it
    loading: int  # bytes in memory while it loads (its read buffer and whatever the backend makes of it)
    ahead: int = 0  # bytes while it waits, read (and prepared) ahead of its turn; 0: its read bytes

    @property
    def waiting(self) -> int:
        return self.ahead or self.read


@dataclass
class Plan:
    budget: int
    stages: dict  # stage name -> StageCost, in sweep order
    resident: list
    prefetch_depth: int  # stages read ahead while one computes
    expert_cache: int = 0  # MoE: bytes of loaded routed experts kept while they fit
    expert_stack: int = 0  # MoE: room for the copy a group of experts is stacked into
    expert_bytes: int = 0  # MoE: all routed experts, in memory
    expert_held_per_byte: float = 1.0  # MoE: bytes a routed expert holds loaded, per byte of its file
    expert_stacking: float = 1.0  # MoE: bytes a loaded expert takes in its group's stacked copy, per byte it holds
    draft_bytes: int = 0  # speculative decoding: the resident draft model, taken out of the budget

    @property
    def stage_bytes(self) -> dict:
        """Stage name -> file bytes (what a read of it costs)."""
        return {name: cost.read for name, cost in self.stages.items()}

    @property
    def streamed(self) -> list:
        return [s for s in self.stages if s not in self.resident]

    @property
    def resident_bytes(self) -> int:
        """Resident stages, as held in memory."""
        return sum(self.stages[s].held for s in self.resident)

    @property
    def streamed_bytes_per_step(self) -> int:
        """Bytes read from disk per step."""
        return sum(self.stages[s].read for s in self.streamed)

    @property
    def slot_bytes(self) -> int:
        """A read buffer for any streamed stage."""
        return max((self.stages[s].read for s in self.streamed), default=0)

    @property
    def in_flight_bytes(self) -> int:
        """Streamed stages read (and prepared) ahead, plus the one loading or computing."""
        if not self.streamed:
            return 0
        ahead = max(self.stages[s].waiting for s in self.streamed)
        return self.prefetch_depth * ahead + max(self.stages[s].loading for s in self.streamed)

    @property
    def load_overhead(self) -> int:
        """What loading a resident stage takes beyond what it then holds (a conversion's source)."""
        return max((self.stages[s].loading - self.stages[s].held for s in self.resident), default=0)

    @property
    def total_bytes(self) -> int:
        """Everything the plan accounts for: never above the budget."""
        return (self.resident_bytes + self.in_flight_bytes + self.load_overhead + self.expert_cache
                + self.expert_stack + self.draft_bytes)

    def __str__(self):
        experts = (f", expert cache {format_bytes(self.expert_cache)} of {format_bytes(self.expert_bytes)} experts"
                   if self.expert_bytes else "")
        return (f"budget {format_bytes(self.budget)}: {len(self.resident)}/{len(self.stages)} stages resident "
                f"({format_bytes(self.resident_bytes)}), {len(self.streamed)} streamed "
                f"({format_bytes(self.streamed_bytes_per_step)} read per step, "
                f"{format_bytes(self.in_flight_bytes)} in flight), prefetch depth {self.prefetch_depth}" + experts
                + (f", draft model {format_bytes(self.draft_bytes)} resident" if self.draft_bytes else ""))


@dataclass(frozen=True)
class ExpertDemand:
    """MoE: what the routed experts take in memory."""
    total: int = 0  # every routed expert, loaded
    largest: int = 0  # the largest one, loaded
    top_k: int = 0  # experts a token routes to in a layer
    largest_read: int = 0  # the largest one's file bytes: its read buffer while it loads
    per_step: int = 0  # file bytes of the experts a token reads in all layers
    stacking: float = 1.0  # bytes a loaded expert takes stacked (with any conversion on the way), per byte held;
    # 0: the backend computes each expert as the cache holds it, one at a time, and stacks nothing
    load_excess: int = 0  # bytes an expert briefly takes beyond what the cache counts: a converting load's buffer
    # and the copies its conversion makes
    per_layer: int = 0  # routed experts in the largest MoE layer: the most a group stacks (0: unknown)

    def stacking_room(self, experts: int) -> int:
        """Room to stack a group of this many experts, and for what one more takes while it loads."""
        return math.ceil(experts * self.largest * self.stacking) + self.load_excess

    def stackable(self, room: int) -> int:
        """The most whole experts `room` stacks: at least one, at most a layer's."""
        if not self.stacking:
            return 1
        n = max(1, (room - self.load_excess) // math.ceil(self.largest * self.stacking))
        return min(n, self.per_layer) if self.per_layer else n

    @property
    def minimum(self) -> int:
        """One token's experts in the cache, one of them stacked at a time where the backend stacks (it then
        computes the token's experts in groups of one), and what one more takes while it loads."""
        return self.top_k * self.largest + self.stacking_room(1) if self.total else 0


def minimum_budget(stages: dict, experts: ExpertDemand = ExpertDemand()) -> int:
    """The smallest budget a model runs under: its largest stage while loading (no prefetch), plus one
    token's routed experts cached and stacked."""
    return max(c.loading for c in stages.values()) + experts.minimum


def make_plan(stages: dict, budget: int, prefetching: bool = True, experts: ExpertDemand = ExpertDemand()) -> Plan:
    """Everything resident when it fits. Otherwise, for each choice of which of head and embedding (read every
    step, often the largest stages) stay resident, keep prefetch slots for the largest stage that streams and
    fill the rest with layers spread evenly (streamed reads alternate with resident compute); the plan reading
    the fewest bytes per step wins, a plan without prefetch counting NO_PREFETCH_COST times its bytes (its reads
    wait for compute), then the deeper prefetch. MoE: room for one token's experts (cached, one of them
    stacked at a time) is set aside first, and of the rest the expert cache gets the share the experts have of a
    step's reads (a token reads its experts every step, as it reads the streamed stages)."""
    overhead = max(c.loading - c.held for c in stages.values())
    total = sum(c.held for c in stages.values())
    if budget >= total + overhead + experts.minimum + experts.total:  # experts.total is 0 for a dense model
        return with_experts(Plan(budget, dict(stages), list(stages), 0), experts)
    if budget < minimum_budget(stages, experts):
        loading = max(c.loading for c in stages.values())
        what = f"{format_bytes(loading)} (its largest stage, loaded)" + (
            f" + {format_bytes(experts.minimum)} (one token's routed experts in a layer cached, one of them "
            "stacked at a time)" if experts.total else "")
        raise BudgetError(f"memory_budget {format_bytes(budget)} is below the minimum for this model, "
                          f"{what}; raise memory_budget to at least {minimum_budget(stages, experts)}.")
    room = budget - experts.minimum
    if experts.total:
        stage_reads = sum(c.read for c in stages.values())
        spare = room - max(c.loading for c in stages.values())
        room -= int(spare * experts.per_step / (experts.per_step + stage_reads))
    ends = [n for n in ("head", "embed") if n in stages]
    choices = [[], *([n] for n in ends), ends] if ends else [[]]
    plans = [p for kept in choices for depth in ((2, 1, 0) if prefetching else (0,))
             if (p := streaming_plan(stages, room, kept, depth)) is not None]
    if total + overhead <= room:  # every stage fits beside the experts' share
        plans.append(Plan(room, dict(stages), list(stages), 0))
    best = min(plans, key=lambda p: (p.streamed_bytes_per_step * (1 if p.prefetch_depth else NO_PREFETCH_COST),
                                     -p.prefetch_depth))
    best.budget = budget
    return with_experts(best, experts)


def streaming_plan(stages, room, kept, depth):
    """The plan keeping `kept` resident with `depth` prefetch slots, layers filling what is left, or None when
    that does not fit `room`. A resident stage's load may briefly need more than it then holds (a
    conversion's source): the largest such excess is kept free too."""
    candidates = [s for s in stages if s not in kept]
    if not candidates:
        return None
    slot, loading = max(stages[s].waiting for s in candidates), max(stages[s].loading for s in candidates)
    excess = lambda names: max((stages[s].loading - stages[s].held for s in names), default=0)
    room -= depth * slot + loading + sum(stages[s].held for s in kept)
    if room - excess(kept) < 0 or (depth == 2 and room < 2 * slot):  # a second slot only beside resident layers
        return None
    layers = [s for s in candidates if s not in ("head", "embed")]
    resident = list(kept)
    if layers:
        k = min(len(layers), max(room - max(excess(kept), excess(layers)), 0) // max(stages[s].held for s in layers))
        resident += [layers[i] for i in sorted({int((j + 0.5) * len(layers) / k) for j in range(k)})] if k else []
    plan = Plan(room, dict(stages), [s for s in stages if s in resident], depth)
    return plan if plan.streamed else None


def with_experts(plan, experts):
    """Give what the stages leave of the budget to the expert cache and its stacking room. Every expert is
    cached when that leaves room to stack one, and the stacking room gets what is left; otherwise it gets a
    quarter. Either way the room holds whole experts, at least one (a decode step then stacks its token's
    experts one at a time) and at most a layer's; a part of an expert would stack nothing, so the cache gets
    it. A backend that stacks nothing (stacking 0) gets no room but a converting load's excess."""
    if experts.total:
        rest = plan.budget - plan.resident_bytes - plan.in_flight_bytes - plan.load_overhead
        beside_all = rest - experts.total  # what caching every expert leaves
        room = beside_all if beside_all >= experts.stacking_room(1) else rest // 4
        plan.expert_stack = experts.stacking_room(experts.stackable(room))
        plan.expert_cache = min(experts.total, rest - plan.expert_stack)
        plan.expert_bytes = experts.total
        plan.expert_held_per_byte, plan.expert_stacking = experts.largest / experts.largest_read, experts.stacking
    return plan


def kv_bytes_per_token(config: dict, itemsize: int = 2) -> int:
    """Keys and values of one token in every layer."""
    heads = config.get("num_attention_heads", 1)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return config.get("num_hidden_layers", 0) * 2 * kv_heads * head_dim * itemsize


def inner_size(config: dict) -> int:
    """The widest MLP of a layer: dense, or a token's routed experts side by side plus a shared one."""
    return max(config.get("intermediate_size", 0),
               config.get("moe_intermediate_size", 0) * experts_per_token(config)
               + config.get("shared_expert_intermediate_size", 0))


def workspace_elements(config: dict) -> int:
    """Elements of the weight workspace the activation bound allows a matrix multiply (a layer's largest
    matrix): a backend that converts a weight to multiply it does so in blocks no larger."""
    return config.get("hidden_size", 0) * inner_size(config)


def activation_bytes(config: dict, tokens: int, batch: int = 1, context: int = 0, itemsize: int = 4,
                     prompt: int = 0, logits: int = 0) -> int:
    """An upper bound on a step's activations: one stage run on `tokens` (rows x positions, a prefill chunk)
    with a context of `context` keys per row (attention scores in float32), the hidden states of a whole
    prompt of `prompt` positions per row kept between stages, a matrix multiply's workspace (as large as
    a layer's largest weight matrix) and the head's float32 logits for `logits` positions (default: the
    last position of each row; a scoring sweep's head works through SCORE_LOGITS of them at a time)."""
    hidden = config.get("hidden_size", 0)
    heads = config.get("num_attention_heads", 1)
    vocab = config.get("vocab_size", 0)
    inner = inner_size(config)
    per_token = itemsize * (10 * hidden + 5 * inner) + 4 * heads * max(context, 1) * 2
    # a stage's input and output for every position of the prompt, and a scoring sweep's scratch keys and
    # values of one layer
    kept = 4 * batch * max(prompt, tokens // max(batch, 1)) * hidden * itemsize
    # a matrix multiply may pack its weight into a workspace (torch's CPU GEMM does for several rows; a
    # dequantised or float32 block of a weight is at most workspace_elements)
    workspace = itemsize * workspace_elements(config)
    # the logits in the compute dtype and float32, and a log-softmax's temporaries
    head = 3 * 4 * max(logits or batch, 1) * vocab
    return tokens * per_token + kept + workspace + head


def reserve_bytes(config: dict, itemsize: int = 2, prefill_step: int = DEFAULT_PREFILL_STEP,
                  context: int = RESERVE_CONTEXT, batch: int = 1) -> int:
    """What the default budget keeps free for everything that is not weights: KV caches for `context`
    tokens at their real itemsize and the activations of a prefill chunk against that context."""
    context = min(context, config.get("max_position_embeddings") or context)
    return (kv_bytes_per_token(config, itemsize) * context * batch
            + activation_bytes(config, prefill_step, batch, context, max(itemsize, 4), context))


def resolve_budget(memory_budget, backend, config: dict, prefill_step: int = DEFAULT_PREFILL_STEP) -> int:
    """memory_budget in bytes ("4GB", a number), or the default from what `backend` has free."""
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    return default_budget(backend.available_memory(), config, backend.itemsize, prefill_step)


def default_budget(available: int, config: dict, itemsize: int = 2, prefill_step: int = DEFAULT_PREFILL_STEP) -> int:
    """A safe fraction of the device's free memory, less the KV-cache and activation reserve."""
    return max(int(SAFE_FRACTION * available) - reserve_bytes(config, itemsize, prefill_step), 0)
