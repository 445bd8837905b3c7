"""The FastSAM oracle (the paper's): ultralytics' FastSAM from a weight file you provide.

Optional: without the `ultralytics` package this is an environment error (exit 3) naming the
package to install. Its weight files are ultralytics pickles, so they are loaded by ultralytics
itself: pass only weight files you trust.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auditor.errors import EnvironmentProblem
from auditor.oracle import Segment, tidy_segments


class FastSamOracle:
    name = "fastsam"

    def __init__(self, checkpoint: Path) -> None:
        try:
            from ultralytics import FastSAM
        except ImportError as exc:
            raise EnvironmentProblem(
                "--oracle fastsam needs the optional package 'ultralytics', which is not installed",
                hint="pip install ultralytics",
            ) from exc
        self.model = FastSAM(str(checkpoint))

    def segments(self, image: np.ndarray) -> list[Segment]:
        results = self.model(image, retina_masks=True, verbose=False)
        masks = results[0].masks
        if masks is None:
            return []
        return tidy_segments([np.asarray(m, bool) for m in masks.data.cpu().numpy()])
