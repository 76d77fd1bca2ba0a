"""Typed errors. The library raises these; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class FunnelQAError(Exception):
    """Base of every error the CLI reports as one friendly line."""

    exit_code = 1


class InputError(FunnelQAError):
    """A record in an input file is malformed, incomplete or duplicated."""

    exit_code = 2

    def __init__(self, source: str, line: int | None, message: str):
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


class UsageError(FunnelQAError):
    """Options that cannot work together, or a spec that names nothing we know."""

    exit_code = 2


class BackendUnavailable(FunnelQAError):
    """A backend cannot start: a package, key, file or server is missing. The message says how to fix it."""

    exit_code = 3


class BackendError(FunnelQAError):
    """A backend started but a call failed for good (after its retries)."""

    exit_code = 4


class OutputInUse(FunnelQAError):
    """Another process is writing the same ``--out`` file."""

    exit_code = 5
