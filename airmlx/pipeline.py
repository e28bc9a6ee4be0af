"""Several hosts, one model: the world the launcher made, and which range of stages each rank streams.

A pipeline splits the sweep (embedding, layers, head) into one contiguous range per rank. Each rank streams
its range from its own disk under its own memory budget and keeps the KV caches of its own layers; hidden
states go from rank r to rank r + 1, and the last rank's logits back to rank 0, which owns tokenisation,
sampling and the streamer (airmlx/pipeline_model.py).

The world comes from the framework's launcher: `mlx.launch` (MLX_RANK in the environment) means
mx.distributed and the MLX backend; `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR) means torch.distributed and
the torch backend.

The split balances what each rank costs per sweep: the bytes its memory plan streams (a rank with a larger
budget keeps more of its range resident, so it can take more stages) plus a small share for compute. Each
rank's plan is predicted from the stage sizes in the manifest and what its own backend makes of a byte
(measured on the stage files it has); each rank then plans its range exactly.
"""
import hashlib
import math
import os

import numpy as np

from .archs import experts_per_token, routed_experts
from .errors import AirmlxError, BudgetError
from .manifest import Manifest, host_ranges, stage_file_problem
from .plan import StageCost, make_plan
from .tensorfile import read_header

COMPUTE_WEIGHT = 0.1  # a stage's compute counts as reading this share of its bytes when ranks are balanced
COST_FIELDS = 4  # read, held, loading, ahead (airmlx.plan.StageCost)


class PipelineError(AirmlxError, RuntimeError):
    """A pipeline rank died, hung or lost its link, or the ranks do not agree on the model or the split."""


def launched_framework(env=None) -> "str | None":
    """Which framework's launcher started this process: "mlx" (mlx.launch), "torch" (torchrun), or None."""
    env = os.environ if env is None else env
    if "MLX_RANK" in env:
        return "mlx"
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return "torch"
    return None


def parse_split(value: "str | list | None", hosts: int) -> "list | None":
    """--pipeline-split "9,9" (sweep stages per rank, in rank order) -> [9, 9]; None stays None."""
    if value is None:
        return None
    try:
        counts = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        counts = []
    if len(counts) != hosts or any(n < 1 for n in counts):
        raise PipelineError(f"pipeline split {value!r}: give {hosts} whole numbers >= 1, the stages each rank runs "
                            "in rank order, e.g. '9,9' (they add up to the model's stages: embed, layers, head).")
    return counts


def rank_budget(memory_budget, rank: int, hosts: int):
    """The budget of one rank: memory_budget as given ("4GB", bytes, None), or the rank's entry of a
    comma-separated list with one budget per rank ("4GB,8GB")."""
    if isinstance(memory_budget, str) and "," in memory_budget:
        parts = [p.strip() for p in memory_budget.split(",")]
        if len(parts) != hosts:
            raise BudgetError(f"memory_budget {memory_budget!r} lists {len(parts)} budgets for {hosts} ranks; give "
                              "one budget for every rank, or one for all.")
        return parts[rank]
    return memory_budget


def sweep_stages(manifest: Manifest) -> list:
    """The stages a sweep runs, in order (routed experts ride with their layer)."""
    return [s for s in manifest.stages if s.kind != "experts"]


def model_fingerprint(manifest: Manifest) -> int:
    """A number that differs when two ranks opened different models (stage names and sizes)."""
    text = ";".join(f"{s.name}:{s.nbytes}" for s in manifest.stages)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def local_costs(manifest: Manifest, folder, backend) -> np.ndarray:
    """(sweep stages, 4) int64: each sweep stage's StageCost on this rank, a layer's routed experts folded in
    by the share a token reads (top_k of them). Stages whose files this rank lacks are estimated from its
    backend's bytes-in-memory per byte-on-disk on the stages it has."""
    measured = {}
    for entry in manifest.stages:
        path = folder / entry.file
        if stage_file_problem(path, entry) is None:
            try:
                infos = read_header(path, fix="")[1]
            except AirmlxError:
                continue
            measured[entry.name] = (entry.nbytes, *backend.footprint(entry, infos))
    read = sum(m[0] for m in measured.values()) or 1
    scale = [sum(m[i] for m in measured.values()) / read if measured else 1.0 for i in range(1, COST_FIELDS)]
    config = manifest.config
    share = experts_per_token(config) / routed_experts(config)
    experts = {s.layer: s.nbytes for s in manifest.stages if s.kind == "experts"}
    rows = []
    for s in sweep_stages(manifest):
        cost = measured.get(s.name) or (s.nbytes, *(int(s.nbytes * f) for f in scale))
        extra = int(experts.get(s.layer, 0) * share) if s.kind == "layer" else 0
        rows.append([c + extra for c in cost])
    return np.array(rows, dtype=np.int64)


def stage_costs(names: list, table: np.ndarray) -> dict:
    """{stage name: StageCost} from a (stages, 4) cost table."""
    return {n: StageCost(*(int(v) for v in row)) for n, row in zip(names, table)}


def range_cost(costs: dict, names: list, budget: int, prefetching: bool = True) -> float:
    """What a rank spends per sweep on these stages under its budget: the bytes its plan streams, plus
    COMPUTE_WEIGHT of all their bytes (compute); infinite when the budget cannot run them."""
    sub = {n: costs[n] for n in names}
    try:
        plan = make_plan(sub, budget, prefetching)
    except BudgetError:
        return math.inf
    return plan.streamed_bytes_per_step + COMPUTE_WEIGHT * sum(c.read for c in sub.values())


