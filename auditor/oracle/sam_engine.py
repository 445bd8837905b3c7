"""SAM's oracle on engines: the exported encoder and decoder inside the automatic mask generator.

segment-anything's automatic mask generator asks its predictor for two things: the embedding of
an image (`set_torch_image`, the expensive ViT) and masks for a batch of point prompts
(`predict_torch`). `EngineSamPredictor` answers both from the ONNX graphs that
`engines.export` writes, and leaves everything else (the point grid, the quality and stability
filters, NMS) to segment-anything's own code, so the two oracles differ only in their networks.

The one change of arithmetic: SAM upsamples each 256x256 low-resolution mask to 1024x1024,
crops the padding and resizes to the image (two bilinear resizes, ~4 M values per mask, about a
fifth of the PyTorch oracle's time on a 224-px image). Bilinear resizing is linear and separable,
so the same result is one (H, 256) and one (256, W) matrix product (`resize_matrix`), equal up
to float rounding.

Checks (`EngineError`, exit 3, with the numbers):
- when a graph pair is built: masks of PyTorch SAM and of the engines on the same probe images
  and prompt grid, with the generator's filters relaxed so that every prompt's masks count
  (`mask_parity`): mean mask IoU >= 0.95 and the same number of segments after tidying, +-5 %;
  the numbers are stored beside the graphs (`parity.json`, hashed in the cache's manifest);
- whenever they are opened: the encoder's and decoder's tensors against PyTorch on one image
  (`check_sam_engines`, fp32 parity as for the CLIP towers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from auditor.oracle import tidy_segments
from auditor.runtime import Engines

if TYPE_CHECKING:
    from engines.cache import EngineKey

MIN_MASK_IOU = 0.95
MAX_SEGMENT_COUNT_CHANGE = 0.05
PARITY_POINTS_PER_SIDE = 8  # the build-time mask check's prompt grid (64 prompts per image)


def resize_matrix(low: int, padded: int, valid: int, size: int) -> Any:
    """float32 tensor (size, low): bilinear low -> padded, keep the first `valid`, bilinear valid -> size.

    One axis of `Sam.postprocess_masks` (align_corners=False both times, as there), as a matrix:
    `rows @ mask @ cols.T` equals that function on a (low, low) mask up to float rounding. Made
    with torch's own interpolation of unit signals, so its rounding is SAM's (within 1e-6; the
    numpy `fastsam_engine.linear_resize` product differs by up to 1e-5).
    """
    import torch
    import torch.nn.functional as F

    basis = torch.eye(low)[:, None, :]  # (low, 1, low): each row is one unit signal
    upsampled = F.interpolate(basis, size=padded, mode="linear", align_corners=False)[..., :valid]
    resized = F.interpolate(upsampled, size=size, mode="linear", align_corners=False)
    return resized[:, 0, :].T.contiguous()


def _sam_predictor_class() -> Any:
    try:
        from segment_anything import SamPredictor
    except ImportError as exc:
        from auditor.errors import missing_extra

        raise missing_extra("segment_anything", "sam") from exc
    return SamPredictor


def engine_predictor(model: Any, encoder: Any, decoder: Any) -> Any:
    """A `SamPredictor` for `model` whose networks are the active runners `encoder`, `decoder`.

    encoder: "pixels" float32 (1, 3, S, S) normalized and padded -> "embeddings" (1, C, h, w).
    decoder: "image_embeddings", "point_coords" (B, N, 2), "point_labels" (B, N) -> "masks"
    float32 (B, 3, 4h, 4w) logits and "iou_predictions" (B, 3) (see `engines.export.sam_decoder`).
    Only what the automatic mask generator asks for is answered: point prompts, three masks each.
    """
    import torch

    class EngineSamPredictor(_sam_predictor_class()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(model)
            self.encoder, self.decoder = encoder, decoder

        def set_torch_image(
            self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
        ) -> None:
            self.reset_image()
            self.original_size = tuple(original_image_size)
            self.input_size = tuple(transformed_image.shape[-2:])
            pixels = self.model.preprocess(transformed_image.float()).numpy()
            self.features = torch.from_numpy(self.encoder.infer({"pixels": pixels})["embeddings"])
            low = 4 * self.features.shape[-1]
            padded = self.model.image_encoder.img_size
            self.rows = resize_matrix(low, padded, self.input_size[0], self.original_size[0])
            self.cols = resize_matrix(low, padded, self.input_size[1], self.original_size[1])
            self.is_image_set = True

        def predict_torch(
            self,
            point_coords: torch.Tensor | None,
            point_labels: torch.Tensor | None,
            boxes: torch.Tensor | None = None,
            mask_input: torch.Tensor | None = None,
            multimask_output: bool = True,
            return_logits: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if not self.is_image_set:
                raise RuntimeError("set an image before predicting masks")
            if point_coords is None or point_labels is None or boxes is not None or mask_input is not None:
                raise NotImplementedError("the engine predictor answers point prompts only")
            if not multimask_output:
                raise NotImplementedError("the engine predictor returns SAM's three masks per prompt")
            outputs = self.decoder.infer(
                {
                    "image_embeddings": self.features.numpy(),
                    "point_coords": point_coords.float().numpy(),
                    "point_labels": point_labels.float().numpy(),
                }
            )
            low_res = torch.from_numpy(outputs["masks"])
            masks = self.rows @ low_res @ self.cols.T  # (B, 3, H, W) at the image's own size
            if not return_logits:
                masks = masks > self.model.mask_threshold
            return masks, torch.from_numpy(outputs["iou_predictions"]), low_res

    return EngineSamPredictor()


@dataclass(frozen=True)
class MaskParity:
    """PyTorch SAM against the engines on the same images and prompts."""

    mean_mask_iou: float  # over every prompt's three binary masks at the image's size
    torch_segments: int  # after `tidy_segments`, summed over the probe images
    engine_segments: int
    images: int
    prompts: int

    def passes(self) -> bool:
        allowed = MAX_SEGMENT_COUNT_CHANGE * self.torch_segments
        return (
            self.mean_mask_iou >= MIN_MASK_IOU and abs(self.engine_segments - self.torch_segments) <= allowed
        )


class _Recorder:
    """Wraps a predictor and keeps every binary mask it hands to the generator (in call order)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.masks: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_torch(self, *args: Any, **kwargs: Any) -> Any:
        masks, iou, low_res = self.inner.predict_torch(*args, **kwargs)
        binary = masks if masks.dtype == bool else masks > self.inner.model.mask_threshold
        self.masks.append(binary.reshape(-1, *binary.shape[-2:]))
        return masks, iou, low_res


