"""The segment-anything oracle: SAM's automatic mask generator from a checkpoint you provide.

The model type (vit_b / vit_l / vit_h) is read from the checkpoint's shapes, and the weights go
through the same safe loading as audited checkpoints (no pickled code runs). Needs the [sam]
extra (`pip install 'clip-audit[sam]'`). Under `--engine onnx` (and `auto` with onnxruntime
installed) the encoder and decoder run on ONNX Runtime (`auditor.oracle.sam_engine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import CheckpointError, missing_extra
from auditor.oracle import Segment, tidy_segments

# Width of the image encoder's patch embedding -> registry name.
_TYPES_BY_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_PATCH_EMBED = "image_encoder.patch_embed.proj.weight"


def sam_type(state: dict[str, object]) -> str:
    """'vit_b', 'vit_l' or 'vit_h' from a SAM state dict's shapes."""
    weight = state.get(_PATCH_EMBED)
    width = getattr(weight, "shape", (None,))[0]
    if width not in _TYPES_BY_WIDTH:
        raise CheckpointError(
            f"not a SAM checkpoint: no {_PATCH_EMBED} of width 768/1024/1280 (found {width})",
            hint="pass the sam_vit_b/l/h .pth file released with segment-anything",
        )
    return _TYPES_BY_WIDTH[int(width)]


def load_sam(checkpoint: Path) -> tuple[Any, str]:
    """(SAM model in eval mode, its type 'vit_b' / 'vit_l' / 'vit_h') from a weight file."""
    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        raise missing_extra("segment_anything", "sam") from exc
    from auditor.models import read_state_dict

    state, *_ = read_state_dict(checkpoint)
    kind = sam_type(state)  # type: ignore[arg-type]
    model = sam_model_registry[kind](checkpoint=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise CheckpointError(f"{checkpoint} does not fit SAM {kind}: {first_line}") from exc
    return model.eval(), kind


class SamOracle:
    """SAM's automatic mask generator; with `runtime` "onnx" its networks run on ONNX Runtime.

    The engines are built once per checkpoint (checked on masks against PyTorch SAM, on
    `probe_image` when given) and checked again when opened (`auditor.oracle.sam_engine`).
    """

    name = "sam"
    thread_safe = False  # the predictor holds the image being segmented

    def __init__(
        self,
        checkpoint: Path,
        points_per_side: int = 16,
        runtime: str = "torch",
        engine_dir: Path | None = None,
        probe_image: np.ndarray | None = None,
    ) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        model, self.model_type = load_sam(checkpoint)
        self.generator = SamAutomaticMaskGenerator(model, points_per_side=points_per_side)
        self.runtime = runtime
        if runtime != "torch":
            from auditor.oracle.sam_engine import open_engine_predictor

            self.generator.predictor = open_engine_predictor(
                model, self.model_type, checkpoint, runtime, engine_dir, probe_image
            )

    def segments(self, image: np.ndarray) -> list[Segment]:
        import torch

        with torch.inference_mode():
            masks = self.generator.generate(image)
        return tidy_segments([np.asarray(m["segmentation"], bool) for m in masks])
