"""airmlx: run language models far larger than memory by streaming them one layer at a time.

Names load on first use, so `import airmlx` stays light and `python -m airmlx.<tool>` runs each tool's
module once.
"""
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
