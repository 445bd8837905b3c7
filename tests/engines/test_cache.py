"""The engine cache: miss builds, hit reuses, a corrupt or stale entry is rebuilt, never used."""

from __future__ import annotations

import json
from pathlib import Path

from engines.cache import MANIFEST, EngineCache, EngineKey


def _key(**changes) -> EngineKey:
    fields = dict(
        checkpoint_sha256="ab" * 32,
        arch="tiny",
        arch_config_sha256="cd" * 32,
        precision="fp32",
        runtime="onnxruntime",
        versions=(("onnxruntime", "1.0"), ("torch", "2.0")),
    )
    fields.update(changes)
    return EngineKey(**fields)


class Builder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: Path) -> dict[str, Path]:
        self.calls += 1
        path = folder / "image.onnx"
        path.write_bytes(b"engine-%d" % self.calls)
        return {"image": path}


def test_miss_then_hit(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    files, hit = cache.get_or_build(_key(), build)
    assert not hit and build.calls == 1 and files["image"].read_bytes() == b"engine-1"
    files, hit = cache.get_or_build(_key(), build)
    assert hit and build.calls == 1 and files["image"].read_bytes() == b"engine-1"
    assert not list(tmp_path.glob(".*building*"))


def test_corrupt_engine_is_rebuilt(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    files, _ = cache.get_or_build(_key(), build)
    files["image"].write_bytes(b"tampered")
    files, hit = cache.get_or_build(_key(), build)
    assert not hit and build.calls == 2 and files["image"].read_bytes() == b"engine-2"


def test_missing_or_foreign_manifest_is_rebuilt(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    files, _ = cache.get_or_build(_key(), build)
    (files["image"].parent / MANIFEST).unlink()
    assert cache.get_or_build(_key(), build)[1] is False and build.calls == 2
    manifest = files["image"].parent / MANIFEST
    raw = json.loads(manifest.read_text())
    raw["key"]["precision"] = "int8"
    manifest.write_text(json.dumps(raw))
    assert cache.get_or_build(_key(), build)[1] is False and build.calls == 3


def test_any_key_change_is_a_different_entry(tmp_path):
    cache, build = EngineCache(tmp_path), Builder()
    cache.get_or_build(_key(), build)
    for change in ({"checkpoint_sha256": "ef" * 32}, {"precision": "int8"}, {"versions": (("torch", "9"),)}):
        assert cache.get_or_build(_key(**change), build)[1] is False
    assert build.calls == 4
