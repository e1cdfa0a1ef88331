"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""


class ChainfreeError(Exception):
    """Base class: the message names the problem and how to fix it."""


class ConfigError(ChainfreeError, ValueError):
    """A bad configuration value, key or combination."""


class DataError(ChainfreeError):
    """Missing or unusable data (corpus package not installed, empty file, sequence longer than data)."""


class CheckpointError(ChainfreeError):
    """A checkpoint that is corrupt or does not match the run's configuration."""
