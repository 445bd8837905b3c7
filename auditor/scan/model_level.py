"""Stage 5, the model-level audit (`--inversion`): when the data held no trigger, search the model.

The data pass can only find a trigger that some image carries. With `--inversion auto` (the
default) and no confirmed finding, or with `always`, this stage runs `auditor.inversion` on clean
images: DATA's images that are not victims, or `--inversion-data`'s. Its gradients run in
PyTorch; its forward-only steps (predictions before and after a stamp) go through the scan's
fp32 scorer, so through the engine the scan uses. It spends at most `ScanConfig.inversion_budget`
seconds, by default as long as the data pass took; a search cut short says so in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from auditor.data import Dataset, ImageDecodeError
from auditor.inversion.audit import Inversion, InversionConfig, invert
from auditor.inversion.search import (
    DifferentiableModel,
    PredictFn,
    SearchConfig,
    stamp_image,
    trigger_rgba,
)
from auditor.inversion.warp import WarpSearch
from auditor.models import LoadedModel
from auditor.report import (
    FindingInfo,
    InversionInfo,
    RecoveredTriggerInfo,
    Report,
    SearchedClassInfo,
    TriggerInfo,
    WarpClassInfo,
    WarpFamilyInfo,
)
from auditor.scan.compact import CompactPair, caption
from auditor.scan.context import Progress, ScanContext
from auditor.scoring import ZeroShotScorer, torch_class_weights

if TYPE_CHECKING:
    import torch

MIN_IMAGES = 8  # fewer clean images than this cannot be split into a search and a held-out part


def should_run(mode: str, confirmed: int) -> bool:
    return mode == "always" or (mode == "auto" and confirmed == 0)


def model_level(
    ctx: ScanContext,
    excluded: set[int],
    budget: float,
    images: Dataset | None = None,
    reference: LoadedModel | None = None,
    progress: Progress | None = None,
) -> Inversion | None:
    """Run the model-level search on clean images; None when there are too few of them.

    `excluded`: data indices not to use (victims); `images`: `--inversion-data` instead of DATA.
    """
    import torch

    source = images or ctx.dataset
    chosen = [i for i in range(len(source.samples)) if images is not None or i not in excluded]
    # The scan's --seed seeds the search too, so that another seed is an independent run.
    config = InversionConfig(budget_seconds=budget, search=SearchConfig(seed=ctx.config.seed))
    order = np.random.default_rng(ctx.config.seed).permutation(len(chosen))
    scorer = ctx.exact_scorer or ctx.scorer
    model = DifferentiableModel(ctx.loaded, scorer.class_weights)
    pixels = _pixels(model, ctx.loaded, source, [chosen[i] for i in order[: config.images]])
    if len(pixels) < MIN_IMAGES:
        return None
    ref = None
    if reference is not None:
        ref_model = DifferentiableModel(reference, torch_class_weights(reference, ctx.dataset.classes))
        ref = (ref_model, lambda p: ref_model.predict(torch.from_numpy(p)))
    return invert(model, pixels, _engine_predict(ctx, scorer, model), config, ref, progress)


def _pixels(
    model: DifferentiableModel, loaded: LoadedModel, dataset: Dataset, indices: Sequence[int]
) -> torch.Tensor:
    """float32 (n, 3, S, S) in [0, 1]: the images as the model sees them, before normalization."""
    import torch

    mean, std = model.mean[0], model.std[0]
    out = []
    for index in indices:
        try:
            image = dataset.load(dataset.samples[index])
        except ImageDecodeError:
            continue  # already reported as skipped by the data pass, or unreadable here
        out.append((loaded.preprocess(image) * std + mean).clamp(0, 1))
    size = loaded.arch.image_size
    return torch.stack(out) if out else torch.zeros(0, 3, size, size)


def _engine_predict(ctx: ScanContext, scorer: ZeroShotScorer, model: DifferentiableModel) -> PredictFn:
    """Top-1 of [0, 1] pixels through the scan's fp32 scorer (the engine), counted in the cost."""
    mean, std = model.mean.numpy(), model.std.numpy()

    def predict(pixels: np.ndarray) -> np.ndarray:
        ctx.images_scored += len(pixels)
        out = []
        for start in range(0, len(pixels), ctx.config.batch_size * 2):
            chunk = ((pixels[start : start + ctx.config.batch_size * 2] - mean) / std).astype(np.float32)
            out.append(scorer.logits(chunk)[1].argmax(axis=1))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    return predict


