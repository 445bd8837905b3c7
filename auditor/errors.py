"""Errors the library raises, each carrying the exit code the CLI maps it to.

The library never exits; `auditor.cli.main` turns these into one-line messages and exit codes
(DESIGN §2): 2 input/usage, 3 environment, 4 internal. Exit 1 is reserved for findings.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InputError(AuditError):
    """Bad path, bad checkpoint, arch mismatch, empty or unusable data (exit 2)."""

    exit_code = 2


class CheckpointError(InputError):
    """The checkpoint cannot be read safely or does not fit the architecture."""


class DataError(InputError):
    """The data set is missing, empty, or has too few classes."""


class EnvironmentProblem(AuditError):
    """A missing optional dependency or an unavailable runtime (exit 3)."""

    exit_code = 3


def missing_extra(module: str, extra: str) -> EnvironmentProblem:
    """The error for an optional dependency that is not installed."""
    return EnvironmentProblem(
        f"the optional dependency '{module}' is not installed",
        hint=f"pip install 'clip-audit[{extra}]'",
    )
