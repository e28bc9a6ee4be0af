"""airmlx: run language models far larger than memory by streaming them one layer at a time.

Names load on first use, so `import airmlx` stays light and `python -m airmlx.<tool>` runs each tool's
module once.
"""
import importlib

__version__ = "0.1.0"
_ERRORS = ["AirmlxError", "ModelNotFoundError", "UnsupportedArchitectureError", "CheckpointError", "CorruptShardError",
           "InsufficientDiskSpaceError", "BudgetError", "BackendError", "OptionError", "GenerationError",
           "CacheTrimError", "ModelClosedError", "DraftModelError"]
_EXPORTS = {"AutoModel": ".auto", "AirModel": ".model", "shard_checkpoint": ".sharder", "DEMO_MODEL": ".hub",
            "ChatSession": ".session", **dict.fromkeys(_ERRORS, ".errors")}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'airmlx' has no attribute {name!r}")
