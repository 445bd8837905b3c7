"""`auditor.scan`: stages 0-4 of DESIGN §4 over a loaded model, a data set and an oracle.

Stage 0 scores every image once. Stage 1 runs Algorithm 1 on a stratified sample (up to
`per_class` images per predicted class, plus every image whose claimed label disagrees with the
prediction), finds suspect classes, then checks every image predicted as a suspect. Stage 3
(Algorithm 2) names targets, builds and confirms the trigger prototype, and lists victims.
Stage 4 assembles the compact fine-tuning set. The result is returned, not written: the CLI
writes the files (`auditor.outputs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from auditor import __version__
from auditor.data import Dataset, iter_batches, load_image, pil_to_array
from auditor.errors import EnvironmentProblem
from auditor.models import LoadedModel
from auditor.oracle import Oracle
from auditor.report import (
    CompactSetInfo,
    CostInfo,
    DataInfo,
    FailureInfo,
    ModelInfo,
    Report,
    SkippedFile,
    TriggerInfo,
    VictimInfo,
)
from auditor.scan_cache import ScanCache
from auditor.scoring import Scores, ZeroShotScorer, make_scorer, torch_runners
from auditor.trigger import ImageCheck, ScoreFn, ablate_segment, check_images
from auditor.victims import (
    Prototype,
    Victim,
    box_mask,
    build_prototype,
    find_victims,
    overlay_pattern,
    overlay_transplant_test,
    paste,
    suspect_classes,
    transplant_test,
)
from engines.errors import EngineError
from engines.runners import Runner

Progress = Callable[[str, int, int | None], None]
"""progress(stage description, images done in this call, stage total or None)."""

TRIGGER_FILE = "trigger.png"
COMPACT_DIR = "compact"


@dataclass(frozen=True)
class ScanConfig:
    per_class: int = 32
    transplant_threshold: float = 0.5
    min_candidates: int = 3
    seed: int = 0
    batch_size: int = 64
    compact_fraction: float = 0.08  # the compact set's cap, as a share of the data


@dataclass(frozen=True)
class CompactPair:
    """One fine-tuning pair: uint8 RGB image (H, W, 3), its caption, and the data file it came from."""

    name: str
    image: np.ndarray
    caption: str
    source: str


@dataclass(frozen=True)
class ScanResult:
    report: Report
    trigger_pixels: np.ndarray | None = None
    compact: tuple[CompactPair, ...] = ()


class _Context:
    """What the stages share: data, model, scorer, decoded-image access and costs."""

    def __init__(
        self,
        loaded: LoadedModel,
        dataset: Dataset,
        scorer: ZeroShotScorer,
        oracle: Oracle,
        config: ScanConfig,
    ):
        self.loaded, self.dataset, self.scorer, self.oracle, self.config = (
            loaded,
            dataset,
            scorer,
            oracle,
            config,
        )
        self.images_scored = 0
        self.label_objects: ScoreFn | None = None
        self.cache: ScanCache | None = None
        self.retry_failed = False
        self.failures: list[FailureInfo] = []

    def fail(self, stage: str, exc: Exception, index: int | None = None) -> FailureInfo:
        """Record that `stage` could not finish (for image `index`, or for a step over many)."""
        message = (str(exc).splitlines() or [""])[0][:300]
        failure = FailureInfo(None if index is None else self.path(index), stage, type(exc).__name__, message)
        self.failures.append(failure)
        return failure

    def image(self, index: int) -> np.ndarray:
        return pil_to_array(load_image(self.dataset.absolute(self.dataset.samples[index])))

    def path(self, index: int) -> str:
        return self.dataset.samples[index].path

    def score(self, images: list[np.ndarray]) -> np.ndarray:
        self.images_scored += len(images)
        return self.scorer.probabilities(images, self.loaded.preprocess, self.config.batch_size * 2)


def scan(
    loaded: LoadedModel,
    dataset: Dataset,
    oracle: Oracle,
    config: ScanConfig = ScanConfig(),
    progress: Progress | None = None,
    reference: LoadedModel | None = None,
    runners: tuple[Runner, Runner] | None = None,
    cache: ScanCache | None = None,
    retry_failed: bool = False,
) -> ScanResult:
    """Audit `loaded` on `dataset`; see the module docstring for the stages.

    `reference`, a clean model the user trusts, labels the oracle's objects instead of `loaded`.
    `runners`: (image, text) runners for bulk scoring (`auditor.runtime`); default PyTorch.
    `cache`: where stage 0's scores and the oracle checks are kept as they are computed, and
    found again by a rerun (`auditor.scan_cache`); `cost.images_scored` counts only new work.
    An unexpected error on one image (or in one target's confirmation) is recorded in
    `report.failures` and the scan goes on; a rerun keeps cached failures unless `retry_failed`.
    Environment errors (a missing extra, a broken engine) still stop the scan: they would fail
    every image alike.
    """
    tick = progress or (lambda stage, n, total: None)
    seconds: dict[str, float] = {}
    image_runner, text_runner = runners or torch_runners(loaded)
    with image_runner, text_runner:
        started = time.perf_counter()
        scorer = make_scorer(loaded, dataset.classes, image_runner, text_runner)
        ctx = _Context(loaded, dataset, scorer, oracle, config)
        ctx.cache, ctx.retry_failed = cache, retry_failed
        if reference is not None:
            ctx.label_objects = _reference_scorer(reference, dataset.classes, config)
        scores = _score_all(ctx, tick)
        seconds["scoring"] = time.perf_counter() - started

        started = time.perf_counter()
        probs = _full_probs(scores, len(dataset.classes))
        checks = _stage1(ctx, scores.indices, probs, tick)
        seconds["oracle"] = time.perf_counter() - started

        started = time.perf_counter()
        findings = _stage3(ctx, checks, tick)
        try:
            compact = _stage4(ctx, checks, findings)
        except _FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - the findings stand without their compact set
            ctx.fail("compact", exc)
            compact = ()
        seconds["confirmation"] = time.perf_counter() - started
    report = _report(ctx, checks, findings, compact, seconds, len(scores.indices))
    return ScanResult(report, findings.prototype.pixels if findings.prototype else None, compact)


def _reference_scorer(reference: LoadedModel, classes: list[str], config: ScanConfig) -> ScoreFn:
    """Score function of the trusted reference model (PyTorch runners, kept active)."""
    image_runner, text_runner = torch_runners(reference)
    image_runner.activate()
    with text_runner:
        scorer = make_scorer(reference, classes, image_runner, text_runner)
    return lambda images: scorer.probabilities(images, reference.preprocess, config.batch_size * 2)


def _score_all(ctx: _Context, tick: Progress) -> Scores:
    """Stage 0: every image scored once, in fixed batches of data indices (cached one by one).

    A batch is a fixed range of indices, whatever in it fails to decode, so that a resumed scan
    scores exactly the batches an uninterrupted one would (same numbers, to the last bit).
    """
    dataset, size = ctx.dataset, ctx.config.batch_size
    total = len(dataset.samples)
    parts = []
    for start in range(0, total, size):
        cached = ctx.cache.load_scores(start) if ctx.cache else None
        if cached is not None:
            part, skipped = cached
            dataset.skipped.extend(skipped)
        else:
            known = len(dataset.skipped)
            indices = list(range(start, min(total, start + size)))
            part = ctx.scorer.score_batches(
                iter_batches(dataset, ctx.loaded.preprocess, size, indices=indices)
            )
            ctx.images_scored += len(part.indices)
            if ctx.cache:
                ctx.cache.save_scores(start, part, dataset.skipped[known:])
        parts.append(part)
        tick("scoring", min(size, total - start), total)
    if not parts:
        return ctx.scorer.score_batches([])
    columns = [(p.indices, p.embeddings, p.topk, p.probs) for p in parts]
    return Scores(*(np.concatenate(column) for column in zip(*columns, strict=True)))


def _full_probs(scores: Scores, n_classes: int) -> dict[int, np.ndarray]:
    """{data index: probability vector (C,)}; only the top-k are known, the rest share what remains."""
    out = {}
    for row, index in enumerate(scores.indices):
        vector = np.zeros(n_classes, np.float32)
        rest = max(0.0, 1.0 - float(scores.probs[row].sum())) / max(1, n_classes - scores.topk.shape[1])
        vector[:] = rest
        vector[scores.topk[row]] = scores.probs[row]
        out[int(index)] = vector
    return out


def _stage1(
    ctx: _Context, indices: np.ndarray, probs: dict[int, np.ndarray], tick: Progress
) -> dict[int, ImageCheck]:
    rng = np.random.default_rng(ctx.config.seed)
    preds = {int(i): int(probs[int(i)].argmax()) for i in indices}
    by_class: dict[int, list[int]] = {}
    for index, pred in preds.items():
        by_class.setdefault(pred, []).append(index)
    sample: set[int] = set()
    for members in by_class.values():
        take = min(len(members), ctx.config.per_class)
        sample.update(int(i) for i in rng.choice(members, size=take, replace=False))
    for index in preds:
        label = ctx.dataset.label_index(ctx.dataset.samples[index])
        if label is not None and label != preds[index]:
            sample.add(index)
    checks: dict[int, ImageCheck] = {}
    _run_checks(ctx, sorted(sample), probs, checks, lambda n: tick("oracle: sample", n, len(sample)))
    suspects = suspect_classes(list(checks.values()), len(ctx.dataset.classes))
    rest = sorted(i for i, p in preds.items() if p in suspects and i not in checks)
    _run_checks(ctx, rest, probs, checks, lambda n: tick("oracle: suspects", n, len(rest)))
    return checks


def _run_checks(
    ctx: _Context,
    indices: list[int],
    probs: dict[int, np.ndarray],
    checks: dict[int, ImageCheck],
    advance: Callable[[int], None],
) -> None:
    chunk = 16  # images whose crops and ablations are scored together (and cached together)
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk]
        cached = ctx.cache.load_checks(part) if ctx.cache else None
        if cached is not None and cached[1] and ctx.retry_failed:
            cached = None
        if cached is None:
            before = ctx.images_scored
            found, failed = _check_chunk(ctx, part, probs)
            if ctx.cache:
                ctx.cache.save_checks(part, found, ctx.images_scored - before, failed)
        else:
            found, failed = cached
            ctx.failures.extend(failed)
        for check in found:
            checks[check.index] = check
        advance(len(part))


_FATAL = (EnvironmentProblem, EngineError, MemoryError)
"""Errors that would fail every image alike: they stop the scan instead of being recorded."""


def _check_chunk(
    ctx: _Context, part: list[int], probs: dict[int, np.ndarray]
) -> tuple[list[ImageCheck], list[FailureInfo]]:
    """Algorithm 1 on a chunk; if it raises, image by image, recording the ones that fail."""

    def check(indices: list[int]) -> list[ImageCheck]:
        items = [(i, ctx.image(i), probs[i]) for i in indices]
        return check_images(items, ctx.oracle, ctx.score, ctx.label_objects)

    try:
        return check(part), []
    except _FATAL:
        raise
    except Exception:  # noqa: BLE001 - find the image(s) at fault below, one at a time
        pass
    found, failed = [], []
    for index in part:
        try:
            found += check([index])
        except _FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - one image's failure must not end the scan
            failed.append(ctx.fail("oracle", exc, index))
    return found, failed


@dataclass(frozen=True)
class _Findings:
    suspects: dict[int, float]
    target: int | None = None
    kind: str | None = None
    prototype: Prototype | None = None
    transplant_rate: float | None = None
    per_class_rates: dict[int, float] = field(default_factory=dict)
    victims: tuple[Victim, ...] = ()
    evidence: str = ""


def _stage3(ctx: _Context, checks: dict[int, ImageCheck], tick: Progress) -> _Findings:
    suspects = suspect_classes(list(checks.values()), len(ctx.dataset.classes))
    clean = [
        c for c in checks.values() if not c.disagrees and c.pred not in suspects and c.pred in c.object_labels
    ]
    clean = clean[:256]
    clean_images = [ctx.image(c.index) for c in clean]
    best = _Findings(suspects)
    for target in sorted(suspects, key=lambda c: suspects[c]):
        try:
            found = _confirm(ctx, checks, target, clean, clean_images)
        except _FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - one target's failure must not hide the others
            ctx.fail("confirm", exc)
            found = None
        if found is not None and (
            best.transplant_rate is None or (found.transplant_rate or 0) > best.transplant_rate
        ):
            best = replace(found, suspects=suspects)
        tick("confirming", 1, len(suspects))
    if best.target is None or (best.transplant_rate or 0) < ctx.config.transplant_threshold:
        return _non_localized(ctx, checks, suspects, best, clean, clean_images)
    return best


def _confirm(
    ctx: _Context,
    checks: dict[int, ImageCheck],
    target: int,
    clean: list[ImageCheck],
    clean_images: list[np.ndarray],
) -> _Findings | None:
    """Prototype from the candidates, refined once on the victims it finds, then transplanted."""
    flagged = [c for c in checks.values() if c.pred == target and c.disagrees and c.candidate is not None]
    if len(flagged) < ctx.config.min_candidates:
        return None
    prototype = build_prototype(
        [ctx.image(c.index) for c in flagged], [c.candidate.box for c in flagged if c.candidate]
    )
    predicted = [c for c in checks.values() if c.pred == target]
    predicted_images = [ctx.image(c.index) for c in predicted]
    target_probs = ctx.score(predicted_images)[:, target]  # scored once for both rounds below
    victims = find_victims(predicted_images, predicted, prototype, target, ctx.score, target_probs)
    # The victims' boxes come from template matching and fit the trigger far better than the
    # oracle's segments did: rebuilding the prototype on them sharpens it.
    position = {c.index: i for i, c in enumerate(predicted)}
    located = [(predicted_images[position[v.index]], v.box) for v in victims if v.box is not None]
    if len(located) >= ctx.config.min_candidates:
        prototype = build_prototype([image for image, _ in located], [box for _, box in located if box])
        victims = find_victims(predicted_images, predicted, prototype, target, ctx.score, target_probs)
    rate, per_class = transplant_test(
        prototype, clean_images, [c.pred for c in clean], target, ctx.score, ctx.config.seed
    )
    name = ctx.dataset.classes[target]
    evidence = (
        f"Pasting the recovered {prototype.pixels.shape[0]}-px trigger into {len(clean)} clean images "
        f"of other labels turned {rate:.0%} of them into '{name}'."
    )
    return _Findings({}, target, "patch", prototype, rate, per_class, tuple(victims), evidence)


def _non_localized(
    ctx: _Context,
    checks: dict[int, ImageCheck],
    suspects: dict[int, float],
    best: _Findings,
    clean: list[ImageCheck],
    clean_images: list[np.ndarray],
) -> _Findings:
    """Disagreement concentrated on a label, no removable region: test an overlay trigger.

    The overlay is estimated from the disagreeing images (`overlay_pattern`) and confirmed like
    a patch: added to clean images of other labels, it must turn them into the target.
    """
    for target in sorted(suspects, key=lambda c: suspects[c]):
        members = [c for c in checks.values() if c.pred == target]
        disagreeing = [c for c in members if c.disagrees and c.candidate is None]
        if len(disagreeing) < ctx.config.min_candidates:
            continue
        try:
            pattern = overlay_pattern([ctx.image(c.index) for c in disagreeing])
            rate, per_class = overlay_transplant_test(
                pattern, clean_images, [c.pred for c in clean], target, ctx.score
            )
        except _FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - as in `_stage3`
            ctx.fail("confirm", exc)
            continue
        if rate < ctx.config.transplant_threshold:
            continue
        victims = tuple(Victim(c.index, None, c.oracle_label, 1.0) for c in disagreeing)
        evidence = (
            f"{len(disagreeing)} of {len(members)} checked images predicted '{ctx.dataset.classes[target]}' "
            "show other objects and no region's removal changes that; their shared overlay, added to "
            f"{len(clean)} "
            f"clean images of other labels, turned {rate:.0%} of them into '{ctx.dataset.classes[target]}': "
            "a non-localized trigger (blend or warp)."
        )
        return _Findings(suspects, target, "non-localized", None, rate, per_class, victims, evidence)
    return _Findings(suspects, transplant_rate=best.transplant_rate)


def _stage4(ctx: _Context, checks: dict[int, ImageCheck], findings: _Findings) -> tuple[CompactPair, ...]:
    """The compact fine-tuning set, at most `compact_fraction` of the scored images.

    The budget is split: a quarter unlearning pairs (the trigger pasted into clean images of
    other labels, their true caption kept), a quarter victims with the trigger removed (captioned
    with what the oracle saw), a sixth clean images of the target (the label a repair most easily
    over-corrects), and the rest a replay spread evenly over the other labels.
    """
    if findings.target is None:
        return ()
    classes = ctx.dataset.classes
    budget = max(8, int(ctx.config.compact_fraction * len(ctx.dataset.samples)))
    rng = np.random.default_rng(ctx.config.seed + 4)
    pairs: list[CompactPair] = []
    victims = sorted((v for v in findings.victims if v.oracle_label is not None), key=lambda v: -v.score)
    for victim in victims[: budget // 4]:
        image = ctx.image(victim.index)
        if victim.box is not None:
            image = ablate_segment(image, box_mask(image, victim.box))
        label = classes[victim.oracle_label]  # type: ignore[index]
        pairs.append(
            CompactPair(f"victim-{victim.index:06d}.png", image, _caption(label), ctx.path(victim.index))
        )
    agreeing = [c for c in checks.values() if not c.disagrees and c.pred in c.object_labels]
    others = [c for c in agreeing if c.pred != findings.target]
    others = _round_robin([others[i] for i in rng.permutation(len(others))])
    if findings.prototype is not None:
        for check in others[: budget // 4]:
            box = findings.prototype.boxes[int(rng.integers(len(findings.prototype.boxes)))]
            image = paste(ctx.image(check.index), findings.prototype, box)
            name, caption = f"unlearn-{check.index:06d}.png", _caption(classes[check.pred])
            pairs.append(CompactPair(name, image, caption, ctx.path(check.index)))
        others = others[budget // 4 :]
    own = [c for c in agreeing if c.pred == findings.target][: max(2, budget // 6)]
    replay = others[: max(0, budget - len(pairs) - len(own))]
    for check in own + replay:
        name, caption = f"clean-{check.index:06d}.png", _caption(classes[check.pred])
        pairs.append(CompactPair(name, ctx.image(check.index), caption, ctx.path(check.index)))
    return tuple(pairs)


def _round_robin(checks: list[ImageCheck]) -> list[ImageCheck]:
    """Reorder so that labels alternate: any prefix covers the labels as evenly as it can."""
    by_label: dict[int, list[ImageCheck]] = {}
    for check in checks:
        by_label.setdefault(check.pred, []).append(check)
    queues = [by_label[label] for label in sorted(by_label)]
    out: list[ImageCheck] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        out += [q[rank] for q in queues if rank < len(q)]
    return out


def _caption(label: str) -> str:
    return f"a photo of a {label}."


def _severity(findings: _Findings) -> str:
    if findings.target is None:
        return "none"
    rate = findings.transplant_rate or 0.0
    return "high" if rate >= 0.9 else "medium" if rate >= 0.7 else "low"


def _report(
    ctx: _Context,
    checks: dict[int, ImageCheck],
    findings: _Findings,
    compact: tuple[CompactPair, ...],
    seconds: dict[str, float],
    scored: int,
) -> Report:
    classes, samples = ctx.dataset.classes, ctx.dataset.samples
    found = findings.target is not None
    victim_labels = tuple(classes[c] for c, rate in findings.per_class_rates.items() if rate >= 0.5)
    if findings.kind == "non-localized":
        victim_labels = tuple(
            dict.fromkeys(classes[v.oracle_label] for v in findings.victims if v.oracle_label is not None)
        )
    per_label: dict[str, list[bool]] = {}
    for check in checks.values():
        per_label.setdefault(classes[check.pred], []).append(check.disagrees)
    return Report(
        tool={"name": "clip-audit", "version": __version__},
        model=ModelInfo(str(ctx.loaded.path), ctx.loaded.sha256 or "", ctx.loaded.arch.name),
        data=DataInfo(
            str(ctx.dataset.root), scored, tuple(SkippedFile(s.path, s.reason) for s in ctx.dataset.skipped)
        ),
        verdict="backdoor" if found else "clean",
        severity=_severity(findings),
        target_labels=(classes[findings.target],) if findings.target is not None else (),
        victim_labels=victim_labels,
        trigger=TriggerInfo(
            kind=findings.kind,
            image=TRIGGER_FILE if findings.prototype is not None and found else None,
            relative_size=findings.prototype.relative_size
            if findings.prototype is not None and found
            else None,
            transplant_success_rate=None
            if findings.transplant_rate is None
            else round(findings.transplant_rate, 4),
            evidence=findings.evidence
            or (
                "No label's disagreement with the oracle stood out."
                if not findings.suspects
                else f"Suspect labels {', '.join(classes[c] for c in findings.suspects)} were not confirmed "
                f"(transplant success {findings.transplant_rate or 0:.2f} below the threshold)."
            ),
        ),
        victims=tuple(
            VictimInfo(
                samples[v.index].path,
                classes[checks[v.index].pred],
                None if v.oracle_label is None else classes[v.oracle_label],
                None if v.box is None else tuple(round(c, 4) for c in v.box),  # type: ignore[arg-type]
                v.score,
            )
            for v in findings.victims
        ),
        compact_set=CompactSetInfo(COMPACT_DIR + "/", len(compact), round(len(compact) / max(1, scored), 4))
        if compact
        else None,
        cost=CostInfo(ctx.images_scored, len(checks), {k: round(v, 2) for k, v in seconds.items()}),
        disagreement={label: round(float(np.mean(v)), 4) for label, v in sorted(per_label.items())},
        failures=tuple(ctx.failures),
    )
