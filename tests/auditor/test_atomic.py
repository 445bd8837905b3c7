"""Atomic outputs: a write interrupted half-way leaves the old file (or none), never a torn one.

Each test lets the real writer start, makes it write half of its bytes and then raises
KeyboardInterrupt (what Ctrl-C does mid-write), and checks what is left on disk. Writing
straight to the destination would leave half a file there and fail these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auditor.files import atomic_write
from auditor.models import load_model, save_checkpoint
from engines.cache import EngineCache, EngineKey
from engines.export import export_onnx


def _half_then_interrupt(path: str | Path, data: bytes = b"x" * 4096) -> None:
    Path(path).write_bytes(data[: len(data) // 2])
    raise KeyboardInterrupt


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_report_write_interrupted_keeps_the_old_report(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    atomic_write(report, b'{"verdict": "clean"}')

    def torn_fsync(fd: int) -> None:  # the new bytes are in the temp file, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr("auditor.files.os.fsync", torn_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(report, b'{"verdict": "backdoor", "victims": [' + b"1," * 5000 + b"]}")
    assert report.read_bytes() == b'{"verdict": "clean"}'
    assert _only(tmp_path) == ["report.json"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", b"{}")
    assert _only(tmp_path) == ["report.json"]  # none, rather than a torn new file


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_checkpoint_write_interrupted_keeps_the_old_checkpoint(
    random_model, random_checkpoint, tiny_arch, tmp_path, monkeypatch, fmt
):
    target = tmp_path / ("repaired.safetensors" if fmt == "safetensors" else "repaired.pt")
    save_checkpoint(random_model, target, checkpoint_format=fmt)
    before = target.read_bytes()
    if fmt == "safetensors":
        monkeypatch.setattr(
            "safetensors.torch.save_file", lambda state, path: _half_then_interrupt(path, before)
        )
    else:
        monkeypatch.setattr(torch, "save", lambda obj, path: _half_then_interrupt(path, before))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(random_model, target, checkpoint_format=fmt)
    assert target.read_bytes() == before
    assert _only(tmp_path) == [target.name]
    monkeypatch.undo()
    load_model(target, tiny_arch)  # still a whole checkpoint


def test_onnx_export_interrupted_keeps_the_old_engine(tmp_path, monkeypatch):
    layer = torch.nn.Linear(4, 2).eval()
    engine = export_onnx(layer, torch.zeros(1, 4), tmp_path / "image.onnx", "pixels")
    before = engine.read_bytes()
    monkeypatch.setattr(
        torch.onnx, "export", lambda module, args, path, **kw: _half_then_interrupt(path, before)
    )
    with pytest.raises(KeyboardInterrupt):
        export_onnx(layer, torch.zeros(1, 4), engine, "pixels")
    assert engine.read_bytes() == before
    assert _only(tmp_path) == ["image.onnx"]


def test_engine_cache_build_interrupted_leaves_no_entry(tmp_path):
    key = EngineKey("0" * 64, "tiny", "1" * 64, "fp32", "onnxruntime", (("onnx", "1"),))
    cache = EngineCache(tmp_path)

    def build(folder: Path) -> dict[str, Path]:
        _half_then_interrupt(folder / "image.onnx")
        return {}

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build(key, build)
    assert list(tmp_path.iterdir()) == []
    assert cache.lookup(key) is None
