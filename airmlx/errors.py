"""Every failure a user can cause raises one of these, with a message that names the thing and the fix."""


class AirmlxError(Exception):
    """Base class of airmlx's own errors."""


class ModelNotFoundError(AirmlxError, FileNotFoundError):
    """The model path or hub id could not be found or downloaded."""


class UnsupportedArchitectureError(AirmlxError, ValueError):
    """The checkpoint's model_type has no registry entry."""


class CheckpointError(AirmlxError, ValueError):
    """The source checkpoint is incomplete, inconsistent or in a format that needs an opt-in."""


class CorruptShardError(AirmlxError):
    """A shard folder or stage file is unfinished, truncated or does not match its manifest."""


class InsufficientDiskSpaceError(AirmlxError, OSError):
    """Sharding needs more free disk space than the output folder has."""


class BudgetError(AirmlxError, ValueError):
    """memory_budget is malformed or too small to run the model."""


class BackendError(AirmlxError, RuntimeError):
    """The requested backend or device is unknown or unavailable."""


class OptionError(AirmlxError, ValueError):
    """An option has a value outside its allowed set (compression, ...)."""


class GenerationError(AirmlxError, ValueError):
    """Invalid generation inputs: empty prompt, bad sampling values, prompt too long."""


class ScoreRequestError(GenerationError):
    """One of several requests (score()'s) is invalid: `number` is its index, `problem` the rest of the message."""

    def __init__(self, number: int, problem: str):
        super().__init__(f"request {number}{problem}")
        self.number, self.problem = number, problem


class CacheTrimError(GenerationError):
    """A KV cache cannot be rolled back that far exactly (its sliding-window layers no longer hold the tokens)."""


class ModelClosedError(AirmlxError, RuntimeError):
    """The model was used after (or closed during) close()."""


class DraftModelError(AirmlxError, ValueError):
    """A draft model for speculative decoding does not fit the model it drafts for (another tokenizer)."""
