"""Draft models for speculative decoding: the quantised copy of a model, budgeting a draft, checking it
speaks the same tokens (auto.load_draft loads one).

A draft is an ordinary AirModel kept resident: a smaller model of the same family (a path or hub id), an
AirModel you already hold, or "4bit" / "8bit": a quantised copy of the model itself, sharded once from the
checkpoint the model's shard folder was made from, into a folder of its own beside it.
"""
from pathlib import Path

from .errors import BudgetError, CheckpointError, DraftModelError
from .manifest import Manifest
from .units import format_bytes


def quantised_copy(shard_dir: Path, compression, progress: bool = True, out=None) -> Path:
    """The shard folder of `compression` made from the checkpoint (or GGUF file) shard_dir was made from (once):
    `out`, or a folder beside shard_dir named after the compression."""
    from .quant import compression_name
    from .sharder import shard_checkpoint
    manifest = Manifest.load(shard_dir)
    src = manifest.extra.get("source_path")
    name = compression_name(compression)
    weights = [Path(src) / f["name"] for f in manifest.source.get("files", [])] if src and Path(src).is_dir() else []
    if not src or not (Path(src).is_dir() or Path(src).suffix == ".gguf" and Path(src).is_file()) or \
            not all(w.is_file() for w in weights):
        gone = "whose weights are gone (delete_original=True deletes them)" if src and weights else "which is gone"
        raise CheckpointError(f"{name} is quantised from the checkpoint {shard_dir} was made from "
                              f"({src or 'not recorded'}), {gone}; shard the model again from its checkpoint "
                              f"(with compression {name!r}), or, for a draft, pass draft_model=PATH of a smaller "
                              "model.")
    out = Path(out) if out else shard_dir.parent / f"{shard_dir.name}-{name}"
    return Path(shard_checkpoint(src, out, compression=compression, progress=progress))  # a GGUF file too


def draft_share(draft, budget: int, minimum: int) -> int:
    """The bytes a draft takes out of the target's memory budget; a BudgetError when the rest is too small."""
    need = draft.plan.total_bytes
    if budget - need < minimum:
        raise BudgetError(f"the draft model holds {format_bytes(need)}, which leaves "
                          f"{format_bytes(max(budget - need, 0))} of memory_budget {format_bytes(budget)} for the "
                          f"model, below its minimum of {format_bytes(minimum)}; raise memory_budget to at least "
                          f"{need + minimum} or use a smaller draft.")
    return need


def check_same_vocabulary(target, draft) -> None:
    """A draft must map text to the same token ids as the model it drafts for."""
    if draft is target:
        raise DraftModelError("the draft model is the model itself; use a smaller model or draft_model='4bit'.")
    ours, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise DraftModelError(f"the draft model {draft.shard_dir} has another tokenizer than {target.shard_dir} "
                              f"({len(theirs)} tokens against {len(ours)}, {differ} entries differ); use a draft "
                              "of the same family and tokenizer, or draft_model='4bit'.")
    rows, needed = draft.config.get("vocab_size"), target.config.get("vocab_size")
    if isinstance(rows, int) and isinstance(needed, int) and rows < needed:
        raise DraftModelError(f"the draft model {draft.shard_dir} embeds {rows} token ids, fewer than the {needed} "
                              f"{target.shard_dir} may give it (its tokenizer is the same, its vocab_size smaller); "
                              "use a draft with the whole vocabulary, or draft_model='4bit'.")
