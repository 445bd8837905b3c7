"""Stage 3, the decision: which targets are confirmed, and the report that says so.

Every class with a cluster of look-alike trigger candidates goes to the patch transplant test
(strongest clusters first, at most `MAX_PATCH_TESTS`, one confirmation per target); every class
whose disagreement stands out and that no patch confirmed goes to the overlay test. A target is
confirmed when its transplant success reaches `ScanConfig.transplant_threshold`. A model may
have several targets: each confirmed one is a `Finding`, and the report lists them all
(`findings`, additive in schema v1); the strongest fills the schema's single-trigger fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from auditor import __version__
from auditor.data import Sample
from auditor.report import (
    CompactSetInfo,
    CostInfo,
    DataInfo,
    FindingInfo,
    ModelInfo,
    Report,
    SkippedFile,
    TriggerInfo,
    VictimInfo,
)
from auditor.scan.check import ImageCheck
from auditor.scan.confirm import (
    CleanSet,
    Finding,
    confirm_overlay,
    confirm_patch,
    natural_targets,
    transplant_test,
)
from auditor.scan.context import Progress, ScanContext
from auditor.scan.suspects import candidate_clusters, suspect_classes
from auditor.scan.victims import Victim

# Each patch test scores the target's images twice and up to CLEAN_IMAGES pasted ones: this
# bounds the confirmation's cost on a model whose oracle finds many look-alike candidates.
MAX_PATCH_TESTS = 8
CLEAN_IMAGES = 256
TRIGGER_FILE = "trigger.png"
COMPACT_DIR = "compact"


@dataclass(frozen=True)
class Findings:
    """Stage 3's outcome: what was suspected, what was tested and what was confirmed."""

    suspects: dict[int, float]  # by disagreement: class -> p-value
    clustered: tuple[int, ...]  # classes with a cluster of look-alike candidates
    confirmed: tuple[Finding, ...]  # strongest first
    best_rejected: Finding | None = None  # the tested target with the highest transplant rate

    @property
    def strongest(self) -> Finding | None:
        return self.confirmed[0] if self.confirmed else None


def find_backdoors(ctx: ScanContext, checks: dict[int, ImageCheck], tick: Progress) -> Findings:
    """Run the confirmations stage 1's evidence calls for; see the module docstring."""
    threshold = ctx.config.transplant_threshold
    suspects = suspect_classes(list(checks.values()), len(ctx.dataset.classes))
    clusters = candidate_clusters(list(checks.values()), ctx.image, ctx.config.min_candidates)
    clustered = tuple(sorted({c.target for c in clusters}))
    suspected = set(suspects) | set(clustered)
    clean = _clean_set(ctx, checks, lambda c: c not in suspected)
    confirmed: dict[int, Finding] = {}
    tested: list[Finding] = []
    patch_tests = clusters[:MAX_PATCH_TESTS]
    overlay_tests = sorted(suspects, key=lambda c: suspects[c])
    total = len(patch_tests) + len(overlay_tests)
    for cluster in patch_tests:
        if cluster.target not in confirmed:
            natural = natural_targets(list(checks.values()), cluster.target)
            finding = ctx.attempt("confirm", partial(confirm_patch, ctx, cluster, clean, natural))
            _keep(finding, threshold, confirmed, tested)
        tick("confirming", 1, total)
    for target in overlay_tests:
        if target not in confirmed:
            finding = ctx.attempt("confirm", partial(confirm_overlay, ctx, checks, target, clean))
            _keep(finding, threshold, confirmed, tested)
        tick("confirming", 1, total)
    rejected = [f for f in tested if f.target not in confirmed]
    best = max(rejected, key=lambda f: (f.transplant_rate, -f.target)) if rejected else None
    cleared = suspected - set(confirmed)
    if cleared and confirmed:
        extra = _clean_set(ctx, checks, cleared.__contains__)
        for target, finding in confirmed.items():
            topped_up = ctx.attempt("confirm", partial(_with_cleared_classes, ctx, finding, extra))
            confirmed[target] = topped_up or finding
    return Findings(
        suspects,
        clustered,
        tuple(sorted(confirmed.values(), key=lambda f: (-f.transplant_rate, f.target))),
        best,
    )


