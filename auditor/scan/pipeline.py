"""`auditor.scan.scan`: the stages of DESIGN §4, in the order the data flows.

screen (stage 0: every image scored once; stage 1: the sample the oracle checks first) ->
check (Algorithm 1 on the sample) -> suspects (which classes go on) -> check again (every image
predicted as a suspect) -> findings (confirmation by transplant, victims: Algorithm 2) ->
compact (stage 4). The result is returned, not written: `auditor.scan.writers` writes the files.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from auditor.data import Dataset
from auditor.models import LoadedModel
from auditor.oracle import Oracle
from auditor.report import Report
from auditor.scan.cache import ScanCache
from auditor.scan.check import ImageCheck, object_confidence, run_checks
from auditor.scan.compact import CompactPair, compact_set
from auditor.scan.context import Progress, ScanConfig, ScanContext, ScoreFn
from auditor.scan.executor import Executor
from auditor.scan.findings import (
    COMPACT_DIR,
    TRIGGER_FILE,
    Findings,
    all_victims,
    artifact_name,
    build_report,
    find_backdoors,
)
from auditor.scan.model_level import (
    inversion_info,
    model_level,
    not_run,
    should_run,
    stamp_compact,
    stamp_pictures,
    with_inversion,
)
from auditor.scan.screen import ByIndex, Probabilities, choose_sample, predictions, score_all
from auditor.scan.suspects import candidate_clusters, follow_up, suspect_classes, suspects_pass
from auditor.scoring import ZeroShotScorer, make_scorer, torch_runners
from engines.runners import Runner

__all__ = ["COMPACT_DIR", "TRIGGER_FILE", "ScanResult", "scan"]


@dataclass(frozen=True)
class ScanResult:
    """The report, the recovered triggers' pixels (file name -> uint8 (s, s, 3)) and the compact set."""

    report: Report
    triggers: dict[str, np.ndarray]
    overlays: dict[str, np.ndarray] = field(default_factory=dict)  # file name -> float32 (H, W, 3)
    compact: tuple[CompactPair, ...] = ()


def scan(
    loaded: LoadedModel,
    dataset: Dataset,
    oracle: Oracle,
    config: ScanConfig | None = None,
    progress: Progress | None = None,
    reference: LoadedModel | None = None,
    runners: tuple[Runner, Runner] | None = None,
    cache: ScanCache | None = None,
    retry_failed: bool = False,
    evidence: Runner | None = None,
    inversion: str = "never",
    inversion_budget: float | None = None,
    inversion_data: Dataset | None = None,
    executor: Executor | None = None,
) -> ScanResult:
    """Audit `loaded` on `dataset`; see the module docstring for the stages.

    `reference`, a clean model the user trusts, labels the oracle's objects instead of `loaded`.
    `runners`: (image, text) runners for bulk scoring (`auditor.runtime`); default PyTorch.
    `evidence`: an fp32 image runner for the steps that decide the report, when the bulk image
    runner is int8 / fp16 (`auditor.runtime.evidence_runner`).
    `cache`: where stage 0's scores and the oracle checks are kept as they are computed, and
    found again by a rerun (`auditor.scan.cache`); `cost.images_scored` counts only new work.
    An unexpected error on one image (or in one target's confirmation) is recorded in
    `report.failures` and the scan goes on; a rerun keeps cached failures unless `retry_failed`.
    Environment errors (a missing extra, a broken engine) still stop the scan: they would fail
    every image alike.
    `inversion`: "auto" | "always" | "never", the model-level stage (`auditor.scan.model_level`),
    within `inversion_budget` seconds (default: as long as the data pass took), on
    `inversion_data` or DATA's images that are not victims.
    """
    config = config or ScanConfig()
    tick = progress or (lambda stage, n, total: None)
    seconds: dict[str, float] = {}
    image_runner, text_runner = runners or torch_runners(loaded)
    with image_runner, text_runner, evidence or contextlib.nullcontext():
        started = time.perf_counter()
        ctx = ScanContext(
            loaded, dataset, make_scorer(loaded, dataset.classes, image_runner, text_runner), oracle, config
        )
        if evidence is not None:
            ctx.exact_scorer = ZeroShotScorer(evidence, ctx.scorer.class_weights, ctx.scorer.logit_scale)
        if reference is not None:
            ctx.label_objects = reference_scorer(reference, dataset.classes, config)
        scores = score_all(ctx, cache, tick, executor)
        seconds["scoring"] = time.perf_counter() - started

        started = time.perf_counter()
        probs = Probabilities(scores, len(dataset.classes))
        embeddings = ByIndex(scores.indices, scores.embeddings)
        if ctx.label_objects is None:  # a reference model's crops keep the fixed bound
            ctx.object_confidence = object_confidence(scores.probs[:, 0], len(dataset.classes))
        checks = _oracle_checks(ctx, probs, embeddings, cache, retry_failed, tick, executor)
        seconds["oracle"] = time.perf_counter() - started

        started = time.perf_counter()
        findings = find_backdoors(ctx, checks, tick)
        compact = _compact(ctx, checks, findings)
        seconds["confirmation"] = time.perf_counter() - started

        stage = None
        budget = inversion_budget if inversion_budget is not None else sum(seconds.values())
        if should_run(inversion, len(findings.confirmed)):
            started = time.perf_counter()
            excluded = {v.index for v in all_victims(findings)}
            stage = model_level(ctx, excluded, budget, inversion_data, reference, tick)
            if stage is not None and not compact:
                compact = stamp_compact(ctx, stage, excluded)
            seconds["inversion"] = time.perf_counter() - started
    report = build_report(ctx, checks, findings, len(compact), seconds, len(scores.indices))
    triggers, overlays = _trigger_files(findings, dataset.classes)
    if stage is not None:
        report = with_inversion(report, inversion_info(stage, dataset.classes, budget))
        triggers.update(stamp_pictures(stage, dataset.classes))
    elif inversion != "never" or inversion_data is not None:
        report = with_inversion(report, not_run(inversion, len(findings.confirmed)))
    return ScanResult(report, triggers, overlays, compact)