def balanced_split(names: list, costs: list, budgets: list, prefetching: bool = True) -> list:
    """Sweep stages per rank (contiguous, in order) that make the costliest rank as cheap as it can be.
    costs[r]: {stage name: StageCost} as rank r would hold them; budgets[r]: its memory budget. Rank 0 keeps
    the embedding and at least one layer (the KV cache's length is read from the first layer)."""
    hosts, total = len(budgets), len(names)
    if total < hosts + 1:
        raise PipelineError(f"the model has {total} stages, too few for {hosts} ranks (rank 0 needs two); "
                            "launch fewer ranks.")
    memo = {}

    def cost(r, i, j):
        if (r, i, j) not in memo:
            memo[r, i, j] = range_cost(costs[r], names[i:j], budgets[r], prefetching)
        return memo[r, i, j]

    def greedy(limit):
        """Each rank takes as many stages as stay within limit; None when the last rank cannot."""
        counts, i = [], 0
        for r in range(hosts):
            least = 2 if r == 0 else 1
            last = total - (hosts - 1 - r)  # leave one stage for each rank after this one
            if r == hosts - 1:
                j = total
            else:
                j = i + least
                while j < last and cost(r, i, j + 1) <= limit:
                    j += 1
            if j > last or cost(r, i, j) > limit:
                return None
            counts.append(j - i)
            i = j
        return counts

    hi = max(cost(r, 0, total) for r in range(hosts))
    best = greedy(hi) if math.isfinite(hi) else None
    if best is None:  # some budget is too small for any range it could get: find the rank to blame
        hi = max(cost(r, i, i + 1) for r in range(hosts) for i in range(total))
        best = greedy(hi)
        if best is None or not math.isfinite(hi):
            poor = min(range(hosts), key=lambda r: budgets[r])
            raise BudgetError(f"rank {poor}'s memory budget ({budgets[poor]} bytes) cannot run any share of the "
                              "model; raise it, or give the ranks an explicit split (--pipeline-split).")
    lo = 0.0
    while hi - lo > max(1.0, hi * 1e-6):
        mid = (lo + hi) / 2
        found = greedy(mid)
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best


def even_split(sizes: list, hosts: int) -> list:
    """Sweep stages per host balancing their bytes (what the sharder does without budgets to go by)."""
    names = [str(i) for i in range(len(sizes))]
    costs = {n: StageCost(b, b, b) for n, b in zip(names, sizes)}
    room = 4 * sum(sizes) + 1  # every host keeps everything resident: the bytes alone decide
    return balanced_split(names, [costs] * hosts, [room] * hosts, prefetching=False)


def check_split(manifest: Manifest, counts: list) -> list:
    """The stage names of each rank for a split (sweep stages per rank); rank 0 needs a layer besides the
    embedding."""
    stages = sum(1 for s in manifest.stages if s.kind != "experts")
    if sum(counts) != stages:  # an option, not a damaged folder (host_ranges' CorruptShardError)
        raise PipelineError(f"pipeline split {counts}: {sum(counts)} stages in all, but the model has {stages} (embed, "
                            f"layers, head); give the ranks {stages} in all.")
    ranges = host_ranges(manifest.stages, counts)
    if not any(s.kind == "layer" for s in ranges[0]):
        raise PipelineError(f"pipeline split {counts}: rank 0 must run the embedding and at least one layer; give it "
                            "at least 2 stages.")
    return [[s.name for s in r] for r in ranges]


def agree_on_split(link, manifest: Manifest, folder, backend, budget: int, split, prefetching: bool):
    """Every rank's stage names, the same on every rank: an explicit split (--pipeline-split), the one the folders
    were sharded with, or the balanced split of every rank's costs and budgets (exchanged over `link`, an
    airmlx.pipeline_link.Link; `folder`: this rank's shard folder, a Path)."""
    rank, size = link.rank, link.size
    names = [s.name for s in sweep_stages(manifest)]
    ident = link.gather(np.array([model_fingerprint(manifest), len(names)]), "the model")
    other = next((r for r in range(size) if tuple(ident[r]) != tuple(ident[0])), None)
    if other is not None:
        raise PipelineError(f"rank {rank}: rank {other} opened another model than rank 0 (their manifests differ); "
                            "give every rank the same model (its shard folder, or the files of its range).")
    given = parse_split(split, size)
    sharded = manifest.pipeline
    if sharded is not None:
        if sharded["rank"] != rank or len(sharded["stages_per_host"]) != size:
            raise PipelineError(f"rank {rank}: {folder} holds the stages of rank {sharded['rank']} of "
                                f"{len(sharded['stages_per_host'])} (python -m airmlx.shard --hosts --rank); launch "
                                f"{len(sharded['stages_per_host'])} ranks with this folder on rank {sharded['rank']}.")
        given = given or list(sharded["stages_per_host"])
    table = link.gather(np.concatenate([[budget], given or [0] * size,
                                        local_costs(manifest, folder, backend).ravel()]), "the pipeline split")
    splits = {tuple(int(v) for v in row[1:1 + size]) for row in table if row[1:1 + size].any()}
    if len(splits) > 1:
        raise PipelineError(f"rank {rank}: the ranks were given different pipeline splits {sorted(splits)}; give all "
                            "of them the same --pipeline-split (or shard them with the same one).")
    if splits:
        counts = list(next(iter(splits)))
    else:
        costs = [stage_costs(names, row[1 + size:].reshape(len(names), -1)) for row in table]
        counts = balanced_split(names, costs, [int(b) for b in table[:, 0]], prefetching)
    return check_split(manifest, counts)