def _with_cleared_classes(ctx: ScanContext, finding: Finding, cleared: CleanSet) -> Finding:
    """`finding` with its per-class transplant rates (which name the victim labels) measured on
    the clean images of classes that were suspected and then not confirmed, too.

    Why: the clean set leaves out every suspected class, because until its test a suspect's
    images may carry a trigger. Once tested and rejected, its agreeing images are as clean as any
    other class's; without them a victim label hinged on whether a benign class happened to be
    suspected, which differs between an int8 and an fp32 bulk engine (a zoo ViT on an AVX2 CPU:
    int8 found a look-alike cluster in 'flower', the transplant rejected it, and 'flower' fell out
    of the victim labels). The decision (`transplant_rate`, the control) stays on the set it was
    made on. A non-localized finding's victim labels come from its victims: unchanged.
    """
    if finding.kind != "patch" or finding.prototype is None or not cleared.checks:
        return finding
    _, rates = transplant_test(
        finding.prototype,
        list(cleared.images),
        cleared.labels,
        finding.target,
        ctx.score_exact,
        ctx.config.seed,
    )
    return replace(finding, per_class_rates=dict(sorted({**finding.per_class_rates, **rates}.items())))


def _clean_set(ctx: ScanContext, checks: dict[int, ImageCheck], of_class: Callable[[int], bool]) -> CleanSet:
    """Up to CLEAN_IMAGES checked images the oracle agrees with, predicted as a class that
    `of_class` admits (before the tests: one nobody suspects)."""
    clean = [
        c for c in checks.values() if not c.disagrees and c.pred in c.object_labels and of_class(c.pred)
    ][:CLEAN_IMAGES]
    return CleanSet(tuple(clean), tuple(ctx.image(c.index) for c in clean))


def _keep(
    finding: Finding | None, threshold: float, confirmed: dict[int, Finding], tested: list[Finding]
) -> None:
    if finding is None:
        return
    tested.append(finding)
    if finding.transplant_rate >= threshold and finding.beats_control:
        confirmed[finding.target] = finding


def severity(finding: Finding | None) -> str:
    if finding is None:
        return "none"
    rate = finding.transplant_rate
    return "high" if rate >= 0.9 else "medium" if rate >= 0.7 else "low"


def trigger_file(rank: int, finding: Finding, classes: list[str]) -> str | None:
    """The PNG the writers save a finding's trigger to: trigger.png for the strongest."""
    return None if finding.prototype is None else artifact_name("trigger", ".png", rank, finding, classes)


def overlay_file(rank: int, finding: Finding, classes: list[str]) -> str | None:
    """The .npy the writers save a non-localized finding's overlay to (repair stops on it)."""
    return None if finding.overlay is None else artifact_name("overlay", ".npy", rank, finding, classes)


def artifact_name(stem: str, suffix: str, rank: int, finding: Finding, classes: list[str]) -> str:
    """`stem.suffix` for the strongest finding, `stem-N-LABEL.suffix` for the N-th."""
    if rank == 0:
        return stem + suffix
    safe = "".join(ch if ch.isalnum() else "-" for ch in classes[finding.target])
    return f"{stem}-{rank + 1}-{safe}{suffix}"


def victim_labels(finding: Finding, classes: list[str]) -> tuple[str, ...]:
    if finding.kind == "non-localized":
        return tuple(
            dict.fromkeys(classes[v.oracle_label] for v in finding.victims if v.oracle_label is not None)
        )
    return tuple(classes[c] for c, rate in finding.per_class_rates.items() if rate >= 0.5)


def all_victims(findings: Findings) -> list[Victim]:
    """Every confirmed finding's victims, each image once (its strongest finding first)."""
    seen: dict[int, Victim] = {}
    for finding in findings.confirmed:
        for victim in finding.victims:
            seen.setdefault(victim.index, victim)
    return list(seen.values())