def reference_scorer(reference: LoadedModel, classes: list[str], config: ScanConfig) -> ScoreFn:
    """Score function of the trusted reference model (PyTorch runners, kept active)."""
    image_runner, text_runner = torch_runners(reference)
    image_runner.activate()
    with text_runner:
        scorer = make_scorer(reference, classes, image_runner, text_runner)
    return lambda images: scorer.probabilities(images, reference.preprocess, config.batch_size * 2)


def _oracle_checks(
    ctx: ScanContext,
    probs: Mapping[int, np.ndarray],
    embeddings: Mapping[int, np.ndarray],
    cache: ScanCache | None,
    retry_failed: bool,
    tick: Progress,
    executor: Executor | None = None,
) -> dict[int, ImageCheck]:
    """Algorithm 1 on the stratified sample, on the follow-up images that match a class's
    strongest candidate (`auditor.scan.suspects.follow_up`), then on images predicted as a
    suspect class, as many as the oracle budget leaves (`auditor.scan.suspects.suspects_pass`).

    Only suspects by disagreement without look-alike candidates get the second pass: a
    non-localized trigger's victims are the images that disagree with the oracle, while a
    patch's victims are found by matching the recovered trigger (`auditor.scan.victims`).
    """
    preds = ctx.predictions = predictions(probs)
    sample = choose_sample(ctx, preds, embeddings)
    checks: dict[int, ImageCheck] = {}
    run_checks(
        ctx,
        sample,
        probs,
        checks,
        lambda n: tick("oracle: sample", n, len(sample)),
        cache,
        retry_failed,
        executor,
    )
    extra = follow_up(checks, preds, ctx.image, ctx.config.seed)
    run_checks(
        ctx,
        extra,
        probs,
        checks,
        lambda n: tick("oracle: follow-up", n, len(extra)),
        cache,
        retry_failed,
        executor,
    )
    sampled = list(checks.values())
    suspects = set(suspect_classes(sampled, len(ctx.dataset.classes)))
    suspects -= {c.target for c in candidate_clusters(sampled, ctx.image, ctx.config.min_candidates)}
    room = int(ctx.config.oracle_budget * len(preds)) - len(checks)
    rest = suspects_pass(checks, preds, suspects, room, ctx.config.seed, embeddings)
    run_checks(
        ctx,
        rest,
        probs,
        checks,
        lambda n: tick("oracle: suspects", n, len(rest)),
        cache,
        retry_failed,
        executor,
    )
    return checks


def _compact(ctx: ScanContext, checks: dict[int, ImageCheck], findings: Findings) -> tuple[CompactPair, ...]:
    """The compact set; if building it fails, the findings stand without one (a recorded failure)."""
    return ctx.attempt("compact", lambda: compact_set(ctx, checks, findings)) or ()


def _trigger_files(
    findings: Findings, classes: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({PNG name: prototype pixels}, {.npy name: overlay}) of the confirmed findings."""
    pixels, overlays = {}, {}
    for rank, finding in enumerate(findings.confirmed):
        if finding.prototype is not None:
            pixels[artifact_name("trigger", ".png", rank, finding, classes)] = finding.prototype.pixels
        if finding.overlay is not None:
            overlays[artifact_name("overlay", ".npy", rank, finding, classes)] = finding.overlay
    return pixels, overlays
