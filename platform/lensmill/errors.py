"""lensmill's error types. ``LensmillError`` and its subclasses are the user's mistakes (a config
typo, an unreachable URI, a missing or corrupt dataset, a model name that does not exist): the
message names the file, field or URI, and the CLI prints it on one line (exit code 2). Anything else
that escapes a stage is a bug in lensmill and keeps its traceback (exit code 1).

Each subclass also derives from the built-in type callers caught before it existed (``ValueError``,
``OSError``), so ``except ValueError`` around a config load still works.
"""

from __future__ import annotations


class LensmillError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(LensmillError, ValueError):
    """A config file or override that cannot be used; the message names what was wrong."""


class StorageError(LensmillError, OSError):
    """A URI that cannot be reached, read or written; the message names the URI."""


class DatasetError(LensmillError, ValueError):
    """A dataset that is incomplete, inconsistent or asked for something it does not hold."""


class RecordError(LensmillError, ValueError):
    """A stored record (manifest, run summary, ensemble.json, ...) that cannot be read; names the
    URI and the field."""


class TrackingError(LensmillError):
    """MLflow could not be reached or has no such model; the message says which URI."""


class ModelError(LensmillError, ValueError):
    """An unknown architecture, or weights that do not fit it; names the model or the file."""
