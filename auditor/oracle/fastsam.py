"""The FastSAM oracle (the paper's): ultralytics' FastSAM from a weight file you provide.

With `--engine torch` ultralytics' own predictor runs it. On an engine runtime (`--engine onnx`,
and `auto` where onnxruntime is installed) ultralytics exports it to ONNX once, into the engine
cache, and the scan runs the graph with numpy post-processing (`auditor.oracle.fastsam_engine`):
ultralytics is then needed only for that first export. Its weight files are ultralytics pickles,
loaded by ultralytics itself: pass only weight files you trust. Without the `ultralytics` package,
where it is needed, this is an environment error (exit 3) naming the package to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auditor.oracle import Segment, tidy_segments


class FastSamOracle:
    name = "fastsam"
    thread_safe = False  # one ONNX Runtime session or ultralytics predictor, one image at a time

    def __init__(
        self,
        checkpoint: Path,
        runtime: str = "torch",
        engine_dir: Path | None = None,
        probe_image: np.ndarray | None = None,
    ) -> None:
        from auditor.oracle import fastsam_engine

        self.runtime = runtime
        self.engine: fastsam_engine.FastSamEngine | None = None
        if runtime == "torch":
            self.model = fastsam_engine.load_ultralytics(checkpoint)
            return
        if runtime != "onnx":
            from engines.errors import EngineError

            raise EngineError(
                f"--oracle fastsam has no {runtime} engine yet", hint="use --engine onnx or --engine torch"
            )
        from auditor.models import sha256_file
        from engines.runners import OnnxRuntimeRunner

        probe = probe_image if probe_image is not None else _noise()
        files = fastsam_engine.build_fastsam_engine(checkpoint, sha256_file(checkpoint), engine_dir, [probe])
        runner = OnnxRuntimeRunner(str(files["graph"]))
        runner.activate()
        self.engine = fastsam_engine.FastSamEngine(runner)

    def segments(self, image: np.ndarray) -> list[Segment]:
        if self.engine is not None:
            return self.engine.segments(image)
        from auditor.oracle.fastsam_engine import ultralytics_masks

        return tidy_segments(list(ultralytics_masks(self.model, image)[1]))


def _noise() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
