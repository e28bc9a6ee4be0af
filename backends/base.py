"""The Backend protocol: the one seam between airmlx's core and a framework.

A stage reaches the backend as {tensor name: RawTensor} from the store. The backend makes it runnable
(load_stage), runs it on the previous stage's output inside a step context (run_stage) and frees it
(free_stage). Stage kinds: "embed" (token ids -> hidden states, x is None), "layer" (hidden -> hidden,
using that layer's KV cache), "head" (hidden -> logits of the last position). A backend never opens a file.

Both backends are built the same way: Backend(manifest, device=None, dtype=None, trust_remote_code=False,
code_dir=None); tests/test_layout.py checks that both satisfy this protocol.
"""
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from airmlx.errors import CheckpointError, GenerationError
from airmlx.hf_config import transformers_config


@runtime_checkable
class Backend(Protocol):
    name: str
    zero_copy: bool  # load_stage keeps views of the raw buffers, so they live until free_stage
    page_cache_views: bool  # streamed stages may be page-cache mappings (the tensors view them in place)
    counts_buffers: bool  # memory() includes the store's read buffers (they come from allocate())
    itemsize: int  # bytes per element of activations and KV caches

    # -- memory
    def allocate(self, nbytes: int) -> tuple:
        """A read buffer: (the framework's object that owns it, a writable uint8 numpy view of it)."""

    def footprint(self, entry: Any, infos: dict) -> tuple:
        """(bytes a stage holds once loaded, bytes while it loads, bytes while it waits read and prepared)
        from its tensors' dtypes and shapes: what the memory plan budgets, after dtype conversion,
        dequantising or a copy to the device."""

    def set_scratch(self, nbytes: int) -> None:
        """Memory the framework may keep for reuse between stages (MLX's buffer cache)."""

    def memory(self) -> dict:
        """{"active": bytes now, "peak": bytes since reset_peak()} of weights, caches and activations."""

    def reset_peak(self) -> None: ...

    def available_memory(self) -> int:
        """Bytes this device could still give to weights."""

    @staticmethod
    def draft_dtype(device: Any = None) -> "str | None":
        """The dtype a draft model computes in when none is asked for (None: its checkpoint's)."""

    # -- stages
    def copy_layout(self, store: Any, streamed: list) -> "tuple | None":
        """Once the plan is made: (folder name, {stage: groups of tensor names}, transform(names, arrays) -> new
        bytes, version) when streamed stages are better read from a copy with those tensors in the backend's own
        layout (written once by airmlx.stage_copies, which does the files); None to read the stage files as they
        are."""

    def use_copies(self, stages: set) -> None:
        """These stages are read from the copy copy_layout asked for, from now on."""

    def keeps_views(self, entry: Any) -> bool:
        """Whether this stage, once loaded, still views its raw buffers (they live until free_stage): zero_copy,
        or a stage read from a copy in the backend's own layout that it uses as read."""

    def prepare(self, entry: Any, tensors: dict) -> dict:
        """Work on a stage's raw tensors that can run on the thread that read them (the prefetch thread, beside
        compute): e.g. repacking quantised codes. Returns what load_stage takes."""

    def from_raw(self, raw: Any) -> Any:
        """One RawTensor as the framework's array, in the compute dtype, on the device."""

    def new_cache(self, batch_size: int, left_padding: list) -> Any:
        """Empty per-layer KV caches for a batch whose prompts are left-padded by these amounts."""

    def cache_bytes(self, cache: Any) -> int: ...

    def select_rows(self, cache: Any, rows: list) -> None:
        """Keep only these batch rows in the cache (finished sequences leave the batch)."""

    def cache_length(self, cache: Any) -> int:
        """Tokens already in the cache."""

    def trim_cache(self, cache: Any, keep: int) -> None:
        """Drop all but the first `keep` tokens from the cache, exactly, or raise CacheTrimError."""

    def drop_cache_layer(self, cache: Any, layer: int) -> None:
        """Empty one layer's part of a cache nobody needs after the sweep (scoring's scratch caches)."""

    def begin_step(self, tokens: np.ndarray, attention_mask: np.ndarray, cache: Any,
                   all_positions: bool = False, targets: np.ndarray | None = None,
                   attend: np.ndarray | None = None, positions: np.ndarray | None = None) -> Any:
        """Step context for new tokens (B, T) given the mask over past + new tokens (B, past + T);
        all_positions: the head computes logits for every new token, not just the last. cache=None: a
        single sweep that keeps no KV cache. targets (B, T): the head returns (B, T, 2), the log-probability
        of each target and whether it was the argmax, never the whole logits. Nothing here may depend on
        what the cache holds now: a long prompt's chunks all begin before the first runs.
        attend (B, T, past + T) bool and positions (B, T): tree attention (speculative decoding): which
        cached and new tokens each new token sees, and its position, instead of the causal mask and
        consecutive positions (only where tree_attention_problem() is None)."""

    # tree attention (speculative decoding: airmlx/speculative.py)
    def tree_attention_problem(self) -> str | None:
        """Why this model cannot verify a tree of tokens in one step (None when it can)."""

    def keep_cache_positions(self, cache: Any, positions: Any) -> None:
        """Keep only these cache positions (ascending), in this order: a tree's accepted path."""

    def load_stage(self, entry: Any, tensors: dict) -> Any: ...

    def run_stage(self, stage: Any, x: Any, step: Any) -> Any: ...

    def free_stage(self, stage: Any) -> None: ...

    # MoE models whose routed experts are stored apart (airmlx/experts.py)
    def stream_experts(self, layers: list, chunks: Any) -> None:
        """From now on, these layers' MoE blocks get their routed experts from chunks(layer, experts), which
        yields (experts, [loaded expert]) groups that fit the expert cache; the outputs of the groups add up."""

    def load_expert(self, entry: Any, expert: int, tensors: dict) -> tuple:
        """One routed expert's raw tensors -> (loaded expert, bytes it holds)."""

    def free_expert(self, loaded: Any) -> None: ...

    def expert_order(self, entry: Any, expert: int) -> "list | None":
        """The order to lay an expert's tensors out in when it is read (ShardStore.read_part), or None for the
        file's."""
        return None

    def quantized_widening(self, infos: dict, itemsize: int) -> int:
        """Bytes a quantised matrix multiply of this stage makes at each call beyond what the activation bound
        counts (the largest, of one matrix): its scales and biases widened to activations of `itemsize`."""

    def expert_stacking(self, infos: dict) -> float:
        """Bytes a loaded routed expert takes in its group's stacked copy, with any conversion on the way there,
        per byte it holds: 1 where the copy is as the cache holds it, 0 where each expert is computed as held
        (one at a time, nothing stacked)."""
        return 1.0

    def logits(self, x: Any) -> np.ndarray:
        """The head's output as float32 numpy (B, positions, vocab), or (B, positions, 2) when scoring."""

    # requests with caches of their own sharing one batch (the server's engine, airmlx/engine.py)
    def merge_caches(self, caches: list, lengths: list) -> Any:
        """One left-padded batch cache holding every row of `caches` in order (lengths[i]: the tokens each
        row of caches[i] holds), or None when these caches cannot be merged (sliding windows, convolution
        states). The caches given are used up."""

    def extract_cache(self, cache: Any, row: int, length: int) -> Any:
        """One row of a batch cache as a single-row cache holding that row's last `length` tokens (a copy), or
        None for caches that cannot be merged either."""


