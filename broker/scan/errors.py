"""Errors of the scanner.

Both derive from :class:`broker.errors.BrokerError`; an invalid configuration file raises the shared
:class:`broker.errors.ConfigError` instead, with the key path of every problem::

    BrokerError
    └── ScanError          a scan could not run (git failed, an input could not be read)
        ├── UsageError     the command line asks for something impossible
        └── Skipped        one file was not scanned (binary, too large, unreadable, a symlink)

The CLI maps every one of them to exit code 2, except :class:`Skipped`, which the engine counts and
reports on stderr: skipping a binary or a symlink is the expected outcome for such a file.
"""

from __future__ import annotations

from broker.errors import BrokerError


class ScanError(BrokerError):
    """A scan could not run to completion."""


class UsageError(ScanError):
    """The options contradict each other or name something that does not exist."""


class Skipped(ScanError):
    """A file was not scanned; ``reason`` is binary, too-large, unreadable, symlink or special."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
