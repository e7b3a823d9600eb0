"""Errors that mean "the user's input is wrong", as opposed to a bug.

Entry points catch `UserError` and print `dist-mtl: error: <message>` with exit code 2; anything else
is a bug and keeps its traceback. Each message names the field, file or line and what would be valid.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, data file, checkpoint, run directory): a one-line message, exit code 2."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the dotted path."""


class DataError(UserError, ValueError):
    """A data file (annotation, image, shard, manifest) is missing or malformed; names the file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is unreadable or does not fit the configured run."""


class RunDirError(UserError):
    """The run directory cannot be used as asked (not writable, already holds a run, ...)."""


class TrainingFailed(RuntimeError):
    """The run could not produce a useful model (e.g. most steps skipped): exit code 1, not 2."""
