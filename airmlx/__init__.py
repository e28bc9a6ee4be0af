"""airmlx: run language models far larger than memory by streaming them one layer at a time.

Names load on first use, so `import airmlx` stays light and `python -m airmlx.<tool>` runs each tool's
module once.
"""
import ctypes
import importlib
import os

# torch's OpenMP threads spin while they wait for work. Where anything else wants those cores (our prefetch
# thread, a draft model, another process) the spinning takes its time: on a busy 2-core machine a 4-bit
# draft call took 40-650 ms instead of 7 ms, and generate ran 5x slower (BENCHMARKS.md, thirteenth stop).
# It only takes effect when torch is imported after airmlx; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch on CPUs with AVX-512 runs bf16 matmuls through oneDNN, which keeps each shape's kernel (about 0.5 MB)
# in two caches of 1024 each (ideep's and oneDNN's): a MoE prefill, whose experts see many row counts, held
# hundreds of MB beyond the budget. 32 each bounds them near 18 MB; a kernel not kept is rebuilt in 0.3-1.2 ms
# (scripts/measure_cpu_costs.py).
# Read at torch's first such matmul; a value the user set is kept.
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")

MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves allocations this large from mappings of their own


def uses_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not glibc
        return False


def keep_freed_memory_out_of_the_heap() -> None:
    """glibc raises its mmap threshold to the size of each mapped allocation that is freed (up to 32 MB), so
    the next ones of that size come from the heap and stay in the process once freed: a read buffer, a
    conversion's source or a dequantised block the plan counts as gone. A fixed threshold stops that rise; at
    4 MiB SmolLM2's process on torch still peaked tens of MB higher in some runs than others, at 1 MiB it does
    not (README, "Freed memory"). A value the user set (MALLOC_MMAP_THRESHOLD_) is kept."""
    if not uses_glibc() or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


keep_freed_memory_out_of_the_heap()

__version__ = "0.1.0"
_ERRORS = ["AirmlxError", "ModelNotFoundError", "UnsupportedArchitectureError", "CheckpointError", "CorruptShardError",
           "InsufficientDiskSpaceError", "BudgetError", "BackendError", "OptionError", "GenerationError",
           "ScoreRequestError", "CacheTrimError", "ModelClosedError", "DraftModelError"]
_EXPORTS = {"AutoModel": ".auto", "AirModel": ".model", "shard_checkpoint": ".sharder", "DEMO_MODEL": ".hub",
            "ChatSession": ".session", **dict.fromkeys(_ERRORS, ".errors"), "GGUFError": ".gguf"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'airmlx' has no attribute {name!r}")
