"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero), and `warn_once` for
the fallbacks a training run would otherwise report every step."""

import threading
import warnings

_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn the first time `key` is seen in this process; the warning points at the caller's caller."""
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, category, stacklevel=3)


class ChainfreeError(Exception):
    """Base class: the message names the problem and how to fix it."""


class ConfigError(ChainfreeError, ValueError):
    """A bad configuration value, key or combination."""


class DataError(ChainfreeError):
    """Missing or unusable data (corpus package not installed, empty file, sequence longer than data)."""


class CheckpointError(ChainfreeError):
    """A checkpoint that is corrupt or does not match the run's configuration."""
