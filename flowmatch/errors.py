"""User-facing errors.

Every error that a user can cause (bad config, bad checkpoint, bad run directory, a diverging run)
is a :class:`FlowmatchError`. The CLI prints its message as one line and exits non-zero; library
callers can catch the subclasses.
"""

from __future__ import annotations

__all__ = [
    "FlowmatchError",
    "ConfigError",
    "CheckpointError",
    "RunDirError",
    "ConfigMismatchError",
    "NonFiniteLossError",
    "UnknownNameError",
    "DatasetError",
]


class FlowmatchError(Exception):
    """Base class of every error a user can cause."""


class ConfigError(FlowmatchError, ValueError):
    """A config key, type or value is wrong."""


class UnknownNameError(FlowmatchError, KeyError):
    """A registry lookup (solver, path, coupling, dataset, ...) found no such name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(FlowmatchError):
    """A checkpoint is missing, truncated, foreign or of another format version."""


class DatasetError(FlowmatchError):
    """A dataset's files are missing, truncated or corrupt, or an optional library it needs is absent."""


class RunDirError(FlowmatchError):
    """An output directory cannot be used (holds another run, or no run to resume)."""


class ConfigMismatchError(RunDirError):
    """A run on disk was made with another config than the one given to resume it."""


class NonFiniteLossError(FlowmatchError, FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float, checkpoint: str | None = None, player: str | None = None):
        self.step = step
        self.value = value
        self.checkpoint = checkpoint
        self.player = player  # the player whose loss it was, for objectives with several (else None)
        kept = f"; last good checkpoint kept at {checkpoint}" if checkpoint else "; no checkpoint had been written yet"
        of = f" of player {player}" if player else ""
        super().__init__(f"non-finite loss ({value}){of} at step {step}{kept}")
