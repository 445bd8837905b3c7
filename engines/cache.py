"""Built engines live outside the source tree, keyed by what they were built from.

Key: checkpoint SHA-256 + architecture (name and a hash of its config) + precision + runtime
versions (torch, onnx, onnxruntime). Each entry is a folder named by the key's digest holding the
engine files and `manifest.json` (the key, and each file's SHA-256). An entry whose manifest is
missing, unreadable, for another key, or whose files do not match their hashes is *stale or
corrupt*: it is deleted and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """$CLIP_AUDIT_ENGINE_DIR, else $XDG_CACHE_HOME/clip-audit/engines, else ~/.cache/…"""
    if os.environ.get("CLIP_AUDIT_ENGINE_DIR"):
        return Path(os.environ["CLIP_AUDIT_ENGINE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clip-audit" / "engines"


def runtime_versions(runtime: str = "onnx") -> dict[str, str]:
    """Versions of the libraries an engine depends on (absent ones as 'absent').

    A TensorRT engine is only valid for the TensorRT version that built it.
    """
    versions = {}
    modules = ("torch", "onnx", "onnxruntime") + (("tensorrt",) if runtime == "tensorrt" else ())
    for module in modules:
        try:
            versions[module] = str(__import__(module).__version__)
        except ImportError:
            versions[module] = "absent"
    return versions


@dataclass(frozen=True)
class EngineKey:
    checkpoint_sha256: str
    arch: str
    arch_config_sha256: str
    precision: str
    runtime: str  # "onnxruntime" | "tensorrt"
    versions: tuple[tuple[str, str], ...]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


# (path, inode, size, mtime in ns) -> SHA-256, for this process: a scan looks the fp32 engines up
# two or three times (as the source of int8, for the evidence runner), each a ~0.6 GB read for
# ViT-B-32. Writing a file changes its mtime, and replacing it its inode, so a changed file is
# hashed again.
_HASHED: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


class EngineCache:
    """get_or_build(key, build) -> (files by name, whether it was a cache hit)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache_dir()

    def folder(self, key: EngineKey) -> Path:
        return self.root / key.digest()

    def lookup(self, key: EngineKey) -> dict[str, Path] | None:
        """The entry's files if it is intact and for this key; a bad entry is removed."""
        folder = self.folder(key)
        if not folder.exists():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest["key"] != json.loads(json.dumps(asdict(key))):
                raise ValueError("manifest is for another key")
            files = {name: folder / entry["file"] for name, entry in manifest["files"].items()}
            for name, entry in manifest["files"].items():
                if file_sha256(files[name]) != entry["sha256"]:
                    raise ValueError(f"{entry['file']} does not match its recorded hash")
            return files
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def get_or_build(
        self, key: EngineKey, build: Callable[[Path], dict[str, Path]]
    ) -> tuple[dict[str, Path], bool]:
        """Return the cached files, or build them into a fresh folder and record a manifest.

        `build(folder)` writes the engine files into `folder` and returns them by name.
        """
        found = self.lookup(key)
        if found is not None:
            return found, True
        folder = self.folder(key)
        staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            files = build(staging)
            manifest = {
                "key": asdict(key),
                "files": {n: {"file": p.name, "sha256": file_sha256(p)} for n, p in files.items()},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)  # the entry appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {name: folder / path.name for name, path in files.items()}, False