# where the shards were made from a checkpoint mlx-lm wrote (manifest extra "written_by"), the likely cause
MLX_WRITTEN = ("the checkpoint was written by mlx-lm (mlx-community's), whose modules name or lay out some tensors "
               "otherwise than transformers' (e.g. DeepSeek-V3's attention); run it with backend='mlx', or use the "
               "model's Hugging Face checkpoint with backend='torch'.")


def check_placement(entry: Any, name: str, shape: tuple, expected: tuple | None, framework: str,
                    cause: str = "the checkpoint does not match its config.") -> None:
    """A checkpoint tensor must have a parameter of the same shape in the framework's model."""
    if expected is None:
        raise CheckpointError(f"stage {entry.name}: tensor {name!r} has no place in {framework}; {cause}")
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"stage {entry.name}: tensor {name!r} has shape {tuple(shape)}, the config implies "
                              f"{tuple(expected)}; {cause}")


def check_complete(entry: Any, names, owned, framework: str,
                   cause: str = "config.json does not match the checkpoint (e.g. its attention_bias), or the "
                                "framework's module differs for it.") -> None:
    """A stage's tensors must fill every parameter of the framework's modules it loads (`owned`): one left out
    would run with the module's initial values, silently (mlx-lm's phimoe has attention biases whatever the
    config says)."""
    missing = sorted(set(owned) - set(names))
    if missing:
        raise CheckpointError(f"stage {entry.name}: the checkpoint has no {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                              f"({len(missing)} tensors) that {framework} needs; {cause}")


def available_ram() -> int:
    """MemAvailable on Linux; free physical pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def position_table(arch, config: dict):
    """How many positions a model can run at most: the table of its learned positions (GPT-2, StarCoder:
    Arch.positions) or of its rotary ones, where transformers precomputes them (GPT-J: Arch.bounded_positions);
    None where positions are computed as they come."""
    return config.get("max_position_embeddings") if arch.positions or arch.bounded_positions else None


def check_positions(table, attention_mask, positions=None) -> None:
    """A GenerationError where a step's tokens sit past the model's table of positions (position_table): it would
    be read out of bounds (garbage on MLX, an IndexError in torch). attention_mask: (B, past + T); positions: a
    tree's own."""
    if not table:
        return
    last = int(np.max(positions)) if positions is not None else int(np.max((np.asarray(attention_mask) != 0).sum(-1))) - 1
    if last >= table:
        raise GenerationError(f"position {last} is past the {table} positions this model has embeddings for; "
                              f"keep the prompt and new tokens within {table}.")


def kept_tail(positions) -> tuple:
    """(positions as int64 numpy, how many lead positions are already in place): keep_cache_positions
    rewrites only what follows them."""
    positions = np.asarray(positions, dtype=np.int64)
    moved = np.flatnonzero(positions != np.arange(len(positions)))
    return positions, int(moved[0]) if moved.size else len(positions)


def with_layer_types(config: dict) -> dict:
    """config, with the layer_types transformers' config class derives where config.json lists none (configs
    written before it did: Gemma 2 alternates, Gemma 3 and Command R7B give a sliding_window_pattern), so both
    backends and airmlx.archs.layer_types see what transformers would run."""
    from transformers import CONFIG_MAPPING
    if config.get("layer_types") is not None or config.get("model_type") not in CONFIG_MAPPING:
        return config
    try:
        types = getattr(transformers_config(config), "layer_types", None)
    except CheckpointError as e:
        if config.get("sliding_window"):  # its layers' windows cannot be told: refused, not guessed
            raise CheckpointError(f"{e}, so which layers slide cannot be told; fix config.json.") from None
        return config  # airmlx's own default
    return {**config, "layer_types": list(types)} if types else config