def build_report(
    ctx: ScanContext,
    checks: dict[int, ImageCheck],
    findings: Findings,
    compact_size: int,
    seconds: dict[str, float],
    scored: int,
) -> Report:
    """The schema-v1 report: the strongest finding in the single-trigger fields, all in `findings`."""
    classes, samples = ctx.dataset.classes, ctx.dataset.samples
    strongest = findings.strongest
    per_label: dict[str, list[bool]] = {}
    for check in checks.values():
        per_label.setdefault(classes[check.pred], []).append(check.disagrees)
    infos = tuple(_finding_info(rank, f, classes, samples) for rank, f in enumerate(findings.confirmed))
    return Report(
        tool={
            "name": "clip-audit",
            "version": __version__,
            # Additive: what ran the bulk scoring; the decisive steps always run in fp32.
            "engine": ctx.scorer.image_runner.provider,
            "bulk_precision": ctx.scorer.image_runner.precision,
            # Additive: which oracle segmented, and on what ("sam on onnx", "classic on scikit-image").
            "oracle": f"{ctx.oracle.name} on {ctx.oracle.runtime}",
        },
        model=ModelInfo(
            str(ctx.loaded.path),
            ctx.loaded.sha256 or "",
            ctx.loaded.arch.name,
            ctx.loaded.source_format,
            ctx.loaded.arch_source,
        ),
        data=DataInfo(
            str(ctx.dataset.root), scored, tuple(SkippedFile(s.path, s.reason) for s in ctx.dataset.skipped)
        ),
        verdict="backdoor" if strongest else "clean",
        severity=severity(strongest),
        target_labels=tuple(info.target for info in infos),
        victim_labels=tuple(dict.fromkeys(label for info in infos for label in info.victim_labels)),
        trigger=_trigger_info(findings, infos, classes, ctx.config.transplant_threshold),
        victims=tuple(
            VictimInfo(
                samples[v.index].path,
                classes[ctx.predictions[v.index]],
                None if v.oracle_label is None else classes[v.oracle_label],
                None if v.box is None else tuple(round(c, 4) for c in v.box),  # type: ignore[arg-type]
                v.score,
                v.flipped,
            )
            for v in all_victims(findings)
        ),
        compact_set=CompactSetInfo(COMPACT_DIR + "/", compact_size, round(compact_size / max(1, scored), 4))
        if compact_size
        else None,
        cost=CostInfo(
            ctx.images_scored,
            len(checks),
            {k: round(v, 2) for k, v in seconds.items()},
            ctx.oracle_scored,
        ),
        disagreement={label: round(float(np.mean(v)), 4) for label, v in sorted(per_label.items())},
        failures=tuple(ctx.failures),
        findings=infos,
        suspects=tuple(
            classes[c]
            for c in sorted(set(findings.suspects) | set(findings.clustered))
            if c not in {f.target for f in findings.confirmed}
        ),
    )


def _finding_info(rank: int, finding: Finding, classes: list[str], samples: Sequence[Sample]) -> FindingInfo:
    prototype = finding.prototype
    return FindingInfo(
        target=classes[finding.target],
        kind=finding.kind,
        trigger_image=trigger_file(rank, finding, classes),
        relative_size=prototype.relative_size if prototype is not None else None,
        transplant_success_rate=round(finding.transplant_rate, 4),
        victim_labels=victim_labels(finding, classes),
        victims=tuple(samples[v.index].path for v in finding.victims),
        evidence=finding.evidence,
        overlay=overlay_file(rank, finding, classes),
        control_rate=None if finding.control is None else round(finding.control.rate, 4),
    )


def _trigger_info(
    findings: Findings, infos: tuple[FindingInfo, ...], classes: list[str], threshold: float
) -> TriggerInfo:
    if infos:
        first = infos[0]
        evidence = first.evidence
        if len(infos) > 1:
            evidence += f" {len(infos) - 1} more target(s): " + ", ".join(i.target for i in infos[1:]) + "."
        return TriggerInfo(
            first.kind, first.trigger_image, first.relative_size, first.transplant_success_rate, evidence
        )
    suspected = sorted(set(findings.suspects) | set(findings.clustered))
    if not suspected:
        return TriggerInfo(
            None,
            evidence="No label's disagreement with the oracle stood out, and no label's "
            "images carried look-alike trigger candidates.",
        )
    best = findings.best_rejected
    rate = None if best is None else best.transplant_rate
    why = (
        "below the threshold"
        if best is not None
        else "none reached a transplant test: too few disagreeing images, or a shared pattern "
        "larger than a trigger"
    )
    if best is not None and not best.beats_control and rate is not None and rate >= threshold:
        assert best.control is not None
        why = f"no more than natural pieces of '{classes[best.target]}' give: {best.control.rate:.2f}"
    return TriggerInfo(
        None,
        transplant_success_rate=None if rate is None else round(rate, 4),
        evidence=f"Suspect labels {', '.join(classes[c] for c in suspected)} were not confirmed "
        f"(best transplant success {rate or 0:.2f}, {why}).",
    )