def mask_parity(
    model: Any,
    encoder: Any,
    decoder: Any,
    images: list[np.ndarray],
    points_per_side: int = PARITY_POINTS_PER_SIDE,
) -> MaskParity:
    """Masks of PyTorch SAM and of the engines (active runners) on uint8 RGB (H, W, 3) images.

    The generator's quality and stability filters are off, so that every prompt's three masks
    are compared and the segment counts are not zero on weights that predict low quality (as
    random weights do); the filters themselves are segment-anything's code on both sides.
    """
    import torch
    from segment_anything import SamAutomaticMaskGenerator

    relaxed = {"points_per_side": points_per_side, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    reference, candidate = (
        SamAutomaticMaskGenerator(model, **relaxed),
        SamAutomaticMaskGenerator(model, **relaxed),
    )
    reference.predictor = _Recorder(reference.predictor)
    candidate.predictor = _Recorder(engine_predictor(model, encoder, decoder))
    counts = [0, 0]
    for image in images:
        for side, generator in enumerate((reference, candidate)):
            with torch.inference_mode():
                found = generator.generate(image)
            counts[side] += len(tidy_segments([np.asarray(m["segmentation"], bool) for m in found]))
    ious = _mask_ious(torch.cat(reference.predictor.masks), torch.cat(candidate.predictor.masks))
    return MaskParity(float(ious.mean()), counts[0], counts[1], len(images), len(ious) // 3)


def _mask_ious(a: Any, b: Any) -> Any:
    """IoU of each pair of bool masks (n, H, W); two empty masks agree fully (IoU 1)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return (inter / union.clamp(min=1)).where(union > 0, 1.0)


def require_mask_parity(measured: MaskParity) -> MaskParity:
    from engines.errors import EngineError

    if not measured.passes():
        raise EngineError(
            f"SAM engines: mask parity check failed: mean mask IoU {measured.mean_mask_iou:.4f} "
            f"(needs {MIN_MASK_IOU}), segments {measured.engine_segments} vs PyTorch's "
            f"{measured.torch_segments} (needs +-{MAX_SEGMENT_COUNT_CHANGE:.0%})",
            hint="--engine torch runs the PyTorch oracle",
        )
    return measured


def build_sam_engines(
    sam: Any,
    kind: str,
    checkpoint_sha256: str,
    engine_dir: Path | None = None,
    probe_images: list[np.ndarray] | None = None,
) -> Engines:
    """SAM's encoder and point-prompt decoder as fp32 ONNX graphs, cached by checkpoint hash.

    A new pair is checked on masks before it enters the cache (`mask_parity` on `probe_images`,
    uint8 RGB, or one seeded noise image); its numbers are the entry's `parity` file.
    """
    from engines.cache import EngineCache

    def build(folder: Path) -> dict[str, Path]:
        return _with_mask_check(sam, _export_sam(sam, folder), "onnx", folder, probe_images)

    files, hit = EngineCache(engine_dir).get_or_build(_key(kind, checkpoint_sha256, "onnx"), build)
    return Engines("onnx", "fp32", files, hit)


def build_sam_tensorrt(
    sam: Any,
    kind: str,
    checkpoint_sha256: str,
    engine_dir: Path | None = None,
    probe_images: list[np.ndarray] | None = None,
) -> Engines:
    """SAM's encoder and decoder as fp32 TensorRT engines, built from the checked ONNX pair.

    The decoder's profile covers one image's embeddings and 1..64 single-point prompts (what the
    automatic mask generator sends). The pair is mask-checked against PyTorch SAM like the ONNX
    one before it is cached.
    """
    from engines.cache import EngineCache
    from engines.export import build_tensorrt_engine, sam_decoder_profile

    source = build_sam_engines(sam, kind, checkpoint_sha256, engine_dir, probe_images).files
    prompts = sam.prompt_encoder
    embeddings = (1, prompts.embed_dim, *prompts.image_embedding_size)

    def build(folder: Path) -> dict[str, Path]:
        files = {
            "encoder": build_tensorrt_engine(source["encoder"], folder / "sam-encoder.engine", False, (1,)),
            "decoder": build_tensorrt_engine(
                source["decoder"],
                folder / "sam-decoder.engine",
                False,
                shapes=sam_decoder_profile(embeddings),
            ),
        }
        return _with_mask_check(sam, files, "tensorrt", folder, probe_images)

    files, hit = EngineCache(engine_dir).get_or_build(_key(kind, checkpoint_sha256, "tensorrt"), build)
    return Engines("tensorrt", "fp32", files, hit)


def _key(kind: str, checkpoint_sha256: str, runtime: str) -> EngineKey:
    """The engine-cache key of a SAM checkpoint's fp32 graphs on `runtime` ("onnx" / "tensorrt")."""
    from engines.cache import EngineKey, runtime_versions

    return EngineKey(
        checkpoint_sha256=checkpoint_sha256,
        arch=f"sam_{kind}",
        arch_config_sha256=hashlib.sha256(kind.encode()).hexdigest(),
        precision="fp32",
        runtime="onnxruntime" if runtime == "onnx" else runtime,
        versions=tuple(sorted(runtime_versions(runtime).items())),
    )


def _with_mask_check(
    sam: Any, files: dict[str, Path], runtime: str, folder: Path, probe_images: list[np.ndarray] | None
) -> dict[str, Path]:
    """`files` plus "parity" (the mask check's numbers), or EngineError when the masks differ."""
    with _runners(files, runtime) as (encoder, decoder):
        measured = require_mask_parity(mask_parity(sam, encoder, decoder, probe_images or [_noise(sam)]))
    files["parity"] = folder / "parity.json"
    files["parity"].write_text(json.dumps(asdict(measured), indent=2))
    return files


def stored_mask_parity(engines: Engines) -> MaskParity:
    """The mask check that a SAM graph pair passed when it was built (its `parity` file)."""
    return MaskParity(**json.loads(engines.files["parity"].read_text()))


def _open_pair(files: dict[str, Path], runtime: str = "onnx") -> tuple[Any, Any]:
    """SAM's encoder and decoder runners on `runtime` ("onnx" / "tensorrt"), active."""
    from engines.runners import OnnxRuntimeRunner, TensorRTRunner

    runner = TensorRTRunner if runtime == "tensorrt" else OnnxRuntimeRunner
    encoder, decoder = runner(str(files["encoder"])), runner(str(files["decoder"]))
    encoder.activate()
    decoder.activate()
    return encoder, decoder


@contextlib.contextmanager
def _runners(files: dict[str, Path], runtime: str = "onnx") -> Iterator[tuple[Any, Any]]:
    """`with _runners(files, runtime) as (encoder, decoder)`: both active inside the block."""
    pair = _open_pair(files, runtime)
    try:
        yield pair
    finally:
        for runner in pair:
            runner.deactivate()


def _noise(sam: Any) -> np.ndarray:
    size = sam.image_encoder.img_size
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _sam_points(size: int, per_side: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A per_side x per_side grid of single-point prompts: coords float32 (P, 1, 2), labels (P, 1)."""
    centres = (np.arange(per_side) + 0.5) * size / per_side
    grid = np.stack(np.meshgrid(centres, centres), axis=-1).reshape(-1, 1, 2).astype(np.float32)
    return grid, np.ones(grid.shape[:2], np.float32)


def _export_sam(sam: Any, folder: Path) -> dict[str, Path]:
    import torch

    from engines.export import (
        SAM_DECODER_AXES,
        SAM_DECODER_INPUTS,
        SAM_DECODER_OUTPUTS,
        export_onnx,
        sam_decoder,
        sam_encoder,
    )

    size = sam.image_encoder.img_size
    pixels = torch.zeros(1, 3, size, size)
    encoder = export_onnx(sam_encoder(sam), pixels, folder / "sam-encoder.onnx", "pixels")
    with torch.no_grad():
        embeddings = sam.image_encoder(pixels)
    coords, labels = (torch.from_numpy(a) for a in _sam_points(size, 2))
    decoder = export_onnx(
        sam_decoder(sam),
        (embeddings, coords, labels),
        folder / "sam-decoder.onnx",
        SAM_DECODER_INPUTS,
        SAM_DECODER_OUTPUTS,
        SAM_DECODER_AXES,
    )
    return {"encoder": encoder, "decoder": decoder}


def check_sam_engines(
    sam: Any, engines: Engines, image: np.ndarray | None = None
) -> tuple[dict[str, float], str]:
    """fp32 parity of SAM's encoder and decoder with PyTorch on one image (uint8 RGB) or noise.

    Returns the measured numbers and the provider that ran them; a failure is an EngineError
    (exit 3) with the numbers.
    """
    with _runners(engines.files, engines.runtime) as (encoder, decoder):
        return _check_pair(sam, encoder, decoder, image), encoder.provider


def _check_pair(sam: Any, encoder: Any, decoder: Any, image: np.ndarray | None) -> dict[str, float]:
    """`check_sam_engines` on an already active encoder and decoder: the measured numbers."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    from engines.export import sam_decoder
    from engines.validate import require_parity

    size = sam.image_encoder.img_size
    image = _noise(sam) if image is None else image
    resized = torch.from_numpy(ResizeLongestSide(size).apply_image(image)).permute(2, 0, 1).float()
    pixels = sam.preprocess(resized[None])  # normalized and padded: float32 (1, 3, S, S)
    coords, labels = _sam_points(size)
    with torch.no_grad():
        embeddings = sam.image_encoder(pixels)
        masks, iou = sam_decoder(sam)(embeddings, torch.from_numpy(coords), torch.from_numpy(labels))
    onnx_embeddings = encoder.infer({"pixels": pixels.numpy()})["embeddings"]
    decoded = decoder.infer(
        {"image_embeddings": embeddings.numpy(), "point_coords": coords, "point_labels": labels}
    )
    numbers = {}
    for name, reference, candidate in (
        ("encoder", embeddings.numpy().reshape(1, -1), onnx_embeddings.reshape(1, -1)),
        ("decoder masks", masks.numpy().reshape(len(coords), -1), decoded["masks"].reshape(len(coords), -1)),
        ("decoder iou", iou.numpy(), decoded["iou_predictions"]),
    ):
        measured = require_parity(f"SAM {name}", reference, candidate)
        numbers[f"{name.replace(' ', '_')}_max_abs_diff"] = measured.max_abs_diff
        numbers[f"{name.replace(' ', '_')}_min_cosine"] = measured.min_cosine
    return numbers


def open_engine_predictor(
    sam: Any,
    kind: str,
    checkpoint: Path,
    runtime: str,
    engine_dir: Path | None,
    probe_image: np.ndarray | None,
) -> Any:
    """The engine predictor for a SAM checkpoint on `runtime` ("onnx" / "tensorrt"): built (and
    mask-checked) if missing, then checked against PyTorch on `probe_image`; runners stay active."""
    from auditor.models import sha256_file
    from engines.runners import import_tensorrt, require_cuda

    if runtime == "tensorrt":  # fail before the ONNX pair is exported, not after
        import_tensorrt()
        require_cuda("TensorRT")
    probes = [probe_image] if probe_image is not None else None
    build = build_sam_tensorrt if runtime == "tensorrt" else build_sam_engines
    engines = build(sam, kind, sha256_file(checkpoint), engine_dir, probes)
    encoder, decoder = _open_pair(engines.files, engines.runtime)  # opened once: checked, then kept
    _check_pair(sam, encoder, decoder, probe_image)
    return engine_predictor(sam, encoder, decoder)
