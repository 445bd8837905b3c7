"""The scan report (schema_version 1, DESIGN §3): frozen dataclasses, built explicitly.

`Report.to_dict()` is the JSON contract; `Report.from_dict()` reads it back (repair consumes
it). Output formats are plug-ins in `FORMATS`: name -> function(report) -> text. No I/O here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
SEVERITIES = ("none", "low", "medium", "high")
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    arch: str
    # Additive in schema v1: how the checkpoint was read and where its architecture came from.
    format: str | None = None  # "safetensors" | "torch" | "openai-archive" | "hf-folder" | ...
    arch_source: str | None = None  # "--arch" | "checkpoint"


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class DataInfo:
    path: str
    images: int
    skipped: tuple[SkippedFile, ...] = ()


@dataclass(frozen=True)
class TriggerInfo:
    kind: str | None  # "patch" | "non-localized" | None
    image: str | None = None
    relative_size: tuple[float, float] | None = None
    transplant_success_rate: float | None = None
    evidence: str = ""


@dataclass(frozen=True)
class VictimInfo:
    path: str
    predicted: str
    oracle_label: str | None
    trigger_box: Box | None
    score: float
    # Additive: False for a poisoned pair whose trigger did not take (the data labels it the
    # target, it carries the trigger, the model still predicts what it shows).
    flipped: bool = True


@dataclass(frozen=True)
class CompactSetInfo:
    path: str
    size: int
    fraction_of_data: float


@dataclass(frozen=True)
class FindingInfo:
    """One confirmed target with its own trigger (additive in schema v1; the strongest first).

    `trigger_image`: the PNG beside report.json (None for a non-localized trigger);
    `victims`: paths of this target's victim samples (their details are in `Report.victims`).
    """

    target: str
    kind: str
    trigger_image: str | None
    relative_size: tuple[float, float] | None
    transplant_success_rate: float
    victim_labels: tuple[str, ...]
    victims: tuple[str, ...]
    evidence: str
    overlay: str | None = None  # a non-localized trigger's estimate (.npy beside report.json)
    control_rate: float | None = None  # the best natural piece of the target's transplant rate
    # What the finding rests on: "data" (a trigger some image carries, confirmed by transplant),
    # "inversion" (the model-level search alone), or "both". Not `evidence`: in schema v1 that
    # key already holds the finding's explanation text.
    evidence_source: str = "data"


@dataclass(frozen=True)
class SearchedClassInfo:
    """One class of the model-level search: its smallest stamp's area and its anomaly index."""

    label: str
    area: float
    index: float
    reached: bool
    reference_area: float | None = None


@dataclass(frozen=True)
class RecoveredTriggerInfo:
    """A class over the threshold: its stamp (RGBA PNG: pattern, alpha = mask) and how it did."""

    label: str
    index: float
    area: float
    holdout_success: float
    # The same start as `image`, polished on the reference model, on the reference's held-out
    # images (a stamp carried over from the audited model hardly ever works on another model).
    reference_success: float | None
    confirmed: bool
    image: str
    examples: str | None = None  # PNG strip of held-out images with the stamp on


@dataclass(frozen=True)
class WarpClassInfo:
    """One class of the warp family: its field's held-out success (hits of trials) and index."""

    label: str
    success: float
    hits: int
    trials: int
    index: float


@dataclass(frozen=True)
class WarpFamilyInfo:
    """The model-level warp search (additive in schema v1): a smooth whole-image displacement of
    `displacement` pixels on average, optimized per class; `flagged`: the outlying classes,
    reported as suspects (a warp is never confirmed by this search)."""

    displacement: float
    threshold: float
    complete: bool
    steps: int
    seconds: float
    per_class: tuple[WarpClassInfo, ...] = ()
    flagged: tuple[str, ...] = ()
    examples: str | None = None  # PNG strip of held-out images warped towards the first flagged class

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WarpFamilyInfo:
        return cls(
            **{
                **raw,
                "per_class": tuple(WarpClassInfo(**c) for c in raw.get("per_class", ())),
                "flagged": tuple(raw.get("flagged", ())),
            }
        )