def stamp_compact(ctx: ScanContext, inversion: Inversion, excluded: set[int]) -> tuple[CompactPair, ...]:
    """The compact set for targets only the search found: DATA images (not victims) with their
    own captions, a quarter of them with a confirmed stamp on (the unlearning pairs).

    A labelled image keeps its label; an unlabelled one is captioned with the model's prediction.
    """
    # Every round's stamp of a confirmed target, in turn: the planted trigger is one shortcut and
    # each round found its own shape of it; unlearning them all generalizes better than one.
    stamps = [trigger_rgba(t) for r in inversion.confirmed for t in (r.trigger, *r.alternates)]
    if not stamps:
        return ()
    classes = ctx.dataset.classes
    budget = max(8, int(ctx.config.compact_fraction * len(ctx.dataset.samples)))
    rng = np.random.default_rng(ctx.config.seed + 5)
    targets = {r.trigger.target for r in inversion.confirmed}
    pairs: list[CompactPair] = []
    for index in rng.permutation(len(ctx.dataset.samples)).tolist():
        if len(pairs) >= budget:
            break
        label = ctx.dataset.label_index(ctx.dataset.samples[index])
        label = ctx.predictions.get(index) if label is None else label
        if index in excluded or label is None or label < 0:
            continue
        try:
            image = ctx.image(index)
        except ImageDecodeError:
            continue
        unlearn = len(pairs) < budget // 4 and label not in targets
        if unlearn:
            image = stamp_image(image, stamps[len(pairs) % len(stamps)])
        name = f"{'unlearn' if unlearn else 'clean'}-{index:06d}.png"
        pairs.append(CompactPair(name, image, caption(classes[label]), ctx.path(index)))
    return tuple(pairs)


def not_run(mode: str, confirmed: int) -> InversionInfo:
    """The report's block when the stage did not run, saying why."""
    why = (
        "--inversion never"
        if mode == "never"
        else f"the data pass confirmed {confirmed} target(s)"
        if confirmed
        else "too few clean images to search and hold out"
    )
    return InversionInfo(False, f"Model-level search did not run: {why}.")


def stamp_pictures(inversion: Inversion, classes: list[str]) -> dict[str, np.ndarray]:
    """{PNG name: uint8 pixels}: each recovered stamp as RGBA (S, S, 4) (pattern, alpha = mask),
    and a strip (S, 4 S, 3) of four clean images with the stamp on, for the HTML report."""
    out = {}
    for recovered in inversion.recovered:
        trigger = recovered.trigger
        label = classes[trigger.target]
        out[stamp_file(label)] = trigger_rgba(trigger)
        examples = inversion.examples.transpose(0, 2, 3, 1)  # (k, S, S, 3) in [0, 1]
        mask, pattern = trigger.mask[..., None], trigger.pattern.transpose(1, 2, 0)
        stamped = (1 - mask) * examples + mask * pattern
        out[stamp_file(label, "-examples")] = _strip(stamped)
    warps = inversion.warp
    if warps is not None and warps.flagged:
        out[warp_file(classes[warps.flagged[0]])] = _strip(_warped_examples(warps, inversion.examples))
    return out


def _strip(images: np.ndarray) -> np.ndarray:
    """float (k, S, S, 3) in [0, 1] -> uint8 (S, k S, 3), side by side."""
    return (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)


def _warped_examples(warps: WarpSearch, examples: np.ndarray) -> np.ndarray:
    """float32 (k, S, S, 3): `examples` (float32 (k, 3, S, S) in [0, 1]) warped by the field of
    the first flagged class (`warps.flagged` is not empty)."""
    import torch

    from auditor.inversion.warp import apply_warp

    first = next(c for c in warps.per_class if c.target == warps.flagged[0])
    with torch.no_grad():
        warped = apply_warp(torch.from_numpy(examples), torch.from_numpy(first.field)[None])
    return warped.numpy().transpose(0, 2, 3, 1)


def warp_file(label: str) -> str:
    return f"warped-{_file_safe(label)}-examples.png"


def stamp_file(label: str, suffix: str = "") -> str:
    return f"inverted-{_file_safe(label)}{suffix}.png"


def _file_safe(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label)


def inversion_info(inversion: Inversion, classes: list[str], budget: float) -> InversionInfo:
    """The report's `inversion` block."""
    scores = sorted(inversion.scores, key=lambda s: -s.index)
    top = scores[0] if scores else None
    recovered = tuple(
        RecoveredTriggerInfo(
            classes[r.trigger.target],
            round(r.index, 4),
            round(r.trigger.area, 6),
            r.holdout_success,
            r.reference_success,
            r.confirmed,
            stamp_file(classes[r.trigger.target]),
            stamp_file(classes[r.trigger.target], "-examples"),
        )
        for r in inversion.recovered
    )
    covered = (
        f"all {inversion.classes} classes"
        if inversion.covered == "all"
        else f"a shortlist of {len(inversion.searched)} of {inversion.classes} classes"
    )
    rounds = f"{inversion.rounds} round{'s' if inversion.rounds != 1 else ''}"
    state = (
        f"complete ({rounds})"
        if inversion.complete
        else f"cut short by the budget ({budget:.0f} s): {rounds} of {inversion.steps} steps kept"
    )
    if recovered:
        found = "; ".join(
            f"'{r.label}' index {r.index:.2f}, held-out success {r.holdout_success:.2f}"
            + ("" if r.reference_success is None else f", on the reference {r.reference_success:.2f}")
            + (
                " (confirmed)"
                if r.confirmed
                else " (not confirmed: without --reference a natural shortcut looks the same)"
                if r.reference_success is None
                else " (not confirmed: the search was cut short)"
                if not inversion.complete
                else " (not confirmed)"
            )
            for r in recovered
        )
    else:
        found = "no class outlying" + (
            f" (largest index {top.index:.2f} for '{classes[top.target]}',"
            f" threshold {inversion.threshold:.2f})"
            if top
            else ""
        )
    warp = None if inversion.warp is None else _warp_info(inversion.warp, classes)
    return InversionInfo(
        ran=True,
        summary=f"Model-level search over {covered}, {state}: {found}."
        + ("" if warp is None else " " + _warp_summary(warp)),
        covered=inversion.covered,
        complete=inversion.complete,
        classes=inversion.classes,
        searched=tuple(classes[c] for c in inversion.searched),
        threshold=inversion.threshold,
        alpha=inversion.alpha,
        reference=inversion.reference,
        per_class=tuple(
            SearchedClassInfo(classes[s.target], s.area, s.index, s.reached, s.reference_area) for s in scores
        ),
        recovered=recovered,
        budget_seconds=round(budget, 2),
        steps=inversion.steps,
        rounds=inversion.rounds,
        seconds=inversion.seconds,
        passes=inversion.passes,
        images=inversion.images,
        warp=warp,
    )


