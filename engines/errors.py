"""Errors raised by the engines package (which never imports `auditor`).

`auditor.cli` maps every `EngineError` to exit code 3 (environment / engine failure).
"""

from __future__ import annotations


class EngineError(Exception):
    """A runtime is unavailable, an engine failed to build, or parity failed."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