@dataclass(frozen=True)
class InversionInfo:
    """The model-level stage (additive in schema v1): whether it ran, what it covered and found.

    `covered`: "all" classes, a "shortlist" of them, or "none" (it did not run); `complete`:
    False when the budget cut the search short; `passes`: images through forward + backward
    ("backward") and forward only ("forward").
    """

    ran: bool
    summary: str
    covered: str = "none"
    complete: bool = False
    classes: int = 0
    searched: tuple[str, ...] = ()
    threshold: float | None = None
    alpha: float | None = None
    reference: bool = False
    per_class: tuple[SearchedClassInfo, ...] = ()
    recovered: tuple[RecoveredTriggerInfo, ...] = ()
    budget_seconds: float | None = None
    steps: int = 0
    rounds: int = 0  # independent searches per class whose mean made the per-class value
    seconds: dict[str, float] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    warp: WarpFamilyInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as the JSON reads back

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InversionInfo:
        return cls(
            **{
                **raw,
                "searched": tuple(raw.get("searched", ())),
                "per_class": tuple(SearchedClassInfo(**c) for c in raw.get("per_class", ())),
                "recovered": tuple(RecoveredTriggerInfo(**r) for r in raw.get("recovered", ())),
                "warp": WarpFamilyInfo.from_dict(raw["warp"]) if raw.get("warp") else None,
            }
        )


@dataclass(frozen=True)
class FailureInfo:
    """A unit of work the scan could not finish (additive in schema v1): the scan went on without it.

    `path`: the data file (relative to DATA), or None for a step over many images (a target's
    confirmation); `stage`: "oracle" | "confirm" | "compact"; `error`: the exception's class.
    """

    path: str | None
    stage: str
    error: str
    message: str


@dataclass(frozen=True)
class CostInfo:
    images_scored: int
    oracle_images: int
    seconds: dict[str, float] = field(default_factory=dict)
    oracle_scored: int = 0  # of images_scored, the crops and ablations of Algorithm 1


