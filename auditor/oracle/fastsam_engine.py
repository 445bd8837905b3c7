"""FastSAM on engines: ultralytics exports the network once; the scan needs only numpy after that.

FastSAM is a YOLOv8 segmentation network with one class. `build_fastsam_engine` copies the
weight file into a fresh engine-cache folder and runs ultralytics' own exporter there (ONNX, 640
px, fp32), then checks the graph on masks against ultralytics' own predictor before the entry is
cached (`parity.json`, hashed in the manifest). A scan that finds the entry cached never imports
ultralytics: the letterbox, the non-maximum suppression and the masks from prototypes are here,
in numpy (`FastSamEngine.segments`).

Shapes of the exported graph: "images" float32 (1, 3, h, w) RGB in [0, 1], the long side 640 and
both multiples of 32; "output0" float32 (1, 4 + classes + 32, A): per anchor a box (centre x,
y, width, height in input pixels), the class confidences (FastSAM has one class; the best one
counts) and 32 mask coefficients; "output1" float32 (1, 32, h / 4, w / 4) mask prototypes.
The post-processing follows ultralytics' predictor with its predict defaults (confidence 0.25,
NMS IoU 0.7, at most 300 masks, masks at the image's own size), which the PyTorch oracle uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from auditor.oracle import Segment, tidy_segments

INPUT_SIZE = 640
CONFIDENCE, NMS_IOU, MAX_MASKS = 0.25, 0.7, 300
CLASS_OFFSET = 7680  # pixels between classes' boxes during suppression (more than any input size)
PAD_VALUE = 114  # the grey ultralytics letterboxes with
STRIDE = 32  # the network's largest stride: input sides are multiples of it
MIN_MASK_IOU = 0.95


@dataclass(frozen=True)
class Letterbox:
    """Where the image sits in the network's input: its scaled size and the padding before it."""

    height: int  # the image's own size
    width: int
    scaled_height: int
    scaled_width: int
    top: int
    left: int


def letterbox(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, Letterbox]:
    """uint8 RGB (H, W, 3) -> float32 (1, 3, h, w) in [0, 1], centred on grey, and its frame.

    The long side is scaled to `size`; the short one is padded up to the next multiple of
    STRIDE only (ultralytics' rectangular inference, what its predictor does by default).
    """
    from PIL import Image

    height, width = image.shape[:2]
    ratio = min(size / height, size / width)
    scaled_w, scaled_h = max(round(width * ratio), 1), max(round(height * ratio), 1)
    input_h, input_w = (scaled_h + (size - scaled_h) % STRIDE), (scaled_w + (size - scaled_w) % STRIDE)
    top, left = round((input_h - scaled_h) / 2 - 0.1), round((input_w - scaled_w) / 2 - 0.1)
    canvas = np.full((input_h, input_w, 3), PAD_VALUE, np.uint8)
    resized = image
    if (scaled_h, scaled_w) != (height, width):
        try:  # OpenCV's bilinear resize is what ultralytics letterboxes with
            import cv2

            resized = cv2.resize(image, (scaled_w, scaled_h), interpolation=cv2.INTER_LINEAR)
        except ImportError:  # PIL's differs by at most one grey level per pixel
            resized = np.asarray(
                Image.fromarray(image).resize((scaled_w, scaled_h), Image.Resampling.BILINEAR)
            )
    canvas[top : top + scaled_h, left : left + scaled_w] = resized
    pixels = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return pixels, Letterbox(height, width, scaled_h, scaled_w, top, left)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou: float, keep_at_most: int) -> np.ndarray:
    """Indices of the boxes kept, best first: greedy, a box goes when it overlaps a kept one > `iou`.

    boxes float (n, 4) as x0, y0, x1, y1; scores float (n,).
    """
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    while order.size and len(kept) < keep_at_most:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        overlap = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        order = rest[overlap / (areas[best] + areas[rest] - overlap + 1e-9) <= iou]
    return np.asarray(kept, np.int64)


