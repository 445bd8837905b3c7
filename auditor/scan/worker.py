"""A scan's worker: the audited model, its engines and the oracle, opened again in another process.

An executor (`auditor.scan.ray_executor`) ships a `WorkerSetup` — paths and resolved settings,
never live models or engine sessions — to each of its workers. A worker opens its own
`ScanContext` from it once (`open_worker`), then computes units of work (`compute_unit`) with
the same functions the scan uses in-process, so that a unit's result is the same, bit for bit,
wherever it ran. The driver resolves every choice first (engine, precision after the agreement
check, the oracle's calibration), so a worker never decides anything on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from auditor.data import Dataset
from auditor.scan.context import ScanConfig, ScanContext
from auditor.scan.executor import Unit


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to rebuild the scan's bulk scorer and oracle.

    The files (model, reference, oracle weights, data, engine cache) must be readable at these
    paths on every node. `precision` is the image tower's precision the driver settled on.
    """

    model: Path
    arch: str | None
    dataset: Dataset
    config: ScanConfig
    runtime: str = "torch"  # "torch" | "onnx" | "tensorrt"
    precision: str = "fp32"
    engine_dir: Path | None = None
    oracle: str = "classic"
    oracle_checkpoint: Path | None = None
    oracle_points: int = 16
    reference: Path | None = None

    def without_skips(self) -> WorkerSetup:
        """The setup with an empty skip list (the driver's grows while it reads; workers keep their own)."""
        return replace(self, dataset=replace(self.dataset, skipped=[]))


def open_worker(setup: WorkerSetup) -> ScanContext:
    """The worker's `ScanContext`: model, runners (active for the worker's life), oracle, reference."""
    from auditor.data import first_image
    from auditor.models import load_model
    from auditor.oracle import make_oracle
    from auditor.runtime import build_engines
    from auditor.scan.pipeline import reference_scorer
    from auditor.scoring import make_scorer, torch_runners

    loaded = load_model(setup.model, setup.arch)
    if setup.runtime == "torch":
        image_runner, text_runner = torch_runners(loaded)
    else:
        image_runner, text_runner = build_engines(
            loaded, setup.runtime, setup.precision, setup.engine_dir
        ).runners()
    image_runner.activate()
    with text_runner:
        scorer = make_scorer(loaded, setup.dataset.classes, image_runner, text_runner)
    probe = first_image(setup.dataset) if setup.oracle != "classic" and setup.runtime != "torch" else None
    oracle = make_oracle(
        setup.oracle, setup.oracle_checkpoint, setup.oracle_points, setup.runtime, setup.engine_dir, probe
    )
    ctx = ScanContext(loaded, setup.dataset, scorer, oracle, setup.config)
    if setup.reference is not None:
        ctx.label_objects = reference_scorer(
            load_model(setup.reference, setup.arch), setup.dataset.classes, setup.config
        )
    return ctx


def compute_unit(ctx: ScanContext, unit: Unit) -> tuple[bytes, int]:
    """(the unit's result as the scan cache stores it, image scorings spent)."""
    from auditor.scan.cache import pack_checks, pack_scores
    from auditor.scan.check import check_chunk_alone
    from auditor.scan.screen import score_batch

    if unit.kind == "scores":
        scores, skipped = score_batch(ctx, unit.indices[0])
        return pack_scores(scores, skipped), len(scores.indices)
    checks, failed, scored = check_chunk_alone(ctx, unit)
    return pack_checks(checks, scored, failed), scored