@dataclass(frozen=True)
class Report:
    tool: dict[str, str]
    model: ModelInfo
    data: DataInfo
    verdict: str  # "backdoor" | "clean"
    severity: str
    target_labels: tuple[str, ...]
    victim_labels: tuple[str, ...]
    trigger: TriggerInfo
    victims: tuple[VictimInfo, ...]
    compact_set: CompactSetInfo | None
    cost: CostInfo
    disagreement: dict[str, float] = field(default_factory=dict)  # per predicted label, checked images
    failures: tuple[FailureInfo, ...] = ()  # what could not be checked: the scan is incomplete
    findings: tuple[FindingInfo, ...] = ()  # every confirmed target, strongest first
    suspects: tuple[str, ...] = ()  # labels that had evidence but were not confirmed
    inversion: InversionInfo | None = None  # the model-level stage; None: not part of this scan
    schema_version: int = SCHEMA_VERSION

    @property
    def incomplete(self) -> bool:
        return bool(self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": dict(self.tool),
            "model": {
                "path": self.model.path,
                "sha256": self.model.sha256,
                "arch": self.model.arch,
                "format": self.model.format,
                "arch_source": self.model.arch_source,
            },
            "data": {
                "path": self.data.path,
                "images": self.data.images,
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.data.skipped],
            },
            "verdict": self.verdict,
            "severity": self.severity,
            "target_labels": list(self.target_labels),
            "victim_labels": list(self.victim_labels),
            "trigger": {
                "kind": self.trigger.kind,
                "image": self.trigger.image,
                "relative_size": list(self.trigger.relative_size) if self.trigger.relative_size else None,
                "transplant_success_rate": self.trigger.transplant_success_rate,
                "evidence": self.trigger.evidence,
            },
            "victims": [
                {
                    "path": v.path,
                    "predicted": v.predicted,
                    "oracle_label": v.oracle_label,
                    "trigger_box": list(v.trigger_box) if v.trigger_box else None,
                    "score": v.score,
                    "flipped": v.flipped,
                }
                for v in self.victims
            ],
            "compact_set": None
            if self.compact_set is None
            else {
                "path": self.compact_set.path,
                "size": self.compact_set.size,
                "fraction_of_data": self.compact_set.fraction_of_data,
            },
            "cost": {
                "images_scored": self.cost.images_scored,
                "oracle_images": self.cost.oracle_images,
                "oracle_scored": self.cost.oracle_scored,
                "seconds": dict(self.cost.seconds),
            },
            "disagreement": dict(self.disagreement),
            "failures": [
                {"path": f.path, "stage": f.stage, "error": f.error, "message": f.message}
                for f in self.failures
            ],
            "findings": [
                {
                    "target": f.target,
                    "kind": f.kind,
                    "trigger_image": f.trigger_image,
                    "relative_size": list(f.relative_size) if f.relative_size else None,
                    "transplant_success_rate": f.transplant_success_rate,
                    "victim_labels": list(f.victim_labels),
                    "victims": list(f.victims),
                    "evidence": f.evidence,
                    "overlay": f.overlay,
                    "control_rate": f.control_rate,
                    "evidence_source": f.evidence_source,
                }
                for f in self.findings
            ],
            "suspects": list(self.suspects),
            "inversion": None if self.inversion is None else self.inversion.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Report:
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {raw.get('schema_version')!r}")
        trig = raw["trigger"]
        compact = raw.get("compact_set")
        return cls(
            tool=dict(raw["tool"]),
            model=ModelInfo(**raw["model"]),
            data=DataInfo(
                raw["data"]["path"],
                raw["data"]["images"],
                tuple(SkippedFile(**s) for s in raw["data"].get("skipped", [])),
            ),
            verdict=raw["verdict"],
            severity=raw["severity"],
            target_labels=tuple(raw["target_labels"]),
            victim_labels=tuple(raw["victim_labels"]),
            trigger=TriggerInfo(
                kind=trig["kind"],
                image=trig.get("image"),
                relative_size=_tuple(trig.get("relative_size")),
                transplant_success_rate=trig.get("transplant_success_rate"),
                evidence=trig.get("evidence", ""),
            ),
            victims=tuple(
                VictimInfo(
                    v["path"],
                    v["predicted"],
                    v.get("oracle_label"),
                    _tuple(v.get("trigger_box")),
                    v["score"],
                    v.get("flipped", True),
                )
                for v in raw["victims"]
            ),
            compact_set=None if compact is None else CompactSetInfo(**compact),
            cost=CostInfo(
                raw["cost"]["images_scored"],
                raw["cost"]["oracle_images"],
                dict(raw["cost"].get("seconds", {})),
                int(raw["cost"].get("oracle_scored", 0)),
            ),
            disagreement=dict(raw.get("disagreement", {})),
            failures=tuple(FailureInfo(**f) for f in raw.get("failures", [])),
            findings=tuple(
                FindingInfo(
                    f["target"],
                    f["kind"],
                    f.get("trigger_image"),
                    _tuple(f.get("relative_size")),
                    f["transplant_success_rate"],
                    tuple(f.get("victim_labels", [])),
                    tuple(f.get("victims", [])),
                    f.get("evidence", ""),
                    f.get("overlay"),
                    f.get("control_rate"),
                    f.get("evidence_source", "data"),
                )
                for f in raw.get("findings", [])
            ),
            suspects=tuple(raw.get("suspects", [])),
            inversion=InversionInfo.from_dict(raw["inversion"]) if raw.get("inversion") else None,
            schema_version=raw["schema_version"],
        )