def linear_resize(source: int, target: int) -> np.ndarray:
    """float32 (target, source): bilinear resizing of one axis, half-pixel centres, no antialiasing
    (what torch's `interpolate(mode="bilinear", align_corners=False)` does)."""
    centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, None)
    low = np.minimum(np.floor(centres).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    weight = (centres - low).astype(np.float32)
    matrix = np.zeros((target, source), np.float32)
    np.add.at(matrix, (np.arange(target), low), 1 - weight)
    np.add.at(matrix, (np.arange(target), high), weight)
    return matrix


def _mask_axes(prototypes: tuple[int, int], frame: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """(rows (H, ph), cols (W, pw)): mask logits at prototype size -> the image's own size.

    As ultralytics does it: upsample the prototype grid by the smallest factor (1, 2 or 4) on
    which the letterbox padding falls on whole pixels, cut the padding off there, and resize the
    rest to the image bilinearly.
    """
    (proto_h, proto_w), (height, width) = prototypes, (frame.height, frame.width)
    gain = min(4 * proto_h / height, 4 * proto_w / width)
    pad = (4 * proto_h - max(round(height * gain), 1)) | (4 * proto_w - max(round(width * gain), 1))
    factor = 4 // math.gcd(4, pad | pad // 2)
    gain = min(factor * proto_h / height, factor * proto_w / width)
    axes = []
    for proto, size in ((proto_h, height), (proto_w, width)):
        span = max(round(size * gain), 1)
        start = round((factor * proto - span) / 2 - 0.1)
        upsampled = linear_resize(proto, factor * proto) if factor > 1 else np.eye(proto, dtype=np.float32)
        axes.append(linear_resize(span, size) @ upsampled[start : start + span])
    return axes[0], axes[1]


def decode(output0: np.ndarray, prototypes: np.ndarray, frame: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 (n, 4) in image pixels, masks bool (n, H, W)) from one image's graph outputs."""
    channels, proto_h, proto_w = prototypes.shape[1:]
    anchors = output0[0].T  # (A, 4 + classes + channels); FastSAM has one class
    confidences = anchors[:, 4 : anchors.shape[1] - channels]
    scores, labels = confidences.max(axis=1), confidences.argmax(axis=1)
    passed = scores > CONFIDENCE
    anchors, scores, labels = anchors[passed], scores[passed], labels[passed]
    centre, half = anchors[:, :2], anchors[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    # One suppression per class, as ultralytics does it: classes are moved apart before it.
    apart = boxes + (labels * CLASS_OFFSET)[:, None]
    kept = non_max_suppression(apart, scores, NMS_IOU, MAX_MASKS)
    boxes, coefficients = boxes[kept], anchors[kept, -channels:]
    gain_y, gain_x = frame.scaled_height / frame.height, frame.scaled_width / frame.width
    boxes = (boxes - [frame.left, frame.top, frame.left, frame.top]) / [gain_x, gain_y, gain_x, gain_y]
    boxes = np.clip(boxes, 0, [frame.width, frame.height, frame.width, frame.height]).astype(np.float32)
    logits = (coefficients @ prototypes[0].reshape(channels, -1)).reshape(-1, proto_h, proto_w)
    rows, cols = _mask_axes((proto_h, proto_w), frame)
    masks = (rows @ logits @ cols.T) > 0
    ys, xs = np.arange(frame.height)[None, :, None], np.arange(frame.width)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    masks &= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    keep = masks.any(axis=(1, 2))
    return _snap_to_border(boxes[keep], frame.height, frame.width), masks[keep]


def _snap_to_border(boxes: np.ndarray, height: int, width: int, margin: int = 20) -> np.ndarray:
    """FastSAM's box convention (after the masks are made): an edge within `margin` px of the
    image's border is moved onto it, and a box covering > 90 % of the image (IoU) becomes it."""
    boxes = boxes.copy()
    boxes[boxes[:, 0] < margin, 0] = 0
    boxes[boxes[:, 1] < margin, 1] = 0
    boxes[boxes[:, 2] > width - margin, 2] = width
    boxes[boxes[:, 3] > height - margin, 3] = height
    x0, y0 = np.clip(boxes[:, 0], 0, None), np.clip(boxes[:, 1], 0, None)
    x1, y1 = np.clip(boxes[:, 2], None, width), np.clip(boxes[:, 3], None, height)
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    whole = inter / (height * width + areas - inter) > 0.9
    boxes[whole] = (0, 0, width, height)
    return boxes


class FastSamEngine:
    """FastSAM's exported graph on a runner ("images" -> "output0", "output1"), active."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def masks(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (H, W, 3) -> (boxes float32 (n, 4) in pixels, masks bool (n, H, W)), best first."""
        pixels, frame = letterbox(image)
        outputs = self.runner.infer({"images": pixels})
        return decode(outputs["output0"], outputs["output1"], frame)

    def segments(self, image: np.ndarray) -> list[Segment]:
        return tidy_segments(list(self.masks(image)[1]))


@dataclass(frozen=True)
class FastSamParity:
    """The engine against ultralytics' predictor on the same weights and images."""

    images: int
    ultralytics_masks: int
    engine_masks: int
    mean_mask_iou: float  # each of ultralytics' masks against the engine's best match
    max_box_diff: float  # pixels, between matched boxes

    def passes(self) -> bool:
        return self.engine_masks == self.ultralytics_masks and self.mean_mask_iou >= MIN_MASK_IOU


def ultralytics_masks(model: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n, 4), masks bool (n, H, W)) from ultralytics' own FastSAM predictor on RGB `image`."""
    bgr = np.ascontiguousarray(image[..., ::-1])  # ultralytics reads arrays as BGR
    result = model(bgr, retina_masks=True, verbose=False)[0]
    if result.masks is None:
        height, width = image.shape[:2]
        return np.zeros((0, 4), np.float32), np.zeros((0, height, width), bool)
    return result.boxes.xyxy.cpu().numpy(), result.masks.data.cpu().numpy() > 0


def fastsam_parity(model: Any, engine: FastSamEngine, images: list[np.ndarray]) -> FastSamParity:
    """Masks and boxes of the engine against ultralytics' `model` (a loaded `FastSAM`)."""
    ious: list[float] = []
    box_diffs: list[float] = [0.0]
    counts = [0, 0]
    for image in images:
        reference_boxes, reference = ultralytics_masks(model, image)
        boxes, masks = engine.masks(image)
        counts[0] += len(reference)
        counts[1] += len(masks)
        for box, mask in zip(reference_boxes, reference, strict=True):
            if not len(masks):
                ious.append(0.0)
                continue
            inter = (masks & mask).sum(axis=(1, 2))
            union = (masks | mask).sum(axis=(1, 2))
            best = int(np.argmax(inter / np.maximum(union, 1)))
            ious.append(float(inter[best] / max(union[best], 1)))
            box_diffs.append(float(np.abs(boxes[best] - box).max()))
    mean_iou = float(np.mean(ious)) if ious else 1.0
    return FastSamParity(len(images), counts[0], counts[1], mean_iou, max(box_diffs))


def import_ultralytics() -> Any:
    """The `ultralytics` package, imported without the global patch it applies to PIL.

    Importing it replaces `PIL.Image.open` process-wide with an opener that, on a file PIL
    cannot identify, pip-installs a HEIF plugin (network at run time) and then fails with an
    import error: a corrupt image in DATA would stop the scan instead of being skipped.
    """
    from PIL import Image

    original = Image.open
    try:
        import ultralytics
    finally:
        Image.open = original
    return ultralytics


def load_ultralytics(checkpoint: Path) -> Any:
    """ultralytics' FastSAM on a weight file (an ultralytics pickle: pass only files you trust)."""
    try:
        FastSAM = import_ultralytics().FastSAM
    except ImportError as exc:
        from auditor.errors import EnvironmentProblem

        raise EnvironmentProblem(
            "--oracle fastsam needs the optional package 'ultralytics' to run or export FastSAM",
            hint="pip install ultralytics (after the first export, engine scans no longer need it)",
        ) from exc
    try:
        return FastSAM(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - ultralytics raises whatever its unpickling hits
        from auditor.errors import CheckpointError

        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{checkpoint} is not a FastSAM weight file ultralytics can load: {first_line}",
            hint="pass FastSAM-s.pt or FastSAM-x.pt as released by ultralytics",
        ) from exc


def build_fastsam_engine(
    checkpoint: Path, checkpoint_sha256: str, engine_dir: Path | None, probe_images: list[np.ndarray]
) -> dict[str, Path]:
    """The cached ONNX graph of a FastSAM weight file, exported by ultralytics and checked if new."""
    from engines.cache import EngineCache, EngineKey, runtime_versions
    from engines.errors import EngineError
    from engines.runners import OnnxRuntimeRunner

    key = EngineKey(
        checkpoint_sha256=checkpoint_sha256,
        arch="fastsam",
        arch_config_sha256=hashlib.sha256(f"fastsam-{INPUT_SIZE}-rect".encode()).hexdigest(),
        precision="fp32",
        runtime="onnxruntime",
        versions=tuple(sorted(runtime_versions().items())),
    )

    def build(folder: Path) -> dict[str, Path]:
        graph = _export(checkpoint, folder)
        with OnnxRuntimeRunner(str(graph)) as runner:
            measured = fastsam_parity(load_ultralytics(checkpoint), FastSamEngine(runner), probe_images)
        if not measured.passes():
            raise EngineError(
                f"FastSAM engine: parity with ultralytics failed: {measured.engine_masks} masks against "
                f"{measured.ultralytics_masks}, mean mask IoU {measured.mean_mask_iou:.4f} "
                f"(needs {MIN_MASK_IOU})",
                hint="--engine torch runs ultralytics' own predictor",
            )
        parity = folder / "parity.json"
        parity.write_text(json.dumps(asdict(measured), indent=2))
        return {"graph": graph, "parity": parity}

    files, _hit = EngineCache(engine_dir).get_or_build(key, build)
    return files


def _export(checkpoint: Path, folder: Path) -> Path:
    """ultralytics' exporter on a copy of `checkpoint` in `folder` (it writes beside its input);
    its chatter goes to the log at warning level, never to stdout, where reports are written."""
    import logging

    staged = Path(shutil.copyfile(checkpoint, folder / "fastsam.pt"))
    try:
        model = load_ultralytics(staged)  # imports ultralytics without its PIL patch, or exit 3
        from ultralytics.utils import LOGGER

        level = LOGGER.level
        LOGGER.setLevel(logging.WARNING)
        try:
            exported = model.export(
                format="onnx", imgsz=INPUT_SIZE, dynamic=True, simplify=False, device="cpu"
            )
        finally:
            LOGGER.setLevel(level)
    finally:
        staged.unlink()
    return Path(exported)


def stored_parity(files: dict[str, Path]) -> FastSamParity:
    return FastSamParity(**json.loads(files["parity"].read_text()))