def _warp_info(found: WarpSearch, classes: list[str]) -> WarpFamilyInfo:
    size = int(found.per_class[0].field.shape[-1]) if found.per_class else 32
    flagged = tuple(classes[c] for c in found.flagged)
    return WarpFamilyInfo(
        displacement=round(found.strength * size / 32, 2),
        threshold=found.threshold,
        complete=found.complete,
        steps=found.steps,
        seconds=found.seconds,
        per_class=tuple(
            WarpClassInfo(classes[c.target], round(c.success, 4), c.hits, c.trials, c.index)
            for c in sorted(found.per_class, key=lambda c: -c.index)
        ),
        flagged=flagged,
        examples=warp_file(flagged[0]) if flagged else None,
    )


def _warp_summary(warp: WarpFamilyInfo) -> str:
    """One sentence on the warp family, for the `inversion` summary."""
    head = f"Warp search (fields of {warp.displacement:.1f} px mean displacement"
    head += "" if warp.complete else f", cut short by the budget after {warp.steps} steps"
    if not warp.per_class:
        return head + "): nothing searched."
    if not warp.flagged:
        top = warp.per_class[0]
        return (
            f"{head}): no class outlying (largest index {top.index:.2f} for '{top.label}', held-out "
            f"success {top.success:.2f}, threshold {warp.threshold:.2f})."
        )
    by_label = {c.label: c for c in warp.per_class}
    found = "; ".join(
        f"'{label}' index {by_label[label].index:.2f}, held-out success {by_label[label].success:.2f}"
        for label in warp.flagged
    )
    return (
        f"{head}): {found} (suspected: a warp trigger, or a class any model reaches by warps; "
        "not confirmed by this search)."
    )


def with_inversion(report: Report, info: InversionInfo) -> Report:
    """The report with the model-level stage's block, its confirmed targets and its suspects.

    A target the data pass confirmed too becomes `evidence_source: both`; one only the search
    found is a new finding (`inversion`) and makes the verdict `backdoor`. A clean verdict's
    evidence says whether the search ran and what it covered.
    """
    confirmed = {r.label: r for r in info.recovered if r.confirmed}
    findings = [replace(f, evidence_source="both") if f.target in confirmed else f for f in report.findings]
    known = {f.target for f in findings}
    added = [_finding(r) for label, r in confirmed.items() if label not in known]
    warped = info.warp.flagged if info.warp is not None else ()
    unconfirmed = [r.label for r in info.recovered if not r.confirmed]
    suspects = tuple(dict.fromkeys([*report.suspects, *unconfirmed, *warped]))
    report = replace(report, inversion=info, findings=tuple(findings + added), suspects=suspects)
    if report.verdict == "backdoor" or not added:
        if report.verdict == "clean":
            trigger = replace(report.trigger, evidence=f"{report.trigger.evidence} {info.summary}".strip())
            report = replace(report, trigger=trigger)
        return report
    first = added[0]
    rate = first.transplant_success_rate
    return replace(
        report,
        verdict="backdoor",
        severity="high" if rate >= 0.9 else "medium" if rate >= 0.7 else "low",
        target_labels=tuple(f.target for f in added),
        trigger=TriggerInfo(first.kind, first.trigger_image, first.relative_size, rate, first.evidence),
    )


def _finding(recovered: RecoveredTriggerInfo) -> FindingInfo:
    side = round(float(np.sqrt(recovered.area)), 4)
    return FindingInfo(
        target=recovered.label,
        kind="patch",
        trigger_image=recovered.image,
        relative_size=(side, side),
        transplant_success_rate=recovered.holdout_success,
        victim_labels=(),
        victims=(),
        evidence=f"No image in the data carried a trigger; the model-level search recovered a stamp "
        f"of {recovered.area:.2%} of the image (anomaly index {recovered.index:.2f}) that turns "
        f"{recovered.holdout_success:.0%} of held-out clean images into '{recovered.label}'.",
        evidence_source="inversion",
    )