def _tuple(value: list[float] | None) -> Any:
    return tuple(value) if value is not None else None


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def render_markdown(report: Report) -> str:
    lines = [
        f"# clip-audit scan: {report.verdict} (severity {report.severity})",
        "",
        f"- model: `{report.model.path}` ({report.model.arch}, sha256 `{report.model.sha256[:12]}…`)",
        f"- data: `{report.data.path}` — {report.data.images} images, {len(report.data.skipped)} skipped",
        f"- target labels: {', '.join(report.target_labels) or '—'}",
        f"- victim labels: {', '.join(report.victim_labels) or '—'}",
    ]
    if len(report.findings) > 1:
        lines.append(f"- findings: {len(report.findings)} targets, each with its own trigger")
        for f in report.findings:
            image = f", ![trigger]({f.trigger_image})" if f.trigger_image else ""
            lines.append(
                f"  - **{f.target}**: {f.kind}, transplant success {f.transplant_success_rate:.2f}, "
                f"{len(f.victims)} victims{image}"
            )
    if report.trigger.kind:
        rate = report.trigger.transplant_success_rate
        lines += [
            f"- trigger: {report.trigger.kind}"
            + (f", transplant success {rate:.2f}" if rate is not None else "")
            + (f", ![trigger]({report.trigger.image})" if report.trigger.image else ""),
            f"- evidence: {report.trigger.evidence}",
        ]
    lines += [
        f"- cost: {report.cost.images_scored} images scored, oracle on {report.cost.oracle_images}",
        *([f"- **incomplete**: {failure_summary(report)}"] if report.incomplete else []),
        "",
    ]
    if report.victims:
        lines += [
            "| victim | predicted | oracle label | trigger box | score | flipped |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for v in report.victims:
            box = "—" if v.trigger_box is None else ", ".join(f"{c:.2f}" for c in v.trigger_box)
            lines.append(
                f"| `{v.path}` | {v.predicted} | {v.oracle_label or '—'} | {box} | {v.score:.2f} "
                f"| {'yes' if v.flipped else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def _victim_message(victim: VictimInfo) -> str:
    if victim.flipped:
        return f"labeled/predicted '{victim.predicted}', shows '{victim.oracle_label}'"
    return f"carries the trigger, still predicted '{victim.predicted}' (a poisoned pair that did not take)"


def render_sarif(report: Report) -> str:
    """SARIF 2.1.0: one result for the backdoor, one per victim sample."""
    rules = [
        {
            "id": "CLIPAUDIT001",
            "name": "BackdoorTrigger",
            "shortDescription": {"text": "The model carries a backdoor trigger"},
        },
        {
            "id": "CLIPAUDIT002",
            "name": "PoisonedSample",
            "shortDescription": {"text": "A data sample carries the trigger and a poisoned label"},
        },
    ]
    level = {"none": "none", "low": "note", "medium": "warning", "high": "error"}[report.severity]
    results = []
    if report.verdict == "backdoor":
        results.append(
            {
                "ruleId": "CLIPAUDIT001",
                "level": level,
                "message": {
                    "text": f"backdoor to {', '.join(report.target_labels)}: {report.trigger.evidence}"
                },
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": report.model.path}}}],
                "properties": {"severity": report.severity, "sha256": report.model.sha256},
            }
        )
    for v in report.victims:
        results.append(
            {
                "ruleId": "CLIPAUDIT002",
                "level": level,
                "message": {"text": _victim_message(v)},
                "locations": [_data_location(v.path)],
                "properties": {
                    "trigger_box": list(v.trigger_box) if v.trigger_box else None,
                    "score": v.score,
                    "flipped": v.flipped,
                },
            }
        )
    invocation = {
        "executionSuccessful": not report.incomplete,
        "toolExecutionNotifications": [
            {
                "level": "error",
                "message": {"text": f"{f.stage}: {f.error}: {f.message}"},
                **({"locations": [_data_location(f.path)]} if f.path else {}),
            }
            for f in report.failures
        ],
    }
    sarif = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "clip-audit",
                        "version": report.tool.get("version", ""),
                        "informationUri": "https://arxiv.org/abs/2511.13545",
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"DATA": {"uri": _file_uri(report.data.path)}},
                "invocations": [invocation],
                "results": results,
            }
        ],
    }
    return json.dumps(sarif, indent=2) + "\n"


def _data_location(path: str) -> dict[str, Any]:
    """A SARIF location for a file under DATA."""
    return {"physicalLocation": {"artifactLocation": {"uri": path, "uriBaseId": "DATA"}}}


def failure_summary(report: Report) -> str:
    """One line: how many images (and other steps) the scan could not finish, and the first error."""
    images = sum(1 for f in report.failures if f.path is not None)
    steps = len(report.failures) - images
    first = report.failures[0]
    parts = [f"{images} image(s) could not be checked"] + ([f"{steps} step(s) failed"] if steps else [])
    return f"{', '.join(parts)} (first: {first.stage}, {first.error}: {first.message})"


def _file_uri(path: str) -> str:
    from pathlib import Path

    return Path(path).resolve().as_uri() + "/"


