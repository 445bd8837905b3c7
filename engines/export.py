"""torch -> ONNX for the CLIP towers (image and text, exported separately, dynamic batch).

The towers are wrapped so that each ONNX graph has one named input ("pixels": float32
(B, 3, S, S), or "tokens": int64 (B, L)) and one output ("embeddings": float32 (B, D), not
normalized). Exports use the TorchScript-based exporter (`dynamo=False`, opset 17), which also
handles SAM's mask decoder; files are written to a temp name and renamed (atomic).
int8: `onnxruntime.quantization.quantize_dynamic`, per-channel QInt8 weights (a CPU engine).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from engines.errors import EngineError

if TYPE_CHECKING:
    import torch

OPSET = 17
OUTPUT_NAME = "embeddings"


def tower(model: torch.nn.Module, which: str) -> torch.nn.Module:
    """A module whose forward is the CLIP model's `encode_image` or `encode_text`."""
    import torch

    encode = {"image": "encode_image", "text": "encode_text"}[which]

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self.model, encode)(x)

    return Tower().eval()


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str) -> Path:
    """Export `module(example)` to `path` with a dynamic batch axis; returns `path`."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # nn.MultiheadAttention's inference fast path is one fused op the exporter cannot translate.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # The TorchScript exporter warns about every traced Python branch; the parity check that
        # follows each export is what decides whether the graph is right.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=[input_name],
                output_names=[OUTPUT_NAME],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise EngineError(f"ONNX export to {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    return path


def quantize_int8(source: Path, path: Path) -> Path:
    """Per-channel QInt8 dynamic quantization of an fp32 ONNX model (for CPU execution)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise EngineError(
            "int8 needs onnxruntime's quantization tools", hint="pip install onnxruntime"
        ) from exc
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        quantize_dynamic(str(source), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
