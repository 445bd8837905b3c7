"""torch -> ONNX for the CLIP towers and SAM's encoder and decoder (dynamic batch axis).

The CLIP towers are wrapped so that each ONNX graph has one named input ("pixels": float32
(B, 3, S, S), or "tokens": int64 (B, L)) and one output ("embeddings": float32 (B, D), not
normalized). SAM is split the way segment-anything splits it: the expensive image encoder
("pixels" -> "embeddings") and the cheap prompt + mask decoder (see `sam_decoder`). Exports use
the TorchScript-based exporter (`dynamo=False`, opset 17), the one that handles SAM's mask
decoder; files are written to a temp name and renamed (atomic).
fp16 (GPU engines): the fp32 graph converted with inputs and outputs kept fp32.
TensorRT: an engine built from the fp32 ONNX graph (optionally with fp16 kernels) with one
optimization profile over the batch axis.
int8: `onnxruntime.quantization.quantize_dynamic`, per-channel QInt8 weights of the MatMul and
Gemm nodes (a CPU engine). The patch-embedding convolution stays fp32: ORT's ConvInteger kernel
was 4x slower than its fp32 Conv on ViT-B-32 and made the int8 tower less accurate.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.errors import EngineError
from engines.runners import import_tensorrt

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


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    input_name: str | tuple[str, ...],
    output_names: tuple[str, ...] = (OUTPUT_NAME,),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export `module(*example)` to `path`; returns `path`.

    `dynamic_axes` defaults to a dynamic batch axis (axis 0) on every input and output.
    """
    import torch

    examples = example if isinstance(example, tuple) else (example,)
    input_names = input_name if isinstance(input_name, tuple) else (input_name,)
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
                examples,
                str(tmp),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes or {name: {0: "batch"} for name in (*input_names, *output_names)},
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
    # The quantizer logs a "consider pre-processing" warning on the root logger for every graph.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source),
            str(tmp),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
        os.replace(tmp, path)
    finally:
        logging.disable(logging.NOTSET)
        tmp.unlink(missing_ok=True)
    return path


def convert_fp16(source: Path, path: Path) -> Path:
    """fp16 weights and arithmetic, fp32 inputs and outputs (for CUDA / TensorRT providers).

    ONNX Runtime 1.32's CPU provider crashes the process loading such a graph, so callers must
    only open it on a GPU provider (`engines.runners.require_gpu_provider`).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


SAM_DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels")
SAM_DECODER_OUTPUTS = ("masks", "iou_predictions")
# One image's embeddings; any number of prompts of any number of points.
SAM_DECODER_AXES = {
    "point_coords": {0: "prompts", 1: "points"},
    "point_labels": {0: "prompts", 1: "points"},
    "masks": {0: "prompts"},
    "iou_predictions": {0: "prompts"},
}


def sam_encoder(sam: Any) -> torch.nn.Module:
    """SAM's image encoder alone: float32 (B, 3, S, S) normalized, padded pixels -> (B, C, h, w)."""
    return sam.image_encoder.eval()


def sam_decoder(sam: Any) -> torch.nn.Module:
    """SAM's prompt encoder + mask decoder for point prompts, as one exportable module.

    Inputs: image_embeddings float32 (1, C, h, w); point_coords float32 (B, N, 2) in the encoder's
    input frame (pixels of the S x S padded image); point_labels float32 (B, N): 1 foreground,
    0 background, -1 padding. Outputs: masks float32 (B, 3, 4h, 4w) low-resolution mask logits and
    iou_predictions float32 (B, 3), SAM's three multimask outputs for each of the B prompts.

    The point embedding is computed here rather than by `PromptEncoder.forward`, whose boolean
    in-place indexing does not trace; the arithmetic is the same (tested against it).
    """
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # segment-anything is untyped; its modules are used through Any.
            self.prompts: Any = sam.prompt_encoder
            self.decoder: Any = sam.mask_decoder

        def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # Like SAM without a box prompt: one padding point (label -1) after the given ones.
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
            size = torch.tensor(self.prompts.input_image_size, dtype=coords.dtype)
            encoded = self.prompts.pe_layer._pe_encoding((coords + 0.5) / size.flip(0))
            labels = labels.unsqueeze(-1)
            encoded = encoded * (labels != -1)
            encoded = encoded + self.prompts.not_a_point_embed.weight * (labels == -1)
            for value, embedding in enumerate(self.prompts.point_embeddings[:2]):
                encoded = encoded + embedding.weight * (labels == value)
            return encoded

        def forward(
            self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            sparse = self.embed_points(point_coords, point_labels)
            height, width = self.prompts.image_embedding_size
            dense = self.prompts.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                sparse.shape[0], -1, height, width
            )
            masks, iou = self.decoder(
                image_embeddings=image_embeddings,
                image_pe=self.prompts.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            return masks, iou

    return Decoder().eval()


Shape = tuple[int, ...]


def tensorrt_profile(input_shape: Sequence[int], batches: Sequence[int]) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) shapes of an input whose axis 0 is the batch (-1) and the rest static.

    The engine accepts any batch from 1 to max(batches) and is tuned for the largest; bigger
    batches are split by the runner.
    """
    if not batches or min(batches) < 1:
        raise EngineError(f"TensorRT batch sizes must be >= 1, got {list(batches)}")
    rest = tuple(int(d) for d in input_shape[1:])
    if any(d < 1 for d in rest):
        raise EngineError(
            f"TensorRT profile: only the batch axis may be dynamic, input shape is {tuple(input_shape)}"
        )
    largest = max(batches)
    return (1, *rest), (largest, *rest), (largest, *rest)


def sam_decoder_profile(
    embeddings_shape: Sequence[int], prompts: int = 64, points: int = 1
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes of SAM's decoder graph: one image's embeddings, 1..`prompts` prompts
    of 1..`points` points each (the automatic mask generator sends batches of 64 single points)."""
    embeddings = tuple(int(d) for d in embeddings_shape)
    return {
        "image_embeddings": (embeddings, embeddings, embeddings),
        "point_coords": ((1, 1, 2), (prompts, 1, 2), (prompts, points, 2)),
        "point_labels": ((1, 1), (prompts, 1), (prompts, points)),
    }


def build_tensorrt_engine(
    onnx_path: Path,
    path: Path,
    fp16: bool,
    batches: Sequence[int] = (1, 64),
    workspace_gib: int = 4,
    shapes: dict[str, tuple[Shape, Shape, Shape]] | None = None,
) -> Path:
    """Parse `onnx_path`, build a serialized TensorRT engine and write it to `path` (atomic).

    Each input's profile is `shapes[name]` where given, else its batch axis from 1 to
    max(`batches`) (`tensorrt_profile`).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        bounds = (shapes or {}).get(tensor.name) or tensorrt_profile(tuple(tensor.shape), batches)
        profile.set_shape(tensor.name, *bounds)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