def render_html(report: Report, images: dict[str, str] | None = None) -> str:
    """Self-contained page; `images` maps names ("trigger", victim paths) to data: URIs."""
    images = images or {}
    esc = html.escape
    rows = []
    for v in report.victims:
        thumb = images.get(v.path, "")
        rows.append(
            f"<figure><img src='{thumb}' alt='{esc(v.path)}'><figcaption>{esc(v.path)}<br>"
            f"{esc(v.predicted)} → {esc(str(v.oracle_label))} ({v.score:.2f})"
            f"{'' if v.flipped else ' · trigger did not take'}</figcaption></figure>"
        )
    bars = "".join(
        f"<div class='bar'><span>{esc(label)}</span><i style='width:{rate * 100:.0f}%'></i>"
        f"<b>{rate:.2f}</b></div>"
        for label, rate in sorted(report.disagreement.items(), key=lambda kv: -kv[1])
    )
    trigger = images.get("trigger", "")
    inversion = report.inversion
    searched = ""
    if inversion is not None:
        figures = []
        for r in inversion.recovered:
            stamp, stamped = images.get(r.image, ""), images.get(r.examples or "", "")
            figures.append(
                f"<figure style='width:auto'><img class='trigger' src='{stamp}' alt='stamp'>"
                f"<img style='height:128px;width:auto' src='{stamped}' alt='stamped'><figcaption>"
                f"<b>{esc(r.label)}</b>: {'confirmed' if r.confirmed else 'not confirmed'}, index "
                f"{r.index:.2f}, held-out success {r.holdout_success:.2f}, mask {r.area:.2%} of the image"
                "</figcaption></figure>"
            )
        warp = inversion.warp
        if warp is not None and warp.examples:
            figures.append(
                f"<figure style='width:auto'><img style='height:128px;width:auto' "
                f"src='{images.get(warp.examples, '')}' alt='warped'><figcaption>held-out images warped "
                f"towards <b>{esc(warp.flagged[0])}</b> ({warp.displacement:.1f} px mean displacement): "
                "a suspect</figcaption></figure>"
            )
        searched = f"<h2>Model-level search</h2><p>{esc(inversion.summary)}</p>{''.join(figures)}"
    findings = "".join(
        f"<figure><img class='trigger' src='{images.get(f.trigger_image or '', '')}' alt='trigger'>"
        f"<figcaption><b>{esc(f.target)}</b>: {esc(f.kind)}, transplant {f.transplant_success_rate:.2f}, "
        f"{len(f.victims)} victims</figcaption></figure>"
        for f in report.findings
    )
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>clip-audit report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} .verdict{{font-size:1.5em}}
figure{{display:inline-block;margin:4px;font-size:11px;width:140px}} figure img{{width:128px;
image-rendering:pixelated}} .bar{{display:flex;align-items:center;gap:6px;margin:2px}}
.bar span{{width:9em}} .bar i{{display:inline-block;height:12px;background:#c33;max-width:30em}}
.trigger{{width:128px;image-rendering:pixelated;border:1px solid #999}}</style></head><body>
<h1>clip-audit scan</h1>
<p class='verdict'>Verdict: <b>{esc(report.verdict)}</b> (severity {esc(report.severity)})</p>
<p>Model <code>{esc(report.model.path)}</code> ({esc(report.model.arch)}); data
<code>{esc(report.data.path)}</code>, {report.data.images} images.</p>
<p>Target labels: <b>{esc(", ".join(report.target_labels) or "—")}</b>;
victim labels: {esc(", ".join(report.victim_labels) or "—")}.</p>
{f"<h2>Recovered trigger</h2><img class='trigger' src='{trigger}' alt='trigger'>" if trigger else ""}
{f"<h2>Findings: {len(report.findings)} targets</h2>{findings}" if len(report.findings) > 1 else ""}
<p>{esc(report.trigger.evidence)}</p>
{searched}
<h2>Disagreement rate per predicted label</h2>{bars}
{f"<p><b>Incomplete:</b> {esc(failure_summary(report))}</p>" if report.incomplete else ""}
<h2>Victims ({len(report.victims)})</h2>{"".join(rows)}
</body></html>
"""


FORMATS: dict[str, Callable[[Report], str]] = {
    "json": render_json,
    "markdown": render_markdown,
    "sarif": render_sarif,
    "html": render_html,
}
