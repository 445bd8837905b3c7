"""Small file helpers: atomic writes (a reader sees the old file or the new one, never half of
either) and reading a JSON object that the user handed over."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from auditor.errors import InputError


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; an unreadable file or another JSON value is an InputError naming `what`."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not a readable JSON file: {exc}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{what} {path}: expected a JSON object")
    return raw
